"""A coordinator client on its node's peer-server loop (``PeerChainClient(loop=...)``), and its steps to the node's own
span handed over on that loop (``serve_locally``, peer/local_stream.py): what ``openhydra-node`` does.

gRPC's poller wakes every event loop that uses gRPC in a process and hands the other loops' events over from the one
that took the wake-up, so a node runs its client and its peer server on one loop. These tests check that a chain driven
that way decodes exactly, that a blocking call made on that loop fails at once instead of waiting for itself, that
closing the client leaves the server serving, and that a local first hop decodes exactly, through the same sealing
and checks, and reports an aborted stream as gRPC would.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.errors import HopError
from openhydra.peer.local_stream import LocalStream
from openhydra.peer.messages import HopSpec
from openhydra.peer.outbound import OutboundStream
from openhydra.peer.privacy import ChainPrivacy
from openhydra.peer.server import PeerServer
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime
from tests.peer.privacy_helpers import start_keyed_peers
from tests.peer.test_pipeline_grpc import _hf_greedy, _prompt

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


# ---- steps to this process's own span without gRPC (peer/local_stream.py) ---------------------------------------

KEYED_SPLITS = [(0, 2), (2, 5), (5, 8)]


@pytest.fixture(scope="module")
def keyed(tiny_model_dirs):
    started, route = start_keyed_peers(tiny_model_dirs["qwen3_5"], KEYED_SPLITS)
    yield started, route
    for server in started:
        server.stop()


def _local_client(keyed, privacy: ChainPrivacy, embedder) -> PeerChainClient:
    started, route = keyed
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0), privacy=privacy,
                             embedder=embedder, loop=started[0].loop)
    client.serve_locally(route[0].address, started[0].service)
    return client


@pytest.mark.parametrize("privacy", [ChainPrivacy(encrypt=True), ChainPrivacy(encrypt=True, onion=True)],
                         ids=["encrypted", "onion"])
def test_local_first_hop_decodes_exactly_through_the_same_checks(tiny_model_dirs, keyed, privacy) -> None:
    started, route = keyed
    embedder = load_embedder(tiny_model_dirs["qwen3_5"])
    client = _local_client(keyed, privacy, embedder)
    session = f"local-{privacy.onion}"
    served = [s.service._served for s in started]
    try:
        prompt = _prompt(seed=4)
        tokens = []
        feed, pos = prompt, 0
        for step in range(10):
            tokens.append(client.step(session, feed, pos, SamplingParams(), step))
            pos += len(feed)
            feed = [tokens[-1]]
        assert isinstance(client._streams[(session, route[0].address)], LocalStream)  # the first hop: no gRPC
        assert all(type(s) is OutboundStream for key, s in client._streams.items() if key[1] != route[0].address)
        assert tokens == _hf_greedy(tiny_model_dirs["qwen3_5"], prompt, 10)
        assert [s.service._served - n for s, n in zip(started, served, strict=True)] == [10, 10, 10]
        assert all(not s.service.crypto_rejections for s in started)  # sealed for the first hop and opened by it
        client.close(session)
        assert all(client.info(hop.address).active_sessions == 0 for hop in route)
        assert (session, route[0].address) not in client._streams
    finally:
        client.shutdown()


def test_local_first_hop_reports_an_abort_as_grpc_would_and_reopens(keyed) -> None:
    """The first hop requires encryption; plaintext steps are aborted with DATA_LOSS. Through a local stream the
    coordinator gets the same HopError as through gRPC, twice in a row on one session (the stream reopens)."""
    started, route = keyed
    errors = {}
    for name, client in (("grpc", PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0))),
                         ("local", _local_client(keyed, ChainPrivacy(), None))):
        try:
            rejected = started[0].service.crypto_rejections.get("plaintext", 0)
            for attempt in range(2):
                with pytest.raises(HopError) as err:
                    client.step(f"plain-{name}", [5, 6, 7], 0, SamplingParams(), 0)
                errors[name, attempt] = (err.value.address, err.value.code)
            assert started[0].service.crypto_rejections["plaintext"] == rejected + 2
            if name == "local":
                assert isinstance(client._streams[("plain-local", route[0].address)], LocalStream)
        finally:
            client.shutdown()
    assert set(errors.values()) == {(route[0].address, grpc.StatusCode.DATA_LOSS)}


def test_serve_locally_needs_the_shared_loop(keyed) -> None:
    started, route = keyed
    client = PeerChainClient(route)
    try:
        with pytest.raises(ValueError, match="peer server's loop"):
            client.serve_locally(route[0].address, started[0].service)
    finally:
        client.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_local_first_hop_gives_the_grpc_paths_logits_on_smollm2(smollm2_dir, dtype) -> None:
    """Real SmolLM2 weights in three spans, encrypted (the node's default): 12 greedy steps with the first hop local
    and the same steps over gRPC give the same logits, bit for bit."""
    started, route = start_keyed_peers(smollm2_dir, [(0, 10), (10, 20), (20, 30)], dtype=dtype)
    embedder = load_embedder(smollm2_dir, dtype)
    clients = {"local": PeerChainClient(route, tunables=ClientTunables(step_timeout_s=60.0),
                                        privacy=ChainPrivacy(encrypt=True), embedder=embedder, loop=started[0].loop),
               "grpc": PeerChainClient(route, tunables=ClientTunables(step_timeout_s=60.0),
                                       privacy=ChainPrivacy(encrypt=True), embedder=embedder)}
    clients["local"].serve_locally(route[0].address, started[0].service)
    prompt = [1, 504, 3458, 282, 260, 5675, 30, 378, 314, 260, 1488, 42, 1127]
    try:
        runs = {}
        for name, client in clients.items():
            logits, feed, pos = [], prompt, 0
            for step in range(12):
                result = client.step_result(name, feed, pos, SamplingParams(), step, return_logits=True)
                logits.append(result.logits)
                if step == 0:  # the first hop's stream: in process for one client, gRPC for the other
                    kind = LocalStream if name == "local" else OutboundStream
                    assert type(client._streams[(name, route[0].address)]) is kind
                pos += len(feed)
                feed = [result.token]
            client.close(name)
            runs[name] = logits
        assert all(torch.equal(a, b) for a, b in zip(runs["local"], runs["grpc"], strict=True))
        assert all(not s.service.crypto_rejections for s in started)
    finally:
        for client in clients.values():
            client.shutdown()
        for server in started:
            server.stop()
