"""Compact the full-attention layers of a ``DynamicCache`` in place (arXiv:2602.16284).

``compact_cache(cache, layer_types, queries_by_layer, policy)`` is the one entry point, written so a
pipeline shard can call it on its own cache: layer indices are the cache's (local) indices, and
``layer_types`` is the shard's slice of ``config.layer_types`` (None: every layer is full attention).
Linear-attention (Gated DeltaNet) and sliding-window layers are never touched.

Per full-attention layer and KV head: reference statistics from the captured queries, token
selection (HAK / OMP, or the StreamingLLM / H2O baselines), then for phases ≥ 2 the β (NNLS) and C_v
(ridge) fits. Phase 1 with equal budgets yields a plain ``DynamicLayer``; anything with β or
uneven per-head budgets yields a :class:`CompactedLayer`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.cache_utils import DynamicLayer

from openhydra.runtime.compaction.baselines import select_h2o, select_streaming
from openhydra.runtime.compaction.budgets import HeadBudgets, load_budgets, uniform_budget
from openhydra.runtime.compaction.config import CompactionConfig
from openhydra.runtime.compaction.fitting import (
    fit_mass_weights,
    fit_values,
    group_queries,
    reference_stats,
    weights_to_bias,
)
from openhydra.runtime.compaction.layer import MASKED_BIAS, CompactedLayer, layer_kv, layer_nbytes
from openhydra.runtime.compaction.selection import select_hak, select_omp

Selector = Literal["hak", "omp", "streaming", "h2o"]


@dataclass(frozen=True)
class CompactionPolicy:
    selector: Selector = "hak"
    fit: bool = True
    fit_beta: bool = True  # phase 2 ablations: β alone, C_v alone
    fit_values: bool = True
    ratio: float = 0.5
    budgets: HeadBudgets | None = None
    beta_ridge: float = 1e-3
    value_ridge: float = 0.03
    nnls_iters: int = 300
    omp_chunks: int = 16
    sinks: int = 4
    recent_fraction: float = 0.0  # share of each head's budget kept verbatim for the newest tokens

    @classmethod
    def from_config(cls, cfg: CompactionConfig, ratio: float | None = None) -> CompactionPolicy:
        budgets = load_budgets(cfg.budgets_path) if cfg.budgets_path and cfg.phase >= 3 else None
        return cls(
            selector=cfg.method,
            fit=cfg.fit,
            ratio=cfg.ratio if ratio is None else ratio,
            budgets=budgets,
            beta_ridge=cfg.beta_ridge,
            value_ridge=cfg.value_ridge,
            nnls_iters=cfg.nnls_iters,
            omp_chunks=cfg.omp_chunks,
            recent_fraction=cfg.recent_fraction,
        )


@dataclass
class CompactionReport:
    cache: object
    kept: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept slots per KV head
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0


def is_full_attention(layer_types: list[str] | None, layer_idx: int) -> bool:
    return layer_types is None or layer_types[layer_idx] == "full_attention"


def layer_budgets(policy: CompactionPolicy, layer_idx: int, num_kv_heads: int, length: int) -> list[int]:
    if policy.budgets is not None:
        return policy.budgets.for_layer(layer_idx, num_kv_heads, length, policy.ratio)
    return [uniform_budget(length, policy.ratio)] * num_kv_heads


def compact_layer(
    layer: DynamicLayer,
    queries: torch.Tensor | None,
    budgets: list[int],
    policy: CompactionPolicy,
    scale: float,
) -> DynamicLayer:
    """Compact one layer (batch 1). queries: [Hq, n, D] post-RoPE, or None for StreamingLLM.

    With ``recent_fraction`` > 0 the newest ``r`` tokens stay as they are and only the older block
    is compacted (the block view of arXiv:2602.16284: β keeps its mass right next to the recent
    tokens). Uneven per-head budgets then shrink only the older block.
    """
    keys, values, bias = layer_kv(layer)  # [1, Hk, T, D], [1, Hk, T, Dv], [1, Hk, T]
    if keys.shape[0] != 1:
        raise ValueError(f"compaction runs per sequence (batch 1), got batch {keys.shape[0]}")
    total = keys.shape[2]
    recent = 0
    if policy.recent_fraction > 0.0 and policy.selector != "streaming":
        recent = min(int(min(budgets) * policy.recent_fraction), min(budgets) - 1)
    old_budgets = [b - recent for b in budgets]
    new_k, new_v, new_b, active = _compact_block(
        keys[0, :, : total - recent],
        values[0, :, : total - recent],
        bias[0, :, : total - recent],
        queries,
        old_budgets,
        policy,
        scale,
    )
    if recent:
        # padding (inactive) slots stay in the middle; the recent tokens keep their order at the end
        new_k = torch.cat([new_k, keys[0, :, total - recent :]], dim=1)
        new_v = torch.cat([new_v, values[0, :, total - recent :]], dim=1)
        new_b = torch.cat([new_b, bias[0, :, total - recent :].double()], dim=1)
        active = torch.cat([active, torch.ones(active.shape[0], recent, dtype=torch.bool)], dim=1)
    plain = not policy.fit and not isinstance(layer, CompactedLayer) and bool(active.all())
    if plain:
        out = DynamicLayer()
        out.lazy_initialization(keys, values)
        out.keys, out.values = new_k.unsqueeze(0).contiguous(), new_v.unsqueeze(0).contiguous()
        return out
    return CompactedLayer(new_k.unsqueeze(0), new_v.unsqueeze(0), new_b.unsqueeze(0))


def _compact_block(
    k: torch.Tensor,
    v: torch.Tensor,
    b: torch.Tensor,
    queries: torch.Tensor | None,
    budgets: list[int],
    policy: CompactionPolicy,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [Hk, T, D], v [Hk, T, Dv], b [Hk, T] -> (C_k, C_v, β, active), each [Hk, t_max, ...]."""
    hk, total, _ = k.shape
    if policy.selector == "streaming":
        idx, active = select_streaming(total, budgets, policy.sinks)
        stats = None
    else:
        if queries is None:
            raise ValueError(f"selector {policy.selector!r} needs reference queries for each layer")
        q = group_queries(queries.to(torch.float32), hk)  # [Hk, G·n, D]
        if policy.selector == "h2o":
            positions = (torch.arange(queries.shape[1]) + total - queries.shape[1]).clamp_min(0)
            idx, active = select_h2o(k, q, positions, scale, budgets)
            stats = reference_stats(k, v, b, q, scale) if policy.fit else None
        else:
            stats = reference_stats(k, v, b, q, scale)
            if policy.selector == "omp":
                idx, active = select_omp(stats, budgets, chunks=policy.omp_chunks)
            else:
                idx, active = select_hak(stats, budgets)
    gather = idx.unsqueeze(-1)
    new_k = torch.gather(k, 1, gather.expand(-1, -1, k.shape[-1]))  # [Hk, t, D]
    kept_v = torch.gather(v, 1, gather.expand(-1, -1, v.shape[-1]))  # [Hk, t, Dv]
    old_b = torch.gather(b, 1, idx)  # [Hk, t]
    if policy.fit and stats is not None:
        if policy.fit_beta:
            w = fit_mass_weights(stats, idx, active, ridge=policy.beta_ridge, iters=policy.nnls_iters)
        else:
            w = active.double()
        new_v = kept_v * active.unsqueeze(-1)
        if policy.fit_values:
            new_v = fit_values(stats, idx, active, w, kept_v, ridge=policy.value_ridge).to(v.dtype)
        new_b = weights_to_bias(w, old_b, active, MASKED_BIAS)
    else:
        new_v = kept_v * active.unsqueeze(-1)
        new_b = torch.where(active, old_b.double(), torch.full_like(old_b.double(), MASKED_BIAS))
    return new_k, new_v, new_b, active


def compact_cache(
    cache: object,
    layer_types: list[str] | None,
    queries_by_layer: dict[int, torch.Tensor],
    policy: CompactionPolicy,
    scale: float | None = None,
) -> CompactionReport:
    """Compact every full-attention layer of ``cache`` in place; returns what changed.

    queries_by_layer: local layer index -> captured queries [Hq, n, D] (see ``QueryCapture``).
    scale: the attention's softmax scale (default head_dim ** -0.5).
    """
    start = time.perf_counter()
    report = CompactionReport(cache=cache)
    layers = cache.layers  # type: ignore[attr-defined]
    for i, layer in enumerate(layers):
        if not is_full_attention(layer_types, i) or not isinstance(layer, DynamicLayer):
            continue
        if not layer.is_initialized or layer.get_seq_length() == 0:
            continue
        keys, _, _ = layer_kv(layer)
        hk, total, head_dim = keys.shape[1:]
        budgets = layer_budgets(policy, i, hk, total)
        report.bytes_before += layer_nbytes(layer)
        if all(bud >= total for bud in budgets):  # nothing to drop: the layer stays exactly as it is
            report.kept[i] = budgets
            report.bytes_after += layer_nbytes(layer)
            continue
        new_layer = compact_layer(
            layer, queries_by_layer.get(i), budgets, policy, scale if scale is not None else head_dim**-0.5
        )
        layers[i] = new_layer
        report.kept[i] = budgets
        report.bytes_after += layer_nbytes(new_layer)
    report.seconds = time.perf_counter() - start
    return report


def cache_kv_bytes(cache: object, layer_types: list[str] | None = None) -> int:
    """K/V bytes over full-attention layers (β columns included)."""
    return sum(
        layer_nbytes(layer)
        for i, layer in enumerate(cache.layers)  # type: ignore[attr-defined]
        if is_full_attention(layer_types, i)
    )
