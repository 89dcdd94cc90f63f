"""A coordinator client on its node's peer-server loop (``PeerChainClient(loop=...)``, what ``openhydra-node`` does).

gRPC's poller wakes every event loop that uses gRPC in a process and hands the other loops' events over from the one
that took the wake-up, so a node runs its client and its peer server on one loop. These tests check that a chain driven
that way decodes exactly, that a blocking call made on that loop fails at once instead of waiting for itself, and that
closing the client leaves the server serving.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.messages import HopSpec
from openhydra.peer.server import PeerServer
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime

SPLITS = [(0, 3), (3, 8)]


def _generate(client: PeerChainClient, session: str, prompt: list[int], n: int) -> list[int]:
    tokens, feed, pos = [], prompt, 0
    for step in range(n):
        token = client.step(session, feed, pos, SamplingParams(), step)
        tokens.append(token)
        pos += len(feed)
        feed = [token]
    client.close(session)
    return tokens


@pytest.fixture(scope="module")
def servers(tiny_model_dirs):
    started = [PeerServer(ShardRuntime(tiny_model_dirs["llama"], a, b, dtype=torch.float32)) for a, b in SPLITS]
    route = [HopSpec(address=s.start(), start=a, end=b) for s, (a, b) in zip(started, SPLITS, strict=True)]
    yield started, route
    for server in started:
        server.stop()


def test_client_on_the_servers_loop_decodes_exactly_and_starts_no_thread(tiny_model_dirs, servers) -> None:
    started, route = servers
    prompt = torch.randint(3, 4000, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                  do_sample=False)[0, len(prompt):].tolist()
    threads_before = {t.ident for t in threading.enumerate()}
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0), loop=started[0].loop)
    try:
        assert client.shares_loop
        assert {t.ident for t in threading.enumerate()} - threads_before == set()  # no loop thread of its own
        assert _generate(client, "shared", prompt, 12) == expected
        own = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0))  # the default: its own loop
        try:
            assert not own.shares_loop
            assert _generate(own, "own", prompt, 12) == expected
        finally:
            own.shutdown()
    finally:
        client.shutdown()


def test_a_blocking_call_on_the_shared_loop_fails_at_once_and_shutdown_keeps_the_server(servers) -> None:
    started, route = servers
    loop = started[0].loop
    client = PeerChainClient(route, loop=loop)

    async def blocking_call_on_the_loop() -> None:
        client.info(route[1].address)  # would wait for this very thread: refused

    with pytest.raises(RuntimeError, match="cannot run on the event loop"):
        asyncio.run_coroutine_threadsafe(blocking_call_on_the_loop(), loop).result(timeout=10)
    assert client.info(route[1].address).end == SPLITS[1][1]  # from another thread it works
    client.shutdown()
    assert loop.is_running() and started[0].loop is loop  # the server's loop goes on
    after = PeerChainClient(route)
    try:
        assert _generate(after, "after", [5, 6, 7, 8], 4) and after.info(route[0].address).active_sessions == 0
    finally:
        after.shutdown()
