"""A leaner step through Llama-architecture decoder layers, bit-identical to transformers' own.

At batch 1 a decode step is hundreds of small operations per layer, and on a CPU node their dispatch costs as
much as the matmuls (SmolLM2 int4, 1 thread: the int4 and int8 kernels take ~5.8 of ~10.5 ms per token; the rest
is small ops and Python). :class:`LeanLlamaLayer` does what ``LlamaDecoderLayer.forward`` does (the same
operations on the same values in the same order, so every output bit is equal; tests/runtime/test_lean_layers.py
checks logits and caches on real and tiny models, fp32, bf16, int8 and int4) without the module wrappers,
deprecation and hub-kernel decorators around the layer, its attention, MLP and norms, with its tensors and
kernels looked up once at load, and with fused CPU int8/int4 projections (runtime/quant_cpu.py
``FusedProjections``) called once per input.

It is used only where it is exactly that layer: every layer of the span a ``LlamaDecoderLayer`` (SmolLM2, Llama,
and models converted to it), sdpa attention (not continuous batching's rows attention, not KV compaction's), and
no hooks on the layers; anything else runs transformers' layer as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from openhydra.runtime import lowbit
from openhydra.runtime.batching import ROWS_ATTENTION, ROWS_KERNEL_ATTENTION
from openhydra.runtime.kernel_attention import KERNEL_ATTENTION, attend
from openhydra.runtime.kv_layer import AppendLayer
from openhydra.runtime.lowbit import Bf16Weight, KernelRMSNorm, LowBitWeight
from openhydra.runtime.quant_cpu import (
    INT8_DECODE_ROWS,
    Bf16KernelLinear,
    FusedProjections,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    int4_matmul,
    int8_matmul,
)


def lean_modules(layers: nn.ModuleList) -> tuple[nn.Module, ...] | None:
    """Decided once, at load: the modules whose hooks and training flag :func:`lean_usable` watches, or None when a
    layer is not exactly a ``LlamaDecoderLayer`` with ``LlamaRMSNorm`` norms (or the kernel's:
    :func:`use_kernel_norms`)."""
    if len(layers) == 0:
        return None
    watched: list[nn.Module] = []
    for layer in layers:
        if type(layer) is not LlamaDecoderLayer:
            return None
        if not {type(layer.input_layernorm), type(layer.post_attention_layernorm)} <= LEAN_NORMS:
            return None
        watched += [layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
    return tuple(watched)


LEAN_NORMS = {LlamaRMSNorm, KernelRMSNorm}
"""The layer norms the lean step calls: transformers' own (as :func:`_norm`), or the low-bit library's."""


def _rms_norm_kind(module: nn.Module) -> str | None:
    """"scaled" for exactly Llama's or Qwen3's RMSNorm (variance in fp32, then ``weight * x``), "zero_centered" for
    Qwen3.5's (``x * (1 + weight)`` in fp32), else None. The Qwen classes are looked up only where their module is
    loaded (a span of their layers has loaded it): no import for other models."""
    kind = type(module)
    if kind is LlamaRMSNorm:
        return "scaled"
    for name, cls, what in (("qwen3", "Qwen3RMSNorm", "scaled"), ("qwen3_5", "Qwen3_5RMSNorm", "zero_centered")):
        loaded = sys.modules.get(f"transformers.models.{name}.modeling_{name}")
        if loaded is not None and kind is getattr(loaded, cls, None):
            return what
    return None


def use_kernel_norms(layers: nn.ModuleList, dtype: torch.dtype) -> int:
    """At load: the input and post-attention norms of every layer whose matmuls all run on the low-bit kernel
    (:func:`matmuls_on_lowbit`), in an fp32 span on the CPU, become :class:`~openhydra.runtime.lowbit.KernelRMSNorm`
    (the same weight): one call per norm instead of six operations. Every path through such a layer (prefill, the
    lean step, verify, batched step, transformers' layer) then computes its norms so, so they keep agreeing bit for
    bit. Returns how many layers changed."""
    lib = lowbit.kernel()
    if lib is None or dtype != torch.float32:
        return 0
    changed = 0
    for layer in layers:
        norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
        kinds = [None if n is None else _rms_norm_kind(n) for n in norms]
        if None in kinds or not all(n.weight.dtype == torch.float32 and n.weight.is_cpu for n in norms):
            continue
        if not matmuls_on_lowbit(layer):
            continue
        layer.input_layernorm, layer.post_attention_layernorm = (
            KernelRMSNorm(n, lib, zero_centered=kind == "zero_centered") for n, kind in zip(norms, kinds, strict=True))
        changed += 1
    return changed


def _norm_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A layer norm as the lean step calls it: the kernel's module itself, or :func:`_norm` with its tensors bound."""
    if isinstance(module, KernelRMSNorm):
        return module.forward
    return partial(_norm, (module.weight, module.variance_epsilon))


LEAN_ATTENTION = ("sdpa", ROWS_ATTENTION, KERNEL_ATTENTION, ROWS_KERNEL_ATTENTION)
"""Attention implementations the lean step reproduces: sdpa, the low-bit library's (runtime/kernel_attention.py),
and continuous batching's rows attention over either, which is that attention itself for every step but the
batcher's own batched forwards (runtime/batching.py ``rows_attention_forward``; those run
:meth:`LeanLlamaLayer.step_rows`, or transformers' layers where the lean step does not apply). KV compaction's
capturing attention is not one of them."""


def lean_usable(watched: tuple[nn.Module, ...] | None, attn_implementation: str) -> bool:
    """Per step (cheap): whether :class:`LeanLlamaLayer` computes exactly what the layers would now, i.e. sdpa
    attention (KV compaction switches it), eval mode and no forward hooks anywhere."""
    if watched is None or attn_implementation not in LEAN_ATTENTION:
        return False
    if any(m.training or m._forward_hooks or m._forward_pre_hooks for m in watched):
        return False
    return not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def lean_supported(layers: nn.ModuleList, attn_implementation: str) -> bool:
    """Whether :class:`LeanLlamaLayer` computes exactly what each of ``layers`` would (both checks at once)."""
    return lean_usable(lean_modules(layers), attn_implementation)


class LeanLlamaLayer:
    """One ``LlamaDecoderLayer`` with its tensors and kernels looked up once, at load.

    :meth:`step` runs what ``LlamaDecoderLayer.forward`` runs, on the same values in the same order, minus what
    does not change a bit: module calls (each a Python frame and hook checks), attribute lookups through
    ``nn.Module``, casts to the dtype a tensor already has, the split-and-copy of fused projections (q, k and v
    are views of one output), and a rotary pass per tensor (q and k are rotated together: element-wise, the same
    number per element). A Linear-like module it does not know is called as a module. ShardRuntime builds these
    once, after loading and quantizing its span, and never replaces the layers' modules afterwards."""

    def __init__(self, layer: LlamaDecoderLayer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.is_causal = getattr(attn, "is_causal", True)
        self.attn = attn  # transformers' own attention, where a mask is given
        # the low-bit library's attention where the span uses it (runtime/kernel_attention.py; decided at load)
        kernel_names = (KERNEL_ATTENTION, ROWS_KERNEL_ATTENTION)  # the rows attention runs over the library's too
        self.kernel = lowbit.kernel() if attn.config._attn_implementation in kernel_names else None
        self.input_norm = _norm_of(layer.input_layernorm)
        self.post_norm = _norm_of(layer.post_attention_layernorm)
        qkv = getattr(attn, "fused_q_proj_k_proj_v_proj", None)
        self.qkv = _matmul(qkv.fused) if isinstance(qkv, FusedProjections) else None
        self.q, self.k, self.v = (_matmul(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj"))
        self.o = _matmul(attn.o_proj)
        gate_up = getattr(mlp, "fused_gate_proj_up_proj", None)
        self.gate_up = _matmul(gate_up.fused) if isinstance(gate_up, FusedProjections) else None
        self.intermediate = mlp.intermediate_size
        self.gate, self.up, self.down = (_matmul(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj"))
        self.act = nn.functional.silu if type(mlp.act_fn).__name__ == "SiLUActivation" else mlp.act_fn
        # A verify's projections may take all its rows in one call when every one of them gives a row the bits it
        # gets alone (the low-bit kernel: runtime/lowbit.py); otherwise they run per row (see verify).
        self.rows_at_once = matmuls_on_lowbit(layer)

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache,
             attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``layer(h, attention_mask=..., position_embeddings=(cos, sin), cache=cache, use_cache=True)``.

        h [B, S, D] -> [B, S, D]; cos [B, 1, S, hd] (unsqueezed once for all layers), sin as :func:`signed_sin`
        makes it (once for all layers); appends the S new positions' keys and values to ``cache``."""
        residual = h
        qk, v = self._qkv(self.input_norm(h))
        qk = self._rotate(qk, cos, sin)
        layer = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
        if (self.kernel is not None and attention_mask is None and h.shape[0] == h.shape[1] == 1
                and not cache.offloading and appends_in_library([layer])):
            # a decode step: the append and the attention in one library call (the rows call with one row: the
            # bits of the append and ``_attend`` below, tested)
            out = lowbit.append_attention_rows(self.kernel, qk, self.heads, v, [layer], self.scaling)
            h = residual + self.o(out.view(1, 1, -1))
        else:
            k, v = cache.update(qk[:, self.heads :], v, self.layer_idx)
            h = residual + self.o(self._attend(qk[:, : self.heads], k, v, attention_mask))
        residual = h
        gate, up = self._gate_up(self.post_norm(h))
        return residual + self.down(self.act(gate) * up)

    def verify(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
        """S consecutive one-position decode steps through this layer, in order: h [1, S, D] -> [1, S, D].

        Row i's output has the bits of :meth:`step` on row i alone after rows 0..i-1 (a speculative verify that
        must equal plain decoding, runtime/shard.py). Whatever mixes the rows' numbers or depends on the row count
        runs per row: the projections (a matmul's rounding depends on its row count), and each position's attention
        over the keys appended so far. Element-wise operations and the norms (a reduction within each row) run on
        all S rows at once, with the same bits per row (tests/runtime/test_lean_layers.py); they are most of the
        small operations, so a verify pays them once per layer instead of once per position. On the low-bit kernel
        (:attr:`rows_at_once`) the projections take all S rows in one call too: its rows do not depend on the row
        count, and its weights are unpacked once for up to 8 rows (AVX-512; 4 on AVX2)."""
        seq_len = h.shape[1]
        residual = h
        x = self.input_norm(h)
        if self.rows_at_once:
            qk, v = self._qkv(x)
        else:
            rows = [self._qkv(one_position_row(x, i)) for i in range(seq_len)]
            qk, v = torch.cat([r[0] for r in rows], dim=2), torch.cat([r[1] for r in rows], dim=2)
        qk = self._rotate(qk, cos, sin)  # [1, Hq + Hkv, S, hd]
        if self.kernel is not None:  # all S positions appended, then attended in one call: row i over keys ..T0 + i
            keys, values = cache.update(qk[:, self.heads :], v, self.layer_idx)
            attended = lowbit.attention(self.kernel, qk[:, : self.heads], keys, values, None, self.scaling, True,
                                        keys.shape[2] - seq_len).view(1, seq_len, -1)
        else:
            outs = []
            for i in range(seq_len):
                keys, values = cache.update(qk[:, self.heads :, i : i + 1], v[:, :, i : i + 1], self.layer_idx)
                outs.append(self._attend(qk[:, : self.heads, i : i + 1], keys, values, None))
            attended = torch.cat(outs, dim=1)
        h = residual + self._rows(self.o, attended)
        residual = h
        x = self.post_norm(h)
        if self.rows_at_once:
            gate, up = self._gate_up(x)
        else:
            parts = [self._gate_up(one_position_row(x, i)) for i in range(seq_len)]
            gate, up = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
        return residual + self._rows(self.down, self.act(gate) * up)

    def _rows(self, matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``matmul`` on each row of x [1, S, D] as on that row alone: one call where the kernel is row-independent."""
        if self.rows_at_once:
            return matmul(x)
        return torch.cat([matmul(one_position_row(x, i)) for i in range(x.shape[1])], dim=1)

    def step_rows(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, row_layers: list) -> torch.Tensor:
        """A continuous-batching step (runtime/batching.py): h [R, 1, D], one new position per row, row r < len(
        row_layers) appending to its own session's cache layer ``row_layers[r]`` and attending over it alone; rows past
        them are padding (zero attention output). What transformers' layer computes with the rows attention
        (``rows_attention_forward``), the same operations on the same values: the matmuls take all R rows, as there.
        cos [R, 1, 1, hd], sin as :func:`signed_sin` makes it."""
        residual = h
        qk, v = self._qkv(self.input_norm(h))
        qk = self._rotate(qk, cos, sin)  # [R, Hq + Hkv, 1, hd]
        if self.kernel is not None and appends_in_library(row_layers):
            # every row's append and attention in one library call, each with the bits it gets alone
            out = lowbit.append_attention_rows(self.kernel, qk, self.heads, v, row_layers, self.scaling)
            h = residual + self.o(out.view(h.shape[0], 1, -1))  # [R, 1, Hq, hd], padding rows zero
        elif self.kernel is not None:  # every row's attention in one library call
            # each row's new K/V as views, made in one call per tensor (split) rather than two slices per row
            cached = [layer.update(k_row, v_row) for layer, k_row, v_row
                      in zip(row_layers, qk[:, self.heads :].split(1), v.split(1), strict=False)]
            out = lowbit.attention_rows(self.kernel, qk[:, : self.heads], [c[0] for c in cached],
                                        [c[1] for c in cached], self.scaling)  # [R, 1, Hq, hd], padding rows zero
            h = residual + self.o(out.view(h.shape[0], 1, -1))
        else:
            outs = []
            for r, layer in enumerate(row_layers):
                keys, values = layer.update(qk[r : r + 1, self.heads :], v[r : r + 1])
                outs.append(self._attend(qk[r : r + 1, : self.heads], keys, values, None))  # [1, 1, Hq * hd]
            if len(outs) < h.shape[0]:
                outs.append(outs[0].new_zeros((h.shape[0] - len(outs), *outs[0].shape[1:])))
            h = residual + self.o(torch.cat(outs))
        residual = h
        gate, up = self._gate_up(self.post_norm(h))
        return residual + self.down(self.act(gate) * up)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> (q and k heads [B, Hq + Hkv, S, hd], v [B, Hkv, S, hd])."""
        batch, seq_len = x.shape[:2]
        if self.qkv is not None:
            heads = self.qkv(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # [B, Hq + 2 Hkv, S, hd]
            return heads[:, : self.heads + self.kv_heads], heads[:, self.heads + self.kv_heads :]
        qk = torch.cat([self.q(x), self.k(x)], dim=-1).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        return qk, self.v(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)

    def _rotate(self, qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """transformers' ``apply_rotary_pos_emb`` on q and k at once: ``rotate_half(x) * sin`` is
        ``cat(-x2, x1) * sin``, and ``(-a) * b`` rounds as ``a * (-b)``, so the negation moves to the sin, once per
        step for all layers (:func:`signed_sin`)."""
        half = self.head_dim // 2
        return (qk * cos) + (torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * signed_sin)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """transformers' ``sdpa_attention_forward`` (or the library's attention, as the span's layers call it), then
        the heads flattened: [B, S, Hq * hd], contiguous."""
        batch, _, seq_len, _ = q.shape
        if self.kernel is not None:
            out = attend(self.kernel, q, k, v, attention_mask, self.scaling, self.is_causal)  # [B, S, Hq, hd]
            return out.view(batch, seq_len, -1)
        if attention_mask is None and k.shape[-1] == v.shape[-1] <= 256:  # its path when the GQA flag is usable
            is_causal = seq_len > 1 and self.is_causal
            if is_causal and k.shape[2] > seq_len:
                k, v = k[:, :, :seq_len], v[:, :, :seq_len]
            gqa = {"enable_gqa": True} if self.groups > 1 else {}
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                                             scale=self.scaling, is_causal=is_causal, **gqa)
            out = out.transpose(1, 2).contiguous()
        else:
            out, _ = sdpa_attention_forward(self.attn, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        return out.reshape(batch, seq_len, -1).contiguous()

    def _gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up is not None:
            both = self.gate_up(x)
            return both[..., : self.intermediate], both[..., self.intermediate :]
        return self.gate(x), self.up(x)


def appends_in_library(row_layers: list) -> bool:
    """Whether a batched step's rows can append in the attention library call (``lowbit.append_attention_rows``):
    every row's cache layer an :class:`AppendLayer` (a compacted or sliding layer appends its own way) and no layer
    twice (a verify's consecutive rows of one session append in order through ``update``)."""
    return all(type(layer) is AppendLayer for layer in row_layers) and len({id(x) for x in row_layers}) == len(
        row_layers)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The rotary sin [..., hd] with its first half negated, as :meth:`LeanLlamaLayer.step` and ``verify`` take it."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def lean_rotary(position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's (cos, sin) [B, S, hd] as every lean layer of a step takes them, prepared once per
    step: (cos [B, 1, S, hd], :func:`signed_sin` of sin [B, 1, S, hd])."""
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    return cos, signed_sin(sin)


def _norm(norm: tuple[torch.Tensor, float], h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (without the casts to the dtype a tensor already has; the same operations, in place
    where a result is fresh: ``a.add_(b)`` rounds as ``a + b``, and ``x * w`` as ``w * x``)."""
    weight, eps = norm
    dtype = h.dtype
    x = h if dtype == torch.float32 else h.to(torch.float32)
    x = x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return x.mul_(weight) if dtype == torch.float32 else weight * x.to(dtype)


def lowbit_of(module: nn.Module) -> LowBitWeight | Bf16Weight | None:
    """The low-bit library's weight (runtime/lowbit.py) a bias-free int4/int8 (or bf16 kernel) Linear runs on, if
    any. Its output rows do not depend on how many rows a call takes: S rows at once have the bits of S one-row calls
    (tested; for bf16 up to ``lowbit.BF16_KERNEL_ROWS`` rows, more than a verify or a batched step takes)."""
    if type(module) in ON_LIBRARY and module.bias is None:
        return module.lowbit
    return None


ON_LIBRARY = (Int4WeightOnlyLinear, Int8WeightOnlyLinear, Bf16KernelLinear)
"""The Linear-like modules that may run on the low-bit library (``lowbit`` not None)."""


def matmuls_on_lowbit(root: nn.Module) -> bool:
    """Whether every Linear-like module under ``root`` runs on the low-bit kernel (and there is one): then each of
    its matmuls gives a row the bits it gets alone, whatever the row count."""
    found = False
    for module in root.modules():
        if isinstance(module, nn.Linear) or (isinstance(module, ON_LIBRARY) and lowbit_of(module) is None):
            return False
        found = found or isinstance(module, ON_LIBRARY)
    return found


def rows_independent(on_lowbit: bool, layer_types: list[str]) -> bool:
    """Whether a span's rows keep their bits whatever the row count: every matmul (the head's too) on the low-bit
    kernel (``on_lowbit``: :func:`matmuls_on_lowbit` of the span), and every layer full attention (recurrent layers
    stack per-session states). Then a batched step needs no padding to a fixed row count (runtime/batching.py)."""
    return on_lowbit and set(layer_types) == {"full_attention"}


def _matmul(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module(x)`` for a Linear-like module, as a plain function of x with its tensors bound (same operations)."""
    kind = type(module)
    if kind is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: nn.functional.linear(x, weight, bias)
    if (kernel := lowbit_of(module)) is not None:
        return kernel.matmul  # the low-bit kernel (runtime/lowbit.py): reads and writes x's dtype itself
    if kind is Int4WeightOnlyLinear and module.bias is None:
        return partial(int4_matmul, packed=module.weight, group_size=module.group_size,
                       scales_and_zeros=module.scales_and_zeros, in_features=module.in_features,
                       out_features=module.out_features, kernel_dtype=module.dtype)
    if kind is Int8WeightOnlyLinear and module.bias is None:
        weight, scales, k, n = module.weight, module.scales, module.in_features, module.out_features

        def int8(x: torch.Tensor) -> torch.Tensor:
            if x.numel() // k > INT8_DECODE_ROWS or x.device.type != "cpu":
                return module(x)  # its dense path
            return int8_matmul(x, weight, scales, n)

        return int8
    return module


def one_position_row(x: torch.Tensor, i: int) -> torch.Tensor:
    """Row i of [1, S, D] with a one-position step's strides ((D, D, 1), as a fresh [1, 1, D]): a slice keeps the
    [1, S, D] strides, which send bf16 matmuls down a batched path (a copy of the weight per call, aten::bmm).
    Used wherever a row of several positions meets a Linear: here, and the head at a prompt's last position."""
    return x[0, i].view(1, 1, -1)
