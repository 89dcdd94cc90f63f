"""compact_cache on tiny Llama / Qwen3.5-hybrid models (arXiv:2602.16284 phases 1-3)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from openhydra.runtime.compaction import (
    CompactedLayer,
    CompactionPolicy,
    QueryCapture,
    capture_queries,
    compact_cache,
    load_budgets,
)
from tests.compaction.conftest import forward, load_tiny

CONTEXT = 128


def prefill(model, ids: torch.Tensor) -> tuple[DynamicCache, QueryCapture]:
    cache = DynamicCache(config=model.config)
    cap = QueryCapture(max_queries=512)
    with capture_queries(cap):
        forward(model, cache, ids[:, :CONTEXT], 0)
    return cache, cap


def state_tensors(layer: object) -> dict[str, torch.Tensor]:
    """Every tensor a cache layer holds (attributes and dicts of tensors), cloned."""
    found: dict[str, torch.Tensor] = {}
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            found[name] = value.clone()
        elif isinstance(value, dict):
            found.update({f"{name}.{k}": v.clone() for k, v in value.items() if isinstance(v, torch.Tensor)})
    return found


def kl(full: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(full, -1)
    return (p.exp() * (p - torch.log_softmax(other, -1))).sum(-1).mean().item()


@pytest.fixture(scope="module")
def llama(tiny_model_dirs: dict[str, Path]):
    return load_tiny(tiny_model_dirs["llama"])


def test_ratio_one_is_exact(llama, token_ids: torch.Tensor) -> None:
    cache, cap = prefill(llama, token_ids)
    reference = copy.deepcopy(cache)
    report = compact_cache(cache, None, cap.as_dict(), CompactionPolicy(ratio=1.0, fit=True))
    assert report.bytes_after == report.bytes_before
    cont = token_ids[:, CONTEXT:]
    assert torch.equal(forward(llama, cache, cont, CONTEXT), forward(llama, reference, cont, CONTEXT))


def test_phase2_closer_to_full_than_phase1_on_model(llama, token_ids: torch.Tensor) -> None:
    full_cache, cap = prefill(llama, token_ids)
    cont = token_ids[:, CONTEXT:]
    results = {}
    for fit in (False, True):
        cache = copy.deepcopy(full_cache)
        compact_cache(cache, None, cap.as_dict(), CompactionPolicy(ratio=0.25, fit=fit))
        results[fit] = forward(llama, cache, cont, CONTEXT)
        kinds = {type(layer) for layer in cache.layers}
        assert kinds == ({CompactedLayer} if fit else {type(full_cache.layers[0])})
        assert cache.get_seq_length() == CONTEXT // 4 + cont.shape[1]
    full = forward(llama, full_cache, cont, CONTEXT)
    assert kl(full, results[True]) < kl(full, results[False])


def test_hybrid_model_keeps_linear_layers_untouched(tiny_model_dirs: dict[str, Path], token_ids) -> None:
    model = load_tiny(tiny_model_dirs["qwen3_5"])
    layer_types = list(model.config.layer_types)
    cache, cap = prefill(model, token_ids)
    before = {i: state_tensors(layer) for i, layer in enumerate(cache.layers) if layer_types[i] == "linear_attention"}
    assert all(len(states) >= 2 for states in before.values())  # conv + recurrent state at least
    ids_before = {i: id(cache.layers[i]) for i in before}
    assert set(cap.as_dict()) == {i for i, kind in enumerate(layer_types) if kind == "full_attention"}
    report = compact_cache(cache, layer_types, cap.as_dict(), CompactionPolicy(ratio=0.5))
    assert set(report.kept) == {i for i, kind in enumerate(layer_types) if kind == "full_attention"}
    for i, states in before.items():
        layer = cache.layers[i]
        assert id(layer) == ids_before[i]
        after = state_tensors(layer)
        assert after.keys() == states.keys()
        assert all(torch.equal(states[name], after[name]) for name in states)
    for i in report.kept:
        assert isinstance(cache.layers[i], CompactedLayer)
        assert cache.layers[i].get_seq_length() == CONTEXT // 2
    logits = forward(model, cache, token_ids[:, CONTEXT : CONTEXT + 8], CONTEXT)
    assert torch.isfinite(logits).all()


def test_json_budgets_are_honoured_exactly(llama, token_ids: torch.Tensor, tmp_path: Path) -> None:
    budgets = {"0": [5, 40], "3": [17, 2], "7": [128, 64]}
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({"format": "openhydra-kv-budgets/1", "unit": "tokens", "layers": budgets}))
    cache, cap = prefill(llama, token_ids)
    policy = CompactionPolicy(ratio=0.25, budgets=load_budgets(path))
    report = compact_cache(cache, None, cap.as_dict(), policy)
    for i, layer in enumerate(cache.layers):
        want = budgets.get(str(i), [CONTEXT // 4] * 2)
        assert report.kept[i] == want
        if want == [CONTEXT, CONTEXT]:
            continue
        assert layer.live_tokens()[0].tolist() == want
        assert layer.get_seq_length() == max(want)
    # layers of different lengths still decode together (the mask is right-aligned per layer)
    logits = forward(llama, cache, token_ids[:, CONTEXT : CONTEXT + 6], CONTEXT)
    assert torch.isfinite(logits).all()


def test_fraction_budgets_and_shard_offset(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"format": "openhydra-kv-budgets/1", "unit": "fraction", "layers": {"4": [0.5, 0.1]}}))
    budgets = load_budgets(path)
    assert budgets.for_layer(4, 2, 200, 0.3) == [100, 20]
    assert budgets.for_layer(5, 2, 200, 0.3) == [60, 60]
    assert budgets.shifted(4).for_layer(0, 2, 200, 0.3) == [100, 20]
    path.write_text(json.dumps({"format": "openhydra-kv-budgets/1", "unit": "fraction", "layers": {"1": [1.5]}}))
    with pytest.raises(ValueError, match=r"layers\['1'\]"):
        load_budgets(path)
