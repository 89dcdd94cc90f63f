"""Attention on the low-bit library (runtime/lowbit.py ``attention``) for spans whose arithmetic is already its own.

A span whose layers all run their matmuls and norms on the low-bit kernel (fp32, ``hardware=cpu_int4`` /
``cpu_int8``: runtime/lean_layers.py ``use_kernel_norms``) computes attention there too: one call per layer instead
of PyTorch's SDPA (whose CPU flash kernel costs ~25-30 µs per call at batch 1 and a few dozen positions, most of it
set-up: ~0.8 ms of a 6 ms SmolLM2 int4 token). Its softmax and sums run in its own order, so its bits are not SDPA's:
like the norms, it replaces attention in every path of the span (transformers' layers for prefill through the
attention interface registered here, the lean step, verify and continuous batching's per-row attention), so they
keep agreeing bit for bit. Better than SDPA there: a query row's bits do not depend on how many rows a call takes,
so a prefill, a decode step and a verify give a position the same numbers by construction, on AVX2 and AVX-512
builds alike.

Not used (SDPA stays): bf16 spans, spans with a layer off the kernel, KV compaction (its own attention), head sizes
that are not a multiple of 16, and model types other than those below.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from openhydra.runtime import lowbit

log = logging.getLogger(__name__)

KERNEL_ATTENTION = "openhydra_lowbit"
"""The span's ``_attn_implementation`` when its attention runs on the library."""

MODEL_TYPES = frozenset({"llama", "qwen3", "qwen3_5", "qwen3_5_text"})
"""Architectures whose attention modules call the attention function with only what the library computes (query,
keys, values, a boolean or no mask, a scale): checked with each of them in tests/runtime/test_kernel_attention.py."""


def kernel_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface (as ``sdpa_attention_forward``: query [B, Hq, S, D], key and value
    [B, Hkv, T, D], a boolean mask or None with causality from the module) -> ([B, S, Hq, D], None)."""
    lib = lowbit.kernel()
    unsupported = [name for name in ("softcap", "position_bias", "sinks", "s_aux") if kwargs.get(name) is not None]
    if lib is None or dropout or unsupported or (attention_mask is not None and attention_mask.dtype != torch.bool):
        raise NotImplementedError(
            f"kernel attention: {'no library' if lib is None else ''} dropout={dropout} {unsupported} mask "
            f"{None if attention_mask is None else attention_mask.dtype} (span {type(module).__name__})")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(lib, query, key, value, attention_mask, scale, causal), None


def attend(lib, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           scale: float, is_causal: bool) -> torch.Tensor:
    """The library's attention with SDPA's rule for causality (only for several queries and no mask: a mask says it
    all), as transformers' layers (:func:`kernel_attention_forward`) and the lean step call it: [B, S, Hq, D]."""
    causal = query.shape[2] > 1 and attention_mask is None and is_causal
    return lowbit.attention(lib, query, key, value, attention_mask, scale, causal)


def register() -> str:
    """Make :data:`KERNEL_ATTENTION` known to transformers (its masks are SDPA's: None where SDPA skips them)."""
    AttentionInterface.register(KERNEL_ATTENTION, kernel_attention_forward)
    AttentionMaskInterface.register(KERNEL_ATTENTION, sdpa_mask)
    return KERNEL_ATTENTION


def use_kernel_attention(shard_config, layers: nn.ModuleList, kernel_norm_layers: int, head_dim: int,
                         compaction: bool) -> bool:
    """At load, after :func:`~openhydra.runtime.lean_layers.use_kernel_norms`: point the span's attention at the
    library when every layer's matmuls and norms are on it (``kernel_norm_layers`` == all of them), its head size is
    a multiple of 16, its architecture is one of :data:`MODEL_TYPES`, it uses SDPA, and KV compaction is off.
    Returns whether it did."""
    if (compaction or len(layers) == 0 or kernel_norm_layers != len(layers) or head_dim % 16 != 0
            or getattr(shard_config, "model_type", None) not in MODEL_TYPES
            or shard_config._attn_implementation != "sdpa" or lowbit.kernel() is None):
        return False
    shard_config._attn_implementation = register()
    log.info("attention on the low-bit library (%d layers)", len(layers))
    return True
