"""β-aware attention (arXiv:2602.16284) against an explicit per-head reference, GQA included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from openhydra.runtime.compaction.attention import (
    QueryCapture,
    capture_queries,
    compacted_attention_forward,
)
from openhydra.runtime.compaction.layer import MASKED_BIAS, CompactedLayer


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, scale: float, causal_new: int
) -> torch.Tensor:
    """Loop over query heads; head h reads KV head h // G. q [Hq,S,D], k [Hk,T,D], beta [Hk,T]."""
    hq, s, _ = q.shape
    hk, t, _ = k.shape
    g = hq // hk
    out = torch.empty(s, hq, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        kv = h // g
        logits = scale * q[h].double() @ k[kv].double().T + beta[kv].double()  # [S, T]
        for i in range(s):  # the last `causal_new` keys are the new tokens, causal among themselves
            visible = t - causal_new + i + 1
            row = logits[i, :visible]
            out[i, h] = torch.softmax(row, -1) @ v[kv, :visible].double()
    return out  # [S, Hq, Dv]


@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("new_tokens", [1, 5])
def test_beta_attention_matches_reference_gqa(hq: int, hk: int, new_tokens: int) -> None:
    torch.manual_seed(hq * 10 + hk + new_tokens)
    d, t = 16, 12
    keys, values = torch.randn(1, hk, t, d), torch.randn(1, hk, t, d)
    beta = torch.randn(1, hk, t) * 2
    beta[0, 0, -3:] = MASKED_BIAS  # padding slots of a head with a smaller budget
    layer = CompactedLayer(keys, values, beta)
    new_k, new_v = torch.randn(1, hk, new_tokens, d), torch.randn(1, hk, new_tokens, d)
    k_all, v_all = layer.update(new_k, new_v)
    assert k_all.shape == (1, hk, t + new_tokens, d + 1)
    q = torch.randn(1, hq, new_tokens, d)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=hq // hk, is_causal=True, training=False)
    scale = d**-0.5
    out, _ = compacted_attention_forward(module, q, k_all, v_all, None, scaling=scale)  # [1, S, Hq, Dv]
    full_beta = torch.cat([beta, torch.zeros(1, hk, new_tokens)], dim=-1)
    ref = reference_attention(
        q[0], torch.cat([keys, new_k], 2)[0], torch.cat([values, new_v], 2)[0], full_beta[0], scale, new_tokens
    )
    assert torch.allclose(out[0].double(), ref, atol=1e-5), (out[0].double() - ref).abs().max()
    # masked slots receive no attention at all: changing their keys/values changes nothing
    layer.keys[0, 0, -1 - new_tokens, :d] = 100.0
    layer.values[0, 0, -1 - new_tokens] = 1e6
    out2, _ = compacted_attention_forward(module, q, layer.keys, layer.values, None, scaling=scale)
    assert torch.allclose(out, out2, atol=1e-6)


def test_mask_built_for_another_layer_is_right_aligned() -> None:
    torch.manual_seed(0)
    d, hk, hq, s = 8, 2, 4, 3
    layer = CompactedLayer(torch.randn(1, hk, 7, d), torch.randn(1, hk, 7, d), torch.zeros(1, hk, 7))
    k_all, v_all = layer.update(torch.randn(1, hk, s, d), torch.randn(1, hk, s, d))
    q = torch.randn(1, hq, s, d)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=2, is_causal=True, training=False)
    # the model built its mask for a layer holding 11 old tokens (+3 new): [1, 1, 3, 14]
    rows = torch.arange(s)[:, None] + 11
    mask = (torch.arange(14)[None, :] <= rows)[None, None]
    out, _ = compacted_attention_forward(module, q, k_all, v_all, mask, scaling=d**-0.5)
    ref, _ = compacted_attention_forward(module, q, k_all, v_all, None, scaling=d**-0.5)
    assert torch.allclose(out, ref, atol=1e-6)


def test_query_capture_keeps_most_recent_per_layer() -> None:
    cap = QueryCapture(max_queries=5)
    module = SimpleNamespace(layer_idx=3, num_key_value_groups=1, is_causal=True, training=False)
    k = torch.randn(1, 2, 4, 8)
    with capture_queries(cap):
        for step in range(3):
            q = torch.full((1, 2, 2, 8), float(step))
            compacted_attention_forward(module, q, k, k, None)
    compacted_attention_forward(module, torch.zeros(1, 2, 1, 8), k, k, None)  # outside: not captured
    got = cap.queries(3)
    assert got is not None and got.shape == (2, 5, 8)
    assert got[0, :, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0]
