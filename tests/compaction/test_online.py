"""Phase 4 (arXiv:2602.16284 applied online): memory stays flat while generation goes on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from openhydra.runtime.compaction import CompactionPolicy, OnlineCompactor, cache_kv_bytes
from tests.compaction.conftest import forward, load_tiny

THRESHOLD = 48
STEPS = 200


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_online_compaction_keeps_cache_bounded(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    model = load_tiny(tiny_model_dirs[family])
    layer_types = getattr(model.config, "layer_types", None)
    cache = DynamicCache(config=model.config)
    online = OnlineCompactor(CompactionPolicy(ratio=0.5), THRESHOLD, layer_types, max_queries=64)
    prompt = torch.randint(10, 2000, (1, 32), generator=torch.Generator().manual_seed(1))
    with online.capturing():
        logits = forward(model, cache, prompt, 0)
    online.maybe_compact(cache)
    position, lengths, sizes = prompt.shape[1], [], []
    for _ in range(STEPS):
        token = logits[-1].argmax().view(1, 1)
        with online.capturing():
            logits = forward(model, cache, token, position)
        position += 1
        online.maybe_compact(cache)
        lengths.append(online.longest_layer(cache))
        sizes.append(cache_kv_bytes(cache, layer_types))
        assert torch.isfinite(logits).all()
    assert position == 32 + STEPS
    assert max(lengths) <= THRESHOLD  # compacted as soon as it passed the threshold
    assert len(online.reports) >= (32 + STEPS) // THRESHOLD  # compacted again and again
    # flat memory: the second half of the run never holds more than the first half did
    half = len(sizes) // 2
    assert max(sizes[half:]) <= max(sizes[:half])
    # peak = a plain cache of threshold + 1 tokens, plus the β column (1/head_dim of the keys)
    plain_bytes_per_token = sizes[0] / lengths[0]
    head_dim = model.config.head_dim if hasattr(model.config, "head_dim") else 16
    assert online.peak_kv_bytes <= plain_bytes_per_token * (THRESHOLD + 1) * (1 + 0.5 / head_dim) + 1
