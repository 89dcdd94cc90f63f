"""Radix prefix cache: hits give the cold outputs, the byte bound holds, nothing past a prefix leaks."""

from __future__ import annotations

import pytest
import torch

from openhydra.router.pipeline import LocalPipeline
from openhydra.runtime.prefix_cache import PrefixCache, PrefixKey, block_hashes
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import PositionMismatchError, ShardRuntime

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(pipe: LocalPipeline, session: str, prompt: list[int], n: int, chained: bool = False) -> list[int]:
    """``n`` greedy tokens; ``chained``: each decode step says how many more will follow, as plain decoding does
    (the batcher queues them itself: runtime/step_chain.py)."""
    out: list[int] = []
    feed, pos = prompt, 0
    for step in range(n):
        more = {"more": n - 1 - step} if chained and step else {}
        token = pipe.step(session, feed, pos, GREEDY, step, **more)
        pos += len(feed)
        feed = [token]
        out.append(token)
    pipe.close(session)
    return out


def _cached(model_dir, max_bytes: int = 64 << 20) -> ShardRuntime:
    rt = ShardRuntime(model_dir)
    rt.prefix_cache = PrefixCache(rt.layer_types, max_bytes)
    return rt


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_5"])
def test_hit_gives_the_cold_output(tiny_model_dirs, family) -> None:
    shared = _ids(80, 1)  # a "system prompt" of 5 blocks
    first, second = shared + _ids(9, 2), shared + _ids(12, 3)
    cold = LocalPipeline(ShardRuntime(tiny_model_dirs[family]), prefix_block=BLOCK)
    expected = _generate(cold, "cold", second, 8)

    warm_rt = _cached(tiny_model_dirs[family])
    warm = LocalPipeline(warm_rt, prefix_block=BLOCK)
    _generate(warm, "a", first, 4)
    assert warm.reused_positions == 0
    assert _generate(warm, "b", second, 8) == expected
    assert warm.reused_positions == 80  # every shared block, nothing more
    assert warm_rt.prefix_cache.stats.hits == 1


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_hit_logits_match_a_cold_run(tiny_model_dirs, family) -> None:
    """Logits of the first generated position: a hit equals a cold run with the same caching (bit-exact on
    recurrent spans, which run both in block pieces), and a plain one-shot run within float noise."""
    prompt = _ids(70, 4)
    key = PrefixKey(tuple(block_hashes(prompt, BLOCK, b"k" * 32)), BLOCK)
    rt = _cached(tiny_model_dirs[family])
    ids = torch.tensor(prompt)
    cold = rt.forward("cold", torch.arange(70), input_ids=ids, prefix=key)
    assert rt.prefix_cache.available(key) == 64
    warm = rt.forward("warm", torch.arange(64, 70), input_ids=ids[64:], prefix=key)
    assert rt.session_length("warm") == 70
    plain = ShardRuntime(tiny_model_dirs[family]).forward("p", torch.arange(70), input_ids=ids)
    if family == "qwen3_5":
        assert torch.equal(warm, cold)
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-5)
    torch.testing.assert_close(warm, plain, rtol=0, atol=1e-4)
    assert int(warm.argmax()) == int(plain.argmax())


def test_seed_refuses_more_than_it_holds(tiny_model_dirs) -> None:
    rt = _cached(tiny_model_dirs["llama"])
    prompt = _ids(50, 5)
    key = PrefixKey(tuple(block_hashes(prompt, BLOCK, b"s" * 32)), BLOCK)
    rt.forward("a", torch.arange(40), input_ids=torch.tensor(prompt[:40]), prefix=key)  # fills 2 blocks
    assert rt.prefix_cache.available(key) == 32
    with pytest.raises(PositionMismatchError) as info:
        rt.forward("b", torch.arange(48, 50), input_ids=torch.tensor(prompt[48:]), prefix=key)
    assert (info.value.expected, info.value.got) == (32, 48)
    assert rt.session_length("b") == 0  # refused before anything was seeded
    other = PrefixKey(tuple(block_hashes(prompt, BLOCK, b"t" * 32)), BLOCK)  # another coordinator's secret
    assert rt.prefix_cache.available(other) == 0


def test_lru_bound_is_honoured(tiny_model_dirs) -> None:
    probe = _cached(tiny_model_dirs["llama"])
    prompt = _ids(33, 6)
    probe.forward("x", torch.arange(33), input_ids=torch.tensor(prompt),
                  prefix=PrefixKey(tuple(block_hashes(prompt, BLOCK, b"p" * 32)), BLOCK))
    per_block = probe.prefix_cache.nbytes // 2
    rt = _cached(tiny_model_dirs["llama"], max_bytes=per_block * 5)
    pipe = LocalPipeline(rt, prefix_block=BLOCK)
    prompts = [_ids(40, 100 + i) for i in range(6)]  # 2 blocks each: 12 blocks for room of 5
    for i, p in enumerate(prompts):
        _generate(pipe, f"s{i}", p, 1)
        assert rt.prefix_cache.nbytes <= per_block * 5
    assert len(rt.prefix_cache) == 5 and rt.prefix_cache.stats.evicted_blocks == 7
    _generate(pipe, "recent", prompts[-1], 1)
    assert pipe.reused_positions == 32  # the most recent prompt survived
    _generate(pipe, "old", prompts[0], 1)
    assert pipe.reused_positions == 32  # the oldest was evicted: no hit


def test_no_continuation_leaks(tiny_model_dirs) -> None:
    rt = _cached(tiny_model_dirs["qwen3"])
    pipe = LocalPipeline(rt, prefix_block=BLOCK)
    prompt = _ids(40, 7)  # 2 full blocks (32 positions) + 8 tokens
    continuation = _generate(pipe, "a", prompt, 30)
    assert len(rt.prefix_cache) == 2  # only prompt blocks: nothing generated was stored
    # A request whose prompt *is* the other's prompt plus its continuation reuses only the prompt's
    # blocks (32 positions), then must compute the rest itself, and matches a cold run.
    extended = prompt + continuation[:20]
    cold = _generate(LocalPipeline(ShardRuntime(tiny_model_dirs["qwen3"]), prefix_block=BLOCK), "c", extended, 5)
    assert _generate(pipe, "b", extended, 5) == cold
    assert pipe.reused_positions == 32


# ---- over the wire: every hop agrees on the reused length ---------------------------------------------

SPLITS = [(0, 3), (3, 5), (5, 8)]


@pytest.fixture(scope="module", params=["llama", "qwen3_5"])
def chain(request, tiny_model_dirs):
    from openhydra.peer.client import ClientTunables, PeerChainClient
    from openhydra.peer.messages import HopSpec
    from openhydra.peer.server import PeerServer

    servers = []
    for a, b in SPLITS:
        rt = ShardRuntime(tiny_model_dirs[request.param], a, b)
        rt.prefix_cache = PrefixCache(rt.layer_types, 64 << 20)
        servers.append(PeerServer(rt))
    route = [HopSpec(address=s.start(), start=a, end=b) for s, (a, b) in zip(servers, SPLITS, strict=True)]
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=30.0, prefill_chunk=48))
    yield servers, client
    client.shutdown()
    for s in servers:
        s.stop()


def _chain_generate(client, planner, session: list[str], prompt: list[int], n: int) -> list[int]:
    """Greedy tokens; the first step goes through the planner (seed + restart protocol)."""

    def send(skip, key):
        return client.step_result(session[0], prompt[skip:], skip, GREEDY, 0, prefix=key)

    def restart():
        client.close(session[0])
        session[0] += "-r"

    tokens = [planner.first_step(prompt, send, restart).token if planner else
              client.step_result(session[0], prompt, 0, GREEDY, 0).token]
    pos = len(prompt)
    for step in range(1, n):
        tokens.append(client.step_result(session[0], [tokens[-1]], pos, GREEDY, step).token)
        pos += 1
    client.close(session[0])
    return tokens


def test_chain_reuses_the_prefix_every_hop_holds(chain) -> None:
    from openhydra.router.prefix_plan import PrefixPlanner

    servers, client = chain
    planner = PrefixPlanner(block=BLOCK)
    shared = _ids(80, 11)
    a, b, c = shared + _ids(7, 12), shared + _ids(20, 13), shared + _ids(5, 14)
    cold_b = _chain_generate(client, None, ["cold-b"], b, 6)
    cold_c = _chain_generate(client, None, ["cold-c"], c, 6)

    _chain_generate(client, planner, ["a"], a, 3)  # fills every hop's cache (prompt crosses 2 chunks)
    assert planner.reused_positions == 0
    assert _chain_generate(client, planner, ["b"], b, 6) == cold_b
    assert planner.reused_positions == 80 and planner.restarts == 0

    # The middle hop loses its cache: it refuses the proposed 80 positions (expected 0), the session
    # restarts from 0 on every hop, and the output is still the cold one.
    servers[1].runtime.prefix_cache.clear()
    assert _chain_generate(client, planner, ["c"], c, 6) == cold_c
    assert planner.restarts == 1 and planner.reused_positions == 80
    assert all(s.runtime.session_count() == 0 for s in servers)  # the half-built session was closed too


def test_malformed_prefix_hashes_are_refused(chain) -> None:
    import grpc

    from openhydra.peer.proto import peer_pb2 as pb
    from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
    from openhydra.peer.wire import encode_tensor

    servers, client = chain
    hops = [pb.Hop(address=s.address, start=a, end=b) for s, (a, b) in zip(servers, SPLITS, strict=True)]
    for hashes, block in [([b"short"], 16), ([b"x" * 32], 0), ([b"x" * 32] * 5000, 16)]:
        step = pb.Step(session_id="bad", seq=0, start_position=0, num_positions=3, route=hops,
                       tensor=encode_tensor(torch.tensor([5, 6, 7])), reply_to=client.reply_address,
                       prefix_hashes=hashes, prefix_block=block)
        with grpc.insecure_channel(servers[0].address) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.PeerStub(channel).Forward(iter([step]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefix" in info.value.details()
    assert servers[0].runtime.session_count() == 0
