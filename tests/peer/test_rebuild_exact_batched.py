"""Failover is exact under continuous batching, on real SmolLM2 weights in bf16 and fp32.

A session fails over mid-generation from one replica of the middle span to the other, by a rebuild (only the
replacement recomputes, from the activations the hop before it kept) or by a full replay of the session on the new
chain. Every peer runs ``serving=batched`` (decode steps are rows of padded batched forwards, runtime/batching.py)
and another session decodes alongside. The logits of every step after the failover must equal, bit for bit, those
of the same session without a fault: the replacement's cache must hold what the failed peer's held.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.server import PeerServer
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.serving import ServingConfig, apply_serving
from openhydra.runtime.shard import ShardRuntime

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SPLITS = [(0, 10), (10, 20), (10, 20), (20, 30)]  # the middle span twice: the replica replaces the failed one
GREEDY = SamplingParams()
TUNABLES = ClientTunables(step_timeout_s=60.0, prefill_chunk=8)  # a 13-token prompt is two messages
BEFORE, AFTER = 6, 6  # decode steps before and after the failover
PROMPT = [1, 504, 3458, 282, 260, 5675, 30, 378, 314, 260, 1488, 42, 1127]


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def peers(request, smollm2_dir) -> Iterator[list[PeerServer]]:
    servers = []
    try:
        for a, b in SPLITS:
            runtime = ShardRuntime(smollm2_dir, a, b, dtype=getattr(torch, request.param))
            apply_serving(ServingConfig.parse({"batching": {"max_batch": 8, "window_ms": 2.0}}), runtime)
            assert runtime.batcher is not None and runtime.prefix_cache is not None
            server = PeerServer(runtime)
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.stop()


def _hops(servers: list[PeerServer], replica: bool):
    from openhydra.peer.messages import HopSpec

    chosen = [servers[0], servers[2] if replica else servers[1], servers[3]]
    return [HopSpec(address=s.address, start=s.runtime.start, end=s.runtime.end) for s in chosen]


def _step(client: PeerChainClient, sid: str, route, tokens: list[int], start: int, step: int):
    result = client.step_result(sid, tokens, start, GREEDY, step, return_logits=True, route=route)
    return result.token, result.logits


def _run(client: PeerChainClient, sid: str, route, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    token, logits = _step(client, sid, route, PROMPT, 0, 0)
    tokens, all_logits = [token], [logits]
    for i in range(steps):
        token, logits = _step(client, sid, route, [tokens[-1]], len(PROMPT) + i, i + 1)
        tokens.append(token)
        all_logits.append(logits)
    return tokens, all_logits


def _feeds(tokens: list[int]) -> list[tuple[list[int], int, SamplingParams, int]]:
    feeds = [(PROMPT, 0, GREEDY, 0)]
    for i, token in enumerate(tokens[:-1]):
        feeds.append(([token], len(PROMPT) + i, GREEDY, i + 1))
    return feeds


@pytest.mark.parametrize("how", ["rebuild", "replay"])
def test_failover_under_batching_is_bit_exact(peers, how) -> None:
    servers = peers
    client = PeerChainClient([], tunables=TUNABLES)
    stop = threading.Event()
    errors: list[BaseException] = []

    def alongside() -> None:  # another user's session on the same peers, decoding while the failover happens
        try:
            n = 0
            while not stop.is_set():
                _run(client, f"other-{how}-{n}", _hops(servers, replica=n % 2 == 1), 4)
                client.close(f"other-{how}-{n}", route=_hops(servers, replica=n % 2 == 1))
                n += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    try:
        expected_tokens, expected = _run(client, f"ref-{how}", _hops(servers, replica=False), BEFORE + AFTER)
        worker = threading.Thread(target=alongside, daemon=True)
        worker.start()
        sid, old_route, new_route = f"s-{how}", _hops(servers, replica=False), _hops(servers, replica=True)
        tokens, _ = _run(client, sid, old_route, BEFORE)
        assert tokens == expected_tokens[: BEFORE + 1]
        length = len(PROMPT) + BEFORE  # positions every hop holds: the prompt and BEFORE decoded tokens
        if how == "rebuild":
            new_sid = f"{sid}-2"
            client.rebuild(new_sid, sid, _feeds(tokens), new_route, (10, 20), length)
            assert servers[2].runtime.session_length(new_sid) == length  # the replica computed the history
        else:
            new_sid = f"{sid}-replayed"
            client.replay(new_sid, _feeds(tokens), new_route)
        got = []
        for i in range(BEFORE, BEFORE + AFTER):
            token, logits = _step(client, new_sid, new_route, [tokens[-1]], len(PROMPT) + i, i + 1)
            tokens.append(token)
            got.append(logits)
        stop.set()
        worker.join(timeout=120)
        assert not errors, errors
        batched = [s.runtime.batcher.stats.max_seen for s in servers]
        print(f"\nlargest batch per peer (sessions in one forward): {batched}")
        assert all(s.runtime.batcher.stats.steps > 0 for s in servers)  # every decode step went through a batcher
        assert tokens == expected_tokens
        for i, (a, b) in enumerate(zip(got, expected[BEFORE + 1:], strict=True)):
            assert torch.equal(a, b), f"step {BEFORE + 1 + i}: max |diff| {float((a - b).abs().max())}"
    finally:
        stop.set()
        client.shutdown()
