"""Failover rebuild on real gRPC peers (peer/rebuild.py): replace the middle span of a chain mid-session and only
the replacement computes the history; the other hops keep their caches, and the tokens that follow are exactly
those of a run without a fault, under every privacy level. A stranger cannot move a session's cache."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.errors import HopError
from openhydra.peer.privacy import ChainPrivacy
from openhydra.peer.server import PeerServer
from openhydra.runtime.prefix_cache import PrefixCache, PrefixKey, block_hashes
from openhydra.runtime.sampling import SamplingParams
from tests.peer.privacy_helpers import start_keyed_peers
from tests.peer.test_pipeline_grpc import _prompt

SPLITS = [(0, 3), (3, 5), (3, 5), (5, 8)]  # the middle span twice: the replica replaces the one that fails
GREEDY = SamplingParams()
TUNABLES = ClientTunables(step_timeout_s=20.0, prefill_chunk=8)  # a 13-token prompt is two messages
PRIVACY = {"off": ChainPrivacy(), "encrypted": ChainPrivacy(encrypt=True),
           "onion": ChainPrivacy(encrypt=True, onion=True)}


@pytest.fixture(scope="module")
def peers(tiny_model_dirs) -> Iterator[tuple[list[PeerServer], list]]:
    servers, route = start_keyed_peers(tiny_model_dirs["llama"], SPLITS, require_encryption=False)
    yield servers, route
    for server in servers:
        server.stop()


def _feeds(prompt: list[int], tokens: list[int]) -> list[tuple[list[int], int, SamplingParams, int]]:
    """The (tokens, start, sampling, step) of each step a session ran: the prompt, then each sampled token."""
    feeds = [(prompt, 0, GREEDY, 0)]
    for i, token in enumerate(tokens[:-1]):
        feeds.append(([token], len(prompt) + i, GREEDY, i + 1))
    return feeds


def _continue(client: PeerChainClient, sid: str, route, prompt: list[int], tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        step = len(out)
        out.append(client.step_result(sid, [out[-1]], len(prompt) + step - 1, GREEDY, step, route=route).token)
    return out


@pytest.mark.parametrize("level", list(PRIVACY))
def test_rebuild_replaces_only_the_failed_span_and_output_is_unchanged(tiny_model_dirs, peers, level) -> None:
    servers, route = peers
    first, middle, replica, last = route
    model_dir = tiny_model_dirs["llama"]
    privacy = PRIVACY[level]
    embedder = load_embedder(model_dir) if privacy.encrypt else None
    client = PeerChainClient([], tunables=TUNABLES, privacy=privacy, embedder=embedder)
    try:
        prompt = _prompt(seed=5, n=13)
        old_route, new_route = [first, middle, last], [first, replica, last]
        expected = _continue(client, f"ref-{level}", old_route, prompt, [client.step_result(
            f"ref-{level}", prompt, 0, GREEDY, 0, route=old_route).token], 15)

        sid = f"s-{level}"
        tokens = [client.step_result(sid, prompt, 0, GREEDY, 0, route=old_route).token]
        tokens = _continue(client, sid, old_route, prompt, tokens, 7)
        assert tokens == expected[:8]
        served = [s.service._served for s in servers]

        results = client.rebuild(f"{sid}-2", sid, _feeds(prompt, tokens), new_route, (3, 5), len(prompt) + 7)
        assert len(results) == 8 and all(r.token == -1 for r in results)  # the last hop held every position
        after = [s.service._served for s in servers]
        # only the replica computed: both prompt chunks and seven decode steps; the others only passed markers on
        assert [b - a for a, b in zip(served, after, strict=True)] == [0, 0, 2 + 7, 0]
        tokens = _continue(client, f"{sid}-2", new_route, prompt, tokens, 8)
        assert tokens == expected
        assert servers[0].service.runtime.session_length(sid) == 0  # the old id is gone: adopted
    finally:
        client.shutdown()


def test_a_stranger_cannot_adopt_a_session(tiny_model_dirs, peers) -> None:
    """The session id travels in the clear; moving its cache needs the old session's per-hop key."""
    servers, route = peers
    first, middle, _replica, last = route
    model_dir = tiny_model_dirs["llama"]
    embedder = load_embedder(model_dir)
    owner = PeerChainClient([], tunables=TUNABLES, privacy=ChainPrivacy(encrypt=True), embedder=embedder)
    stranger = PeerChainClient([], tunables=TUNABLES, privacy=ChainPrivacy(encrypt=True), embedder=embedder)
    try:
        prompt = _prompt(seed=7, n=13)
        chain = [first, middle, last]
        owner.step_result("victim", prompt, 0, GREEDY, 0, route=chain)
        held = servers[0].service.runtime.session_length("victim")
        assert held == len(prompt)
        # the stranger opens its own session on the same hops and asks them to adopt the victim's caches
        stranger.step_result("stranger-own", prompt[:2], 0, GREEDY, 0, route=chain)
        stranger._crypto["victim"] = stranger._crypto["stranger-own"]  # its best guess at keys: its own
        with pytest.raises(HopError) as caught:
            stranger.rebuild("theft", "victim", [(prompt, 0, GREEDY, 0)], chain, (3, 5), len(prompt))
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert servers[0].service.runtime.session_length("victim") == held
        assert servers[0].service.runtime.session_length("theft") == 0
        assert servers[0].service.crypto_rejections.get("adopt", 0) >= 1
    finally:
        owner.shutdown()
        stranger.shutdown()


def test_missing_retained_activations_refuse_the_rebuild(tiny_model_dirs, peers) -> None:
    """A hop that no longer holds what it pushed (evicted) refuses: the coordinator then replays in full."""
    servers, route = peers
    first, middle, replica, last = route
    client = PeerChainClient([], tunables=TUNABLES)
    try:
        prompt = _prompt(seed=9, n=5)
        client.step_result("evicted", prompt, 0, GREEDY, 0, route=[first, middle, last])
        servers[0].service.retained.drop("evicted")
        with pytest.raises(HopError) as caught:
            client.rebuild("evicted-2", "evicted", [(prompt, 0, GREEDY, 0)], [first, replica, last], (3, 5),
                           len(prompt))
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "retained" in caught.value.message
    finally:
        client.shutdown()


def test_retained_budget_evicts_whole_sessions() -> None:
    from openhydra.peer.rebuild import Retained
    from openhydra.peer.wire import encode_tensor

    kept = Retained(budget_bytes=3 * 4 * 64 + 200)
    for sid in ("a", "b", "c", "d"):
        kept.keep(sid, 0, 1, encode_tensor(torch.zeros(1, 64)))
    assert kept.get("a", 0, 1) is None and kept.get("d", 0, 1) is not None
    assert kept.evicted_sessions >= 1 and kept.nbytes <= kept.budget_bytes
    kept.rename("d", "e", length=1)
    assert kept.get("e", 0, 1) is not None and kept.get("d", 0, 1) is None
    kept.rename("e", "f", length=0)  # nothing ends within 0 positions
    assert kept.get("f", 0, 1) is None


def test_rebuild_after_a_prefix_cache_hit_computes_the_skipped_blocks_on_the_replacement(tiny_model_dirs,
                                                                                          peers) -> None:
    """A session whose first step skipped cached prompt blocks: the replacement never saw them (its own prefix
    cache is empty). The coordinator sends the skipped blocks as one extra message ahead of the history; the hop
    before the replacement answers it from the outputs it kept per block, and the output stays exact."""
    servers, route = peers
    first, middle, replica, last = route
    block = 4
    for server in servers:
        rt = server.service.runtime
        rt.prefix_cache = PrefixCache(rt.layer_types, 16 << 20, block)
    client = PeerChainClient([], tunables=TUNABLES)
    try:
        prompt = _prompt(seed=11, n=13)
        key = PrefixKey(tuple(block_hashes(prompt, block, b"test-secret")), block)
        assert len(key.hashes) == 3
        old_route, new_route = [first, middle, last], [first, replica, last]
        # a cold session fills the prefix caches of the old route (and the first hop's per-block outputs)
        cold = [client.step_result("cold", prompt, 0, GREEDY, 0, route=old_route, prefix=key).token]
        expected = _continue(client, "cold", old_route, prompt, cold, 10)
        assert replica.address not in {h.address for h in old_route}

        skip = 2 * block  # the next session's first step starts past two cached blocks, as the prefix planner sends it
        tokens = [client.step_result("warm", prompt[skip:], skip, GREEDY, 0, route=old_route, prefix=key).token]
        tokens = _continue(client, "warm", old_route, prompt, tokens, 5)
        assert tokens == expected[:6]
        assert servers[2].service.runtime.prefix_cache.available(key) == 0  # the replica holds none of the blocks
        served = [s.service._served for s in servers]

        feeds = _feeds(prompt, tokens)
        feeds[0:1] = [(prompt[:skip], 0, GREEDY, 0), (prompt[skip:], skip, GREEDY, 0)]  # as router/swarm.py sends
        results = client.rebuild("warm-2", "warm", feeds, new_route, (3, 5), len(prompt) + 5, prefix=key)
        assert len(results) == 7
        after = [s.service._served for s in servers]
        # the replica computed the skipped blocks, the rest of the prompt and five decode steps; nobody else did
        assert [b - a for a, b in zip(served, after, strict=True)] == [0, 0, 1 + 1 + 5, 0]
        assert _continue(client, "warm-2", new_route, prompt, tokens, 5) == expected
    finally:
        client.shutdown()
        for server in servers:
            server.service.runtime.prefix_cache = None
