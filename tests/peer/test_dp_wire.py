"""privacy=onion_dp on real gRPC peers: every hop that pushes hidden states noises them as configured and its
sealed audit record reaches the coordinator, which verifies it; a hop that skips or fakes the noise is named."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
import torch

from openhydra.crypto.dp import DPParams, apply_dp
from openhydra.crypto.dp_wire import audit_records, open_record, seal_record
from openhydra.crypto.errors import AuditFailure
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.errors import HopError
from openhydra.peer.privacy import ChainPrivacy
from openhydra.peer.server import PeerServer
from openhydra.runtime.sampling import SamplingParams
from tests.peer.privacy_helpers import start_keyed_peers
from tests.peer.test_pipeline_grpc import _generate, _prompt

SPLITS = [(0, 2), (2, 5), (5, 8)]
TUNABLES = ClientTunables(step_timeout_s=20.0)
PARAMS = DPParams(sigma=0.001, clip=300.0)


# ---- records -------------------------------------------------------------------------------------------
def _records(n: int, session: str = "s", step: int = 3) -> tuple[list[bytes], list[bytes]]:
    keys = [os.urandom(32) for _ in range(n)]
    blobs = [seal_record(k, apply_dp(torch.randn(2, 8), PARAMS, k, session, i, step)[1]) for i, k in enumerate(keys)]
    return keys, blobs


def test_sealed_records_open_only_for_their_hop_and_step():
    keys, blobs = _records(2)
    assert open_record(keys[0], blobs[0], "s", 0, 3).hop_index == 0
    for key, hop, step in [(keys[1], 0, 3), (keys[0], 1, 3), (keys[0], 0, 4)]:
        with pytest.raises(AuditFailure):
            open_record(key, blobs[0], "s", hop, step)
    assert b"seed" not in blobs[0]  # the seed is not readable by the hops the record passes through


@pytest.mark.parametrize("case, blamed", [("missing", 1), ("reordered", 0), ("extra", 2), ("weaker", 1)])
def test_audit_names_the_hop(case, blamed):
    keys, blobs = _records(2)
    if case == "missing":
        blobs = blobs[:1]
    elif case == "reordered":
        blobs = blobs[::-1]
    elif case == "extra":
        blobs = [*blobs, blobs[1]]
    else:  # hop 1 applied less noise than configured and says so honestly
        blobs[1] = seal_record(keys[1], apply_dp(torch.randn(2, 8), DPParams(0.0001, 300.0), keys[1], "s", 1, 3)[1])
    with pytest.raises(AuditFailure) as info:
        audit_records(blobs, keys, PARAMS, "s", 3)
    assert info.value.hop_index == blamed


# ---- on the wire ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_model_dirs) -> Iterator[tuple[list[PeerServer], list]]:
    servers, route = start_keyed_peers(tiny_model_dirs["llama"], SPLITS)
    yield servers, route
    for server in servers:
        server.stop()


def _client(route, privacy: ChainPrivacy, tiny_model_dirs) -> PeerChainClient:
    return PeerChainClient(route, tunables=TUNABLES, privacy=privacy, embedder=load_embedder(tiny_model_dirs["llama"]))


def test_every_pushing_hop_noises_and_is_audited(keyed, tiny_model_dirs):
    servers, route = keyed
    prompt = _prompt(seed=5)
    clean = _client(route, ChainPrivacy(encrypt=True, onion=True), tiny_model_dirs)
    audited = _client(route, ChainPrivacy(encrypt=True, onion=True, dp_sigma=0.001), tiny_model_dirs)
    loud = _client(route, ChainPrivacy(encrypt=True, onion=True, dp_sigma=0.05, dp_clip_embeddings=0.5),
                   tiny_model_dirs)
    try:
        baseline = _generate(clean, "clean", prompt, 8)
        assert len(_generate(audited, "dp", prompt, 8)) == 8
        assert audited.dp_audits == 2 * 8  # hops 0 and 1 push hidden states, one record each per step
        assert clean.dp_audits == 0
        assert _generate(loud, "loud", prompt, 8) != baseline  # the noise really reaches the model
        assert all(not s.service.crypto_rejections for s in servers)
    finally:
        for c in (clean, audited, loud):
            c.shutdown()


def test_a_hop_that_skips_the_noise_is_named(keyed, tiny_model_dirs, monkeypatch):
    servers, route = keyed
    cheat = servers[1].service

    def skip_noise(state, hidden, step):  # sends clean activations, with an honest-looking zero-noise record
        record = state.session.noise(hidden, DPParams(0.0, step.dp_clip), step.seq)[1]
        return hidden, seal_record(state.session.layer.keys.audit_key, record)

    monkeypatch.setattr(cheat, "_dp_noise", skip_noise)
    client = _client(route, ChainPrivacy(encrypt=True, onion=True, dp_sigma=0.001), tiny_model_dirs)
    try:
        with pytest.raises(HopError) as info:
            client.step("cheat", _prompt(seed=6), 0, SamplingParams(), 0)
        assert info.value.address == route[1].address and info.value.code == grpc.StatusCode.DATA_LOSS
        assert "dp_audit_failed" in str(info.value)
        assert client.crypto_rejections["dp_audit_failed"] == 1
    finally:
        client.shutdown()
