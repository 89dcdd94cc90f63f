"""Helpers for compaction tests on the tiny models (tests/conftest.py builds them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from openhydra.runtime.compaction import register_compacted_attention


def load_tiny(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=register_compacted_attention()
    )
    return model.eval()


def forward(model: torch.nn.Module, cache: DynamicCache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Run ``ids`` [1, S] at absolute positions start.. on ``cache``; returns logits [S, V]."""
    pos = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
    return out.logits[0].float()


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, 2000, (1, 160), generator=g)
