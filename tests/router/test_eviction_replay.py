"""A local session evicted from the runtime between two steps is rebuilt by replaying what fed it, token for token.

The runtime's session store is shared by the node's own requests and other coordinators' (through its peer) and
evicts the least recently used session beyond its bound (serving.max_sessions). Before, the next step of an evicted
local session raised PositionMismatchError: a streamed request died after its 200, a non-streamed one got a 500.
Now LocalPipeline replays the session's feeds (prefill through the prefix cache, decode steps through the batcher
and its chains, speculative verifies and the truncates after them) and the step goes on with the first run's bits;
evicted again and again within one step, the request gets a typed 503 ``overloaded``.
"""

from __future__ import annotations

import pytest
import torch

from openhydra.api.streaming import as_api_error
from openhydra.router.pipeline import LocalPipeline, SessionEvicted
from openhydra.runtime.batching import DecodeBatcher
from openhydra.runtime.prefix_cache import PrefixCache
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import PositionMismatchError, ShardRuntime

GREEDY = SamplingParams()
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
PROMPT = [5 + (11 * j) % 3000 for j in range(45)]
OTHERS = [[7 + j, 300 + j, 41] for j in range(8)]
KEEP = 2  # sessions the runtime keeps in these tests


def _runtime(model_dir, dtype: torch.dtype, batched: bool) -> ShardRuntime:
    rt = ShardRuntime(model_dir, dtype=dtype, max_sessions=KEEP)
    rt.prefix_cache = PrefixCache(rt.layer_types, 64 * 2**20, 16)
    if batched:
        rt.batcher = DecodeBatcher(rt, max_batch=4, window_ms=1.0)
    return rt


def _evict(rt: ShardRuntime, round_: int) -> None:
    """Other coordinators' sessions, one more than the runtime keeps: ours is dropped even where a step of it queued
    ahead on the batcher touches it once meanwhile."""
    with torch.inference_mode():
        for j in range(KEEP + 1):
            ids = OTHERS[(round_ * (KEEP + 1) + j) % len(OTHERS)]
            rt.forward(f"other{round_}-{j}", torch.arange(len(ids)), input_ids=torch.tensor(ids))


def _generate(pipe: LocalPipeline, session: str, n: int, sampling: SamplingParams, evict_at: set[int],
              chained: bool) -> list[int]:
    """The engine's plain decoding (chained: saying how many steps follow, as its Decoder does on a batched
    node), with the session evicted before the steps in ``evict_at``."""
    out = [pipe.step(session, PROMPT, 0, sampling, 0)]
    for k in range(1, n):
        if k in evict_at:
            _evict(pipe.runtime, k)
        more = {"more": n - 1 - k} if chained else {}
        out.append(pipe.step(session, [out[-1]], len(PROMPT) + k - 1, sampling, k, **more))
    pipe.close(session)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batched", [False, True], ids=["plain", "batched"])
def test_an_evicted_session_goes_on_with_the_same_tokens(tiny_model_dirs, dtype, batched) -> None:
    for family in ("llama", "qwen3", "qwen3_5"):  # qwen3_5: recurrent (linear attention) layers too
        rt = _runtime(tiny_model_dirs[family], dtype, batched)
        pipe = LocalPipeline(rt, prefix_block=16)
        try:
            for sampling in (GREEDY, SEEDED):
                alone = _generate(pipe, "alone", 16, sampling, set(), chained=False)
                before = pipe.replays
                evicted = _generate(pipe, "evicted", 16, sampling, {1, 2, 7, 12, 15}, chained=batched)
                assert evicted == alone, (family, sampling)
                assert pipe.replays - before == 5  # each eviction replayed once, none more
                if batched and pipe.chains_steps:  # chains after lone forwards too (not on recurrent layers):
                    # a step queued ahead runs on the evicted cache
                    pipe._step_chains().min_sessions = 1
                    assert _generate(pipe, "ahead", 16, sampling, {2, 7, 12}, chained=True) == alone
                    assert pipe.replays - before == 8 and pipe.chain_stats.found > 0
                    pipe._step_chains().min_sessions = 2
                assert not pipe._fed  # closed sessions leave no history behind
        finally:
            if rt.batcher is not None:
                rt.batcher.close()


def test_verifies_and_truncates_are_replayed_as_they_ran(tiny_model_dirs) -> None:
    """Speculative decoding's steps: per-position and one-pass verifies, each cut back by a truncate; the logits
    after an eviction are those of the session that was never evicted."""
    for batched in (False, True):
        rt = _runtime(tiny_model_dirs["llama"], torch.bfloat16, batched)
        pipe = LocalPipeline(rt, prefix_block=16)
        try:
            results = []
            for name, evict in (("kept", False), ("evicted", True)):
                first = pipe.step(name, PROMPT, 0, GREEDY, 0)
                pos = len(PROMPT)
                per_position = pipe.verify(name, [first, 17, 29, 31], pos, GREEDY, 1)
                pipe.truncate(name, pos + 2)  # two of the four drafts accepted
                one_pass = pipe.verify(name, [44, 45, 46], pos + 2, GREEDY, 3, one_pass=True)
                pipe.truncate(name, pos + 3)
                if evict:
                    _evict(rt, 0)
                nxt = pipe.step_detail(name, [51], pos + 3, GREEDY, 4, logits=True)
                if evict:
                    _evict(rt, 1)
                again = pipe.verify(name, [nxt.token, 60], pos + 4, GREEDY, 5)
                results.append((per_position, one_pass, nxt.logits, again))
                pipe.close(name)
            for kept, evicted in zip(*results, strict=True):
                assert torch.equal(kept, evicted)
            assert pipe.replays == 2
        finally:
            if rt.batcher is not None:
                rt.batcher.close()


def test_evicted_between_two_chunks_of_its_prompt_the_prefill_starts_again(tiny_model_dirs) -> None:
    rt = _runtime(tiny_model_dirs["llama"], torch.float32, batched=False)
    pipe = LocalPipeline(rt, prefill_chunk=16, prefix_block=16)
    prompt = PROMPT + PROMPT[:20]  # 65 positions: five chunks
    alone = _generate_from(pipe, "alone", prompt)
    rt.prefix_cache = None  # (else the retry would start from the blocks the first chunks stored)
    alone_cold = _generate_from(pipe, "cold", prompt)
    forward, calls = rt.forward, []

    def forward_then_evict(session_id, positions, **kw):
        if session_id == "long":
            calls.append(int(positions[0]))
            if calls == [0, 16, 32]:
                _evict(rt, 3)  # after two chunks
        return forward(session_id, positions, **kw)

    rt.forward = forward_then_evict
    assert _generate_from(pipe, "long", prompt) == alone == alone_cold
    assert calls[:6] == [0, 16, 32, 0, 16, 32]  # the third chunk found the session gone: the prompt again
    assert pipe.replays == 1


def _generate_from(pipe: LocalPipeline, session: str, prompt: list[int]) -> list[int]:
    out = [pipe.step(session, prompt, 0, GREEDY, 0)]
    for k in range(1, 6):
        out.append(pipe.step(session, [out[-1]], len(prompt) + k - 1, GREEDY, k))
    pipe.close(session)
    return out


def test_evicted_every_time_it_is_rebuilt_the_request_gets_a_typed_503(tiny_model_dirs) -> None:
    rt = _runtime(tiny_model_dirs["llama"], torch.float32, batched=False)
    pipe = LocalPipeline(rt, prefix_block=16)
    token = pipe.step("s", PROMPT, 0, GREEDY, 0)
    replay = pipe._replay
    rounds = iter(range(100))

    def replay_then_lose_it(session_id: str) -> None:  # another coordinator's sessions land right after
        replay(session_id)
        _evict(rt, next(rounds))

    pipe._replay = replay_then_lose_it
    _evict(rt, 99)
    with pytest.raises(SessionEvicted) as caught:
        pipe.step("s", [token], len(PROMPT), GREEDY, 1)
    assert pipe.replays == LocalPipeline.REPLAYS
    error = as_api_error(caught.value)
    assert (error.status, error.code) == (503, "overloaded")
    assert error.headers.get("Retry-After") == "2"
    # not an eviction (a caller's wrong position on a session that holds positions): raised as before
    pipe._replay = replay
    fresh = pipe.step("t", PROMPT, 0, GREEDY, 0)
    with pytest.raises(PositionMismatchError):
        pipe.step("t", [fresh], len(PROMPT) + 3, GREEDY, 1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_smollm2_evicted_sessions_keep_their_greedy_text(smollm2_dir, dtype) -> None:
    """Real weights, in bf16 and fp32, plain and batched: evicted at three positions, the same greedy tokens as
    never evicted; then with a step queued ahead of its caller on the batcher when the eviction comes."""
    plain = LocalPipeline(_runtime(smollm2_dir, dtype, batched=False), prefix_block=16)
    alone = _generate(plain, "alone", 16, GREEDY, set(), chained=False)
    assert _generate(plain, "evicted", 16, GREEDY, {1, 6, 12}, chained=False) == alone
    assert plain.replays == 3
    rt = _runtime(smollm2_dir, dtype, batched=True)
    pipe = LocalPipeline(rt, prefix_block=16)
    try:
        assert _generate(pipe, "evicted", 16, GREEDY, {1, 6, 12}, chained=True) == alone
        assert pipe.replays == 3
        pipe._step_chains().min_sessions = 1  # chains after lone forwards: the batcher runs a step ahead
        assert _generate(pipe, "ahead", 16, GREEDY, {2, 7, 12}, chained=True) == alone
        assert pipe.replays == 6 and pipe.chain_stats.found > 0
    finally:
        rt.batcher.close()
