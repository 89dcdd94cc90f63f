"""Privacy on real gRPC peers: sealed activations, onion routes, tamper/replay rejected at the right hop."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from openhydra.crypto.errors import CryptoError
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.errors import HopError
from openhydra.peer.privacy import ChainPrivacy
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.server import PeerServer
from openhydra.peer.wire import encode_tensor
from openhydra.runtime.sampling import SamplingParams
from tests.peer.privacy_helpers import ManInTheMiddle, flip_bit, start_keyed_peers
from tests.peer.test_pipeline_grpc import GREEDY, _generate, _hf_greedy, _prompt

SPLITS = [(0, 2), (2, 5), (5, 8)]
ENCRYPTED = ChainPrivacy(encrypt=True)
ONION = ChainPrivacy(encrypt=True, onion=True)
TUNABLES = ClientTunables(step_timeout_s=20.0)


@pytest.fixture(scope="module")
def keyed(tiny_model_dirs) -> Iterator[tuple[list[PeerServer], list]]:
    servers, route = start_keyed_peers(tiny_model_dirs["qwen3_5"], SPLITS)
    yield servers, route
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def embedder(tiny_model_dirs):
    return load_embedder(tiny_model_dirs["qwen3_5"])


def _client(route, privacy: ChainPrivacy, embedder) -> PeerChainClient:
    return PeerChainClient(route, tunables=TUNABLES, privacy=privacy, embedder=embedder)


def _served(servers: list[PeerServer]) -> list[int]:
    return [s.service._served for s in servers]


@pytest.mark.parametrize("privacy", [ENCRYPTED, ONION], ids=["encrypted", "onion"])
def test_private_pipeline_equals_generate(tiny_model_dirs, keyed, embedder, privacy) -> None:
    servers, route = keyed
    client = _client(route, privacy, embedder)
    try:
        prompt = _prompt(seed=3)
        assert _generate(client, f"private-{privacy.onion}", prompt, 12) == _hf_greedy(
            tiny_model_dirs["qwen3_5"], prompt, 12
        )
        assert all(not s.service.crypto_rejections for s in servers)
    finally:
        client.shutdown()


def test_peer_requiring_encryption_refuses_plaintext(keyed) -> None:
    servers, route = keyed
    client = PeerChainClient(route, tunables=TUNABLES)  # privacy off
    try:
        with pytest.raises(HopError) as err:
            client.step("plain", [5, 6, 7], 0, SamplingParams(), 0)
        assert err.value.address == route[0].address and err.value.code == grpc.StatusCode.DATA_LOSS
        assert servers[0].service.crypto_rejections.get("plaintext", 0) >= 1
    finally:
        client.shutdown()


def _attacked_run(keyed, embedder, privacy: ChainPrivacy, mutate, session: str):
    """Generate through a route whose hop 1 sits behind a man in the middle; return the error."""
    servers, route = keyed
    mitm = ManInTheMiddle(route[1].address, mutate)
    attacked = [route[0], route[1].model_copy(update={"address": mitm.address}), route[2]]
    client = _client(attacked, privacy, embedder)
    before = [dict(s.service.crypto_rejections) for s in servers]
    served = _served(servers)
    try:
        with pytest.raises(HopError) as err:
            _generate(client, session, _prompt(seed=5), 6)
        return err.value, mitm, before, served, client
    finally:
        client.shutdown()
        mitm.stop()


def _check_rejected_at_hop1(servers, route, error: HopError, mitm, before, served, reason: str) -> None:
    assert error.address == mitm.address  # the coordinator's name for hop 1: it fails over that hop
    assert error.code == grpc.StatusCode.DATA_LOSS
    after = [dict(s.service.crypto_rejections) for s in servers]
    assert after[1].get(reason, 0) == before[1].get(reason, 0) + 1
    assert after[0] == before[0] and after[2] == before[2]
    # Hop 1 ran nothing for the rejected message, so hop 2 got nothing for it either.
    n_ok = len(mitm.seen) - 1  # messages before the attacked one went through
    now = _served(servers)
    assert now[1] - served[1] == n_ok and now[2] - served[2] == n_ok
    probe = PeerChainClient([], tunables=TUNABLES)  # the peer stays up and reports the rejection
    try:
        assert probe.info(route[1].address).crypto_rejections[reason] >= 1
    finally:
        probe.shutdown()


@pytest.mark.parametrize("privacy", [ENCRYPTED, ONION], ids=["encrypted", "onion"])
@pytest.mark.parametrize("at", [0, 3], ids=["first-message", "mid-generation"])
def test_one_flipped_bit_is_rejected_at_that_hop(keyed, embedder, privacy, at) -> None:
    servers, route = keyed
    bit = 8 * 60 + 3 if at else 8 * 50  # inside the ciphertext; at 0 the onion is also checked below

    def mutate(i: int, step: pb.Step, seen) -> list[pb.Step]:
        return [flip_bit(step, bit) if i == at else step]

    error, mitm, before, served, _ = _attacked_run(keyed, embedder, privacy, mutate, f"flip-{at}-{privacy.onion}")
    _check_rejected_at_hop1(servers, route, error, mitm, before, served, "tampered")


@pytest.mark.parametrize("privacy", [ENCRYPTED, ONION], ids=["encrypted", "onion"])
def test_tampered_onion_layer_is_rejected_at_that_hop(keyed, embedder, privacy) -> None:
    servers, route = keyed

    def mutate(i: int, step: pb.Step, seen) -> list[pb.Step]:
        if i == 0:
            onion = bytearray(step.onion)
            onion[200] ^= 0x10
            step = pb.Step(session_id=step.session_id, seq=step.seq, sealed=step.sealed, onion=bytes(onion))
        return [step]

    error, mitm, before, served, _ = _attacked_run(keyed, embedder, privacy, mutate, f"onion-{privacy.onion}")
    _check_rejected_at_hop1(servers, route, error, mitm, before, served, "tampered")


@pytest.mark.parametrize("privacy", [ENCRYPTED, ONION], ids=["encrypted", "onion"])
def test_replayed_message_is_rejected_at_that_hop(keyed, embedder, privacy) -> None:
    servers, route = keyed

    def mutate(i: int, step: pb.Step, seen) -> list[pb.Step]:
        return [seen[1]] if i == 2 else [step]  # re-send message 1 instead of message 2

    error, mitm, before, served, _ = _attacked_run(keyed, embedder, privacy, mutate, f"replay-{privacy.onion}")
    _check_rejected_at_hop1(servers, route, error, mitm, before, served, "replayed")


def test_thousand_bit_flips_all_rejected_at_the_hop(keyed, embedder) -> None:
    """~1,000 single-bit flips spread over a sealed activation (header, nonce, body, tag): all rejected."""
    servers, route = keyed
    client = _client(route, ONION, embedder)
    try:
        _generate(client, "flips", _prompt(seed=7), 2)
        sender, receiver = servers[0].service.privacy, servers[1].service.privacy
        hidden = encode_tensor(torch.randn(1, 64))  # a small decode-step activation
        inner = pb.Step(session_id="flips", seq=10**6, start_position=0, num_positions=1, tensor=hidden)
        sealed = sender.seal_step(sender.state("flips"), inner).sealed  # as hop 0 would send it
        bits = range(0, len(sealed) * 8, max(1, len(sealed) * 8 // 1000))
        before = receiver.rejections["tampered"] + receiver.rejections["malformed"]
        for bit in bits:
            bad = pb.Step(session_id="flips", seq=10**6, sealed=flip_bit(pb.Step(sealed=sealed), bit).sealed)
            with pytest.raises(CryptoError):
                receiver.open_step(bad)
        assert receiver.rejections["tampered"] + receiver.rejections["malformed"] - before == len(bits) >= 900

        receiver.open_step(pb.Step(session_id="flips", seq=10**6, sealed=sealed))  # the intact one opens
    finally:
        client.close("flips")
        client.shutdown()


def test_onion_samples_on_the_coordinator_so_the_last_hop_never_sees_tokens(tiny_model_dirs, keyed, embedder,
                                                                            monkeypatch) -> None:
    """Under onion routing with a head, the last peer returns its final hidden states (sealed) and the
    coordinator applies norm + LM head and samples: same tokens as generate, and no peer ever samples."""
    import openhydra.peer.forward as server_module
    from openhydra.peer.head import load_head

    def no_sampling_on_peers(*args, **kwargs):
        raise AssertionError("a peer sampled a token")

    monkeypatch.setattr(server_module, "sample", no_sampling_on_peers)
    servers, route = keyed
    client = PeerChainClient(route, tunables=TUNABLES, privacy=ONION, embedder=embedder,
                             head=load_head(tiny_model_dirs["qwen3_5"]))
    try:
        prompt = _prompt(seed=4)
        expected = _hf_greedy(tiny_model_dirs["qwen3_5"], prompt, 12)
        assert _generate(client, "coordinator-samples", prompt, 12) == expected
        logits = client.step_result("coordinator-logits", prompt, 0, SamplingParams(), 0, all_logits=True).logits
        assert logits is not None and logits.shape == (len(prompt), servers[-1].runtime.vocab_size)
    finally:
        client.shutdown()


def test_onion_head_runs_on_the_thread_that_asked_for_the_step(tiny_model_dirs, keyed, embedder) -> None:
    """The coordinator's norm + head + sampling run on the calling thread, which waits for the step anyway: a hop
    to a pool thread and back would cost every privacy=onion token two thread wake-ups that privacy=off does not
    pay (issue 16: onion/off >= 0.98)."""
    from openhydra.peer.head import load_head

    head = load_head(tiny_model_dirs["qwen3_5"])
    ran_on: list[int] = []

    def recording_head(hidden: torch.Tensor) -> torch.Tensor:
        ran_on.append(threading.get_ident())
        return head(hidden)

    _servers, route = keyed
    client = PeerChainClient(route, tunables=TUNABLES, privacy=ONION, embedder=embedder, head=recording_head)
    try:
        prompt = _prompt(seed=5)
        tokens = _generate(client, "head-on-caller", prompt, 4)
        assert tokens == _hf_greedy(tiny_model_dirs["qwen3_5"], prompt, 4)
        assert ran_on == [threading.get_ident()] * 4
        # A failover replay (pipelined on the event loop) samples on the caller's thread too, and gets the same tokens.
        feeds = [(list(prompt), 0, GREEDY, 0)]
        feeds += [([t], len(prompt) + i, GREEDY, i + 1) for i, t in enumerate(tokens[:3])]
        replayed = client.replay("head-on-caller-replay", feeds, route)
        assert [r.token for r in replayed] == tokens
        assert ran_on == [threading.get_ident()] * 8
    finally:
        client.shutdown()
