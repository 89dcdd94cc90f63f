"""Attention that honours the per-key bias β of a compacted cache, plus reference-query capture.

Attention Matching (Zweiger et al., "Fast KV Compaction via Attention Matching", arXiv:2602.16284)
replaces a block of T keys/values by t < T keys C_k, values C_v and a scalar bias β_j per kept key
that is added to the attention logits: softmax(scale * q·C_kᵀ + β) C_v.

How β travels: a compacted layer stores its keys with one extra trailing column holding β
(``k' = [k, β]``, new tokens get β = 0). This function appends ``1/scale`` to every query
(``q' = [q, 1/scale]``), so ``scale * q'·k' = scale * q·k + β`` and plain SDPA does the rest,
including GQA (each KV head's β is shared by its query group, exactly like its keys). Using the
stock ``sdpa`` on such a cache fails loudly on the shape mismatch instead of silently ignoring β.

Layers compacted to different lengths share the one mask that the model builds; causal structure
is relative to the end of the key sequence, so the mask is right-aligned to each layer's length
(batch size 1, no left padding: the only case compaction supports).

Query capture: while a :class:`QueryCapture` is active (a context variable, so concurrent sessions
in other tasks are unaffected), every call records its post-RoPE queries per ``layer_idx``; these
are the reference queries that compaction fits to.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "openhydra_compacted"


class QueryCapture:
    """Keeps the most recent ``max_queries`` query vectors of every layer (a bounded ring)."""

    def __init__(self, max_queries: int = 1024) -> None:
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.max_queries = max_queries
        self._by_layer: dict[int, torch.Tensor] = {}

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        # query: [B, H, S, D]; compaction runs per sequence, so B must be 1
        if query.shape[0] != 1:
            raise ValueError(f"query capture supports batch size 1, got {query.shape[0]}")
        q = query[0].detach().float()  # q: [H, S, D]
        prev = self._by_layer.get(layer_idx)
        if prev is not None:
            q = torch.cat([prev, q], dim=1)
        self._by_layer[layer_idx] = q[:, -self.max_queries :].contiguous()

    def queries(self, layer_idx: int) -> torch.Tensor | None:
        """Captured queries of one layer, ``[H, n, D]``, or None if the layer never ran."""
        return self._by_layer.get(layer_idx)

    def as_dict(self) -> dict[int, torch.Tensor]:
        return dict(self._by_layer)

    def clear(self) -> None:
        self._by_layer.clear()


_ACTIVE_CAPTURE: contextvars.ContextVar[QueryCapture | None] = contextvars.ContextVar(
    "openhydra_query_capture", default=None
)


@contextlib.contextmanager
def capture_queries(capture: QueryCapture) -> Iterator[QueryCapture]:
    """Record reference queries of every attention call made inside the block."""
    token = _ACTIVE_CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE_CAPTURE.reset(token)


def _align_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """Right-align a 4D mask built for another layer's key length to ``kv_len`` keys."""
    if mask is None:
        if q_len == 1 or q_len == kv_len:
            return None  # SDPA's own is_causal is right for these two cases
        # q_len > 1 on a non-empty cache: causal among the new tokens, all old keys visible
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    ref_len = mask.shape[-1]
    if ref_len == kv_len:
        return mask
    if ref_len > kv_len:
        return mask[..., -kv_len:]
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    pad = fill((*mask.shape[:-1], kv_len - ref_len), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def compacted_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over keys that may carry a β column. q: [B, Hq, S, D]; k: [B, Hk, T, D(+1)]; v: [B, Hk, T, Dv]."""
    capture = _ACTIVE_CAPTURE.get()
    if capture is not None:
        capture.record(int(module.layer_idx), query)
    head_dim = query.shape[-1]
    scale = scaling if scaling is not None else head_dim**-0.5
    if key.shape[-1] == head_dim + 1:
        # q': [B, Hq, S, D+1] with 1/scale in the last slot, so scale * q'·k' = scale * q·k + β
        query = torch.cat([query, query.new_full((*query.shape[:-1], 1), 1.0 / scale)], dim=-1)
    elif key.shape[-1] != head_dim:
        raise ValueError(f"key head dim {key.shape[-1]} matches neither {head_dim} nor {head_dim}+1 (β)")
    attention_mask = _align_mask(attention_mask, query.shape[2], key.shape[2], query.device)
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scale,
        is_causal=is_causal,
        **kwargs,
    )


def register_compacted_attention() -> str:
    """Register the attention and mask functions with transformers; returns the implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, compacted_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def use_compacted_attention(model: torch.nn.Module) -> None:
    """Switch a loaded model (or a shard's layers holder) to the β-aware attention."""
    name = register_compacted_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
