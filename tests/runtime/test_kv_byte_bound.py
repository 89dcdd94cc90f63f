"""The runtime's sessions are bounded in bytes of KV cache (serving.max_kv_mb), not only in number.

Before, 64 sessions of any length were kept: a red team's long prompts left ~167 MiB of SmolLM2 cache each (64 of
them ~10 GiB). Now the store measures each session's cache (its tensors' storages) and, after a step, evicts the
least recently used other sessions while the total is over the bound; the coordinators of evicted sessions replay
them, so requests keep their tokens (router/pipeline.py LocalPipeline, tests/router/test_eviction_replay.py).
"""

from __future__ import annotations

import pytest
import torch

from openhydra.router.pipeline import LocalPipeline
from openhydra.runtime.kv_layer import _capacity
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.serving import ServingConfig, ServingStatus, apply_serving
from openhydra.runtime.sessions import cache_nbytes
from openhydra.runtime.shard import ShardRuntime

GREEDY = SamplingParams()


def _feed(rt: ShardRuntime, session: str, start: int, n: int) -> None:
    hidden = torch.randn(n, rt.hidden_size, generator=torch.Generator().manual_seed(n)).to(rt.dtype)
    inputs = {"input_ids": torch.arange(3, 3 + n) % 500} if rt.is_first else {"hidden_states": hidden}
    with torch.inference_mode():
        rt.forward(session, torch.arange(start, start + n), **inputs)


def _per_position(rt: ShardRuntime) -> int:
    """Bytes one position of a full-attention span's cache takes: K and V of every layer."""
    cfg = rt.shard_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.empty((), dtype=rt.dtype).element_size()
    return 2 * cfg.num_key_value_heads * head_dim * itemsize * (rt.end - rt.start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_cache_measures_what_its_buffers_hold(tiny_model_dirs, dtype) -> None:
    rt = ShardRuntime(tiny_model_dirs["llama"], 2, 6, dtype=dtype)
    _feed(rt, "s", 0, 70)
    session = rt._sessions.get("s")
    assert cache_nbytes(session.cache) == _capacity(70) * _per_position(rt)  # the buffers, views counted once
    for k in range(5):
        _feed(rt, "s", 70 + k, 1)
    assert cache_nbytes(session.cache) == _capacity(70) * _per_position(rt)  # appended inside the spare room
    hybrid = ShardRuntime(tiny_model_dirs["qwen3_5"], dtype=dtype)  # recurrent states count too
    _feed(hybrid, "h", 0, 9)
    states = cache_nbytes(hybrid._sessions.get("h").cache)
    assert states > 0
    _feed(hybrid, "h", 9, 1)
    assert cache_nbytes(hybrid._sessions.get("h").cache) >= states


def test_over_the_bound_the_least_recently_used_others_go(tiny_model_dirs) -> None:
    rt = ShardRuntime(tiny_model_dirs["llama"], dtype=torch.float32)
    one = _capacity(100) * _per_position(rt)  # a 100-position session's bytes
    apply_serving(ServingConfig.parse({"max_kv_mb": 2.5 * one / 2**20, "prefix_cache": {"enabled": False}}), rt)
    store = rt._sessions
    assert store.max_bytes == int(2.5 * one)
    for name in ("a", "b"):
        _feed(rt, name, 0, 100)
    assert store.nbytes == 2 * one and store.evicted_for_bytes == 0
    _feed(rt, "a", 100, 1)  # a is now the most recently used
    _feed(rt, "c", 0, 100)  # three do not fit: b, the least recently used, goes
    assert store.ids() == ["a", "c"] and store.nbytes == 2 * one and store.evicted_for_bytes == 1
    status = ServingStatus(rt).network_status()["sessions"]
    assert status == {"held": 2, "max": 64, "kv_bytes": 2 * one, "max_kv_bytes": int(2.5 * one),
                      "evicted_for_bytes": 1}
    assert "openhydra_kv_cache_bytes " + str(2 * one) in ServingStatus(rt).metrics_text()
    # one session longer than the whole bound: everyone else goes, it stays (it cannot be served smaller)
    _feed(rt, "long", 0, 400)
    assert store.ids() == ["long"] and store.nbytes == cache_nbytes(rt._sessions.get("long").cache) > store.max_bytes
    # counted bytes follow every way a session leaves: closed, dropped, idle
    rt.close_session("long")
    assert store.nbytes == 0 and len(store) == 0


def test_the_count_is_measured_again_as_a_session_grows(tiny_model_dirs) -> None:
    rt = ShardRuntime(tiny_model_dirs["llama"], dtype=torch.float32)
    rt._sessions.bound_bytes(10**9)
    _feed(rt, "s", 0, 10)
    session = rt._sessions.get("s")
    assert (session.measured_at, session.nbytes) == (10, _capacity(10) * _per_position(rt))
    for k in range(63):
        _feed(rt, "s", 10 + k, 1)
    assert session.measured_at == 10  # not yet due (64 positions more)
    _feed(rt, "s", 73, 1)
    assert session.measured_at == 74 and session.nbytes == cache_nbytes(session.cache) == rt._sessions.nbytes


def test_sessions_evicted_for_bytes_keep_their_tokens(tiny_model_dirs) -> None:
    """Two generations taking turns on a runtime whose byte bound holds one of them: each step of one evicts the
    other, which replays when its turn comes. Both give the tokens they give alone. (Run at once on two threads,
    such a pair can evict each other inside each replay of a step: after LocalPipeline.REPLAYS, that request gets
    a 503 overloaded, as in tests/router/test_eviction_replay.py: a working set over the bound thrashes.)"""
    rt = ShardRuntime(tiny_model_dirs["llama"], dtype=torch.bfloat16)
    pipe = LocalPipeline(rt)
    prompts = {"x": [5 + 3 * j for j in range(40)], "y": [9 + 7 * j for j in range(33)]}
    n = 12

    def generate(names: list[str]) -> dict[str, list[int]]:
        out = {name: [pipe.step(name, prompts[name], 0, GREEDY, 0)] for name in names}
        for k in range(1, n):
            for name in names:
                out[name].append(pipe.step(name, [out[name][-1]], len(prompts[name]) + k - 1, GREEDY, k))
        for name in names:
            pipe.close(name)
        return out

    alone = {**generate(["x"]), **generate(["y"])}
    assert pipe.replays == 0
    rt._sessions.bound_bytes(int(1.5 * _capacity(52) * _per_position(rt)))  # room for one session, not two
    assert generate(["x", "y"]) == alone
    assert rt._sessions.evicted_for_bytes >= 2 * n - 1 and pipe.replays >= 2 * n - 2
