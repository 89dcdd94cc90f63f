"""KV compaction wired into ``ShardRuntime``: each span compacts its own full-attention layers.

Phase 4 on tiny Llama and the tiny Qwen3.5 hybrid generates past 4x the threshold with a bounded cache
(also split over two in-process shards), ratio 1.0 equals ``compaction=off`` exactly, prefill-mode
compaction keeps positions exact, and phase-3 budgets are read by global layer index.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openhydra.runtime.compaction import CompactedLayer, CompactionConfig
from openhydra.runtime.shard import PositionMismatchError, ShardRuntime

THRESHOLD = 32
PROMPT = 20
STEPS = 4 * THRESHOLD - PROMPT + 24  # 20 + 132 = 152 positions: past 4x the threshold


def _prompt() -> torch.Tensor:
    return torch.randint(10, 2000, (PROMPT,), generator=torch.Generator().manual_seed(3))


def _generate(shards: list[ShardRuntime], sid: str, steps: int, on_step=None) -> list[torch.Tensor]:
    """Greedy decoding through a pipeline of in-process shards; returns each step's logits [V]."""
    ids, position, out = _prompt(), 0, []
    for _ in range(steps + 1):
        positions = torch.arange(position, position + ids.numel())
        h = shards[0].forward(sid, positions, input_ids=ids)
        for shard in shards[1:]:
            h = shard.forward(sid, positions, hidden_states=h)
        out.append(h[-1])
        position += ids.numel()
        ids = h[-1].argmax().view(1)
        if on_step is not None:
            on_step(position)
    return out


def _session(rt: ShardRuntime, sid: str):
    session = rt._sessions.get(sid)
    assert session is not None
    return session


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_phase4_runtime_stays_bounded_past_4x_threshold(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    cfg = CompactionConfig(mode="auto", phase=4, ratio=0.5, threshold_tokens=THRESHOLD, max_queries=32)
    model_dir = tiny_model_dirs[family]
    shards = [ShardRuntime(model_dir, 0, 5, compaction=cfg), ShardRuntime(model_dir, 5, 8, compaction=cfg)]
    linear_before = {}
    trace: dict[int, list[dict[str, int]]] = {0: [], 1: []}

    def on_step(position: int) -> None:
        for k, shard in enumerate(shards):
            stats = shard.compaction.stats(_session(shard, "s"))
            assert stats["positions"] == position  # the session counts positions, not cache entries
            trace[k].append(stats)

    logits = _generate(shards, "s", STEPS, on_step)
    assert all(torch.isfinite(x).all() for x in logits)
    for k, shard in enumerate(shards):
        session = _session(shard, "s")
        assert session.length == PROMPT + STEPS > 4 * THRESHOLD
        assert max(s["longest_layer_tokens"] for s in trace[k]) <= THRESHOLD  # compacted once past it
        assert trace[k][-1]["compactions"] >= 4  # again and again
        sizes = [s["kv_bytes"] for s in trace[k]]
        half = len(sizes) // 2
        assert max(sizes[half:]) <= max(sizes[:half])  # memory flat
        # only this span's full-attention layers were compacted; linear-attention layers keep their state
        for i, (layer, kind) in enumerate(zip(session.cache.layers, shard.layer_types, strict=True)):
            if kind == "full_attention":
                assert isinstance(layer, CompactedLayer), (k, i)
                assert layer.get_seq_length() <= THRESHOLD
            else:
                assert not isinstance(layer, CompactedLayer)
                linear_before[(k, i)] = type(layer).__name__
    if family == "qwen3_5":
        assert linear_before  # the hybrid really has linear-attention layers in both spans
    # the coordinator's absolute positions are still checked exactly after compaction: feeding the last
    # position again is refused, the next one is taken
    with pytest.raises(PositionMismatchError):
        shards[0].forward("s2", torch.tensor([3]), input_ids=torch.tensor([5]))
    h = shards[0].forward("s", torch.tensor([PROMPT + STEPS]), input_ids=torch.tensor([5]))
    with pytest.raises(PositionMismatchError):
        shards[1].forward("s", torch.tensor([PROMPT + STEPS - 1]), hidden_states=h)


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_ratio_one_equals_compaction_off(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs[family]
    cfg = CompactionConfig(mode="auto", phase=4, ratio=1.0, threshold_tokens=16, max_queries=16)
    on = _generate([ShardRuntime(model_dir, 0, 3, compaction=cfg), ShardRuntime(model_dir, 3, 8, compaction=cfg)],
                   "s", 48)
    off = _generate([ShardRuntime(model_dir, 0, 3), ShardRuntime(model_dir, 3, 8)], "s", 48)
    assert len(on) == len(off) == 49
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)


def test_prefill_mode_compacts_the_prompt_once(tiny_model_dirs: dict[str, Path]) -> None:
    cfg = CompactionConfig(mode="prefill", phase=2, ratio=0.5)
    rt = ShardRuntime(tiny_model_dirs["llama"], compaction=cfg)
    prompt = _prompt()
    rt.forward("p", torch.arange(0, 12), input_ids=prompt[:12])  # the prompt in two chunks
    rt.forward("p", torch.arange(12, PROMPT), input_ids=prompt[12:])
    session = _session(rt, "p")
    assert session.compaction.compactions == 0  # chunks of a prompt are not compacted one by one
    logits = rt.forward("p", torch.tensor([PROMPT]), input_ids=torch.tensor([7]))
    assert torch.isfinite(logits).all()
    assert session.compaction.compactions == 1 and session.length == PROMPT + 1
    assert all(layer.get_seq_length() == PROMPT // 2 + 1 for layer in session.cache.layers)
    for position in range(PROMPT + 1, PROMPT + 6):
        rt.forward("p", torch.tensor([position]), input_ids=torch.tensor([9]))
    assert session.compaction.compactions == 1
    # a rollback may crop what came after the compaction, not into the compacted block
    rt.truncate_session("p", PROMPT + 2)
    assert session.cache.layers[0].get_seq_length() == PROMPT // 2 + 2
    with pytest.raises(NotImplementedError, match="compacted"):
        rt.truncate_session("p", PROMPT - 4)


def test_phase3_budgets_are_sliced_by_global_layer(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    budgets = {"format": "openhydra-kv-budgets/1", "unit": "tokens",
               "layers": {"2": [3, 5], "4": [7, 2], "6": [4, 4]}}
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps(budgets))
    cfg = CompactionConfig(mode="prefill", phase=3, ratio=0.5, budgets_path=str(path))
    rt = ShardRuntime(tiny_model_dirs["llama"], 4, 8, compaction=cfg)  # global layers 4..7 = local 0..3
    h = torch.randn(PROMPT, rt.hidden_size, generator=torch.Generator().manual_seed(0))
    rt.forward("b", torch.arange(PROMPT), hidden_states=h)
    rt.forward("b", torch.tensor([PROMPT]), hidden_states=h[:1])
    layers = _session(rt, "b").cache.layers
    assert layers[0].live_tokens()[0].tolist() == [7 + 1, 2 + 1]  # global layer 4, + the decode token
    assert layers[2].live_tokens()[0].tolist() == [4 + 1, 4 + 1]  # global layer 6
    assert layers[1].get_seq_length() == PROMPT // 2 + 1  # global 5 is not named: uniform ratio
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**budgets, "layers": {"5": [1, 2, 3]}}))
    with pytest.raises(ValueError, match="lists 3 KV heads"):
        ShardRuntime(tiny_model_dirs["llama"], 4, 8, compaction=cfg.model_copy(update={"budgets_path": str(bad)}))
