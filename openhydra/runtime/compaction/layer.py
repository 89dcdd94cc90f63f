"""A cache layer holding a compacted block (C_k, β, C_v) followed by ordinary new tokens.

Attention Matching (arXiv:2602.16284) keeps, per KV head, t keys C_k with a logit bias β and
refitted values C_v. Here β is stored as one extra trailing column of the keys (see
``attention.py``): ``keys: [B, Hk, T, D+1]``, ``values: [B, Hk, T, Dv]``. Tokens appended after
compaction get β = 0, so they behave exactly as in a plain :class:`DynamicLayer`. Heads with a
smaller budget than their layer's widest head are padded with slots whose β is ``MASKED_BIAS``
(exp(β) = 0: the slot receives no attention).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MASKED_BIAS = -1.0e4
"""β for padding slots: exp(-1e4) underflows to exactly 0 in fp32, bf16 and fp16."""


class CompactedLayer(DynamicLayer):
    """DynamicLayer whose keys carry a β column; ``update`` appends new tokens with β = 0."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> None:
        # keys: [B, Hk, T, D]; values: [B, Hk, T, Dv]; bias: [B, Hk, T]
        super().__init__()
        if keys.shape[:3] != values.shape[:3] or keys.shape[:3] != bias.shape:
            raise ValueError(
                f"keys {tuple(keys.shape)}, values {tuple(values.shape)}, bias {tuple(bias.shape)} disagree"
            )
        self.dtype, self.device = keys.dtype, keys.device
        self.keys = torch.cat([keys, bias.to(keys.dtype).unsqueeze(-1)], dim=-1)  # [B, Hk, T, D+1]
        self.values = values
        self.is_initialized = True

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1] - 1

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [B, Hk, S, D] -> [B, Hk, S, D+1] with β = 0
        zeros = key_states.new_zeros((*key_states.shape[:-1], 1))
        self.keys = torch.cat([self.keys, torch.cat([key_states, zeros], dim=-1)], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def plain_keys(self) -> torch.Tensor:
        return self.keys[..., :-1]  # [B, Hk, T, D]

    def bias(self) -> torch.Tensor:
        return self.keys[..., -1]  # [B, Hk, T]

    def live_tokens(self) -> torch.Tensor:
        """Slots per KV head that can receive attention (padding excluded): ``[B, Hk]``."""
        return (self.bias() > MASKED_BIAS / 2).sum(-1)


def layer_kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys [B, Hk, T, D], values [B, Hk, T, Dv], β [B, Hk, T]) of a plain or compacted layer."""
    if isinstance(layer, CompactedLayer):
        return layer.plain_keys(), layer.values, layer.bias().float()
    keys = layer.keys
    return keys, layer.values, keys.new_zeros(keys.shape[:-1], dtype=torch.float32)


def layer_nbytes(layer: object) -> int:
    """Bytes held by a layer's K/V tensors (β column included); 0 for states that are not K/V."""
    total = 0
    for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total
