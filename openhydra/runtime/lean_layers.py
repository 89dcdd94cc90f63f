"""A leaner step through Llama-architecture decoder layers, bit-identical to transformers' own.

At batch 1 a decode step is hundreds of small operations per layer, and on a CPU node their dispatch costs as
much as the matmuls (SmolLM2 int4, 1 thread: the int4 and int8 kernels take ~5.3 of ~11.4 ms per token; the rest
is small ops and Python). :func:`llama_layer_step` does what ``LlamaDecoderLayer.forward`` does (the same
operations on the same tensors in the same order, so every output bit is equal; tests/runtime/test_lean_layers.py
checks logits and caches on real and tiny models, fp32, bf16, int8 and int4) without the module wrappers,
deprecation and hub-kernel decorators around the layer, its attention, MLP and norms, and calls fused CPU int8/int4
projections (runtime/quant_cpu.py ``FusedProjections``) once per input instead of through their slices.

It is used only where it is exactly that layer: every layer of the span a ``LlamaDecoderLayer`` (SmolLM2, Llama,
and models converted to it), sdpa attention (not continuous batching's rows attention, not KV compaction's), and
no hooks on the layers; anything else runs transformers' layer as before.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, rotate_half

from openhydra.runtime.quant_cpu import FusedProjections


def lean_modules(layers: nn.ModuleList) -> tuple[nn.Module, ...] | None:
    """Decided once, at load: the modules whose hooks and training flag :func:`lean_usable` watches, or None when a
    layer is not exactly a ``LlamaDecoderLayer`` with ``LlamaRMSNorm`` norms."""
    if len(layers) == 0:
        return None
    watched: list[nn.Module] = []
    for layer in layers:
        if type(layer) is not LlamaDecoderLayer:
            return None
        if type(layer.input_layernorm) is not LlamaRMSNorm or type(layer.post_attention_layernorm) is not LlamaRMSNorm:
            return None
        watched += [layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
    return tuple(watched)


def lean_usable(watched: tuple[nn.Module, ...] | None, attn_implementation: str) -> bool:
    """Per step (cheap): whether :func:`llama_layer_step` computes exactly what the layers would now, i.e. sdpa
    attention (continuous batching and KV compaction switch it), eval mode and no forward hooks anywhere."""
    if watched is None or attn_implementation != "sdpa":
        return False
    if any(m.training or m._forward_hooks or m._forward_pre_hooks for m in watched):
        return False
    return not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def lean_supported(layers: nn.ModuleList, attn_implementation: str) -> bool:
    """Whether :func:`llama_layer_step` computes exactly what each of ``layers`` would (both checks at once)."""
    return lean_usable(lean_modules(layers), attn_implementation)


def _rms_norm(norm: LlamaRMSNorm, h: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``."""
    dtype = h.dtype
    x = h.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _projections(parent: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    group = getattr(parent, "fused_" + "_".join(names), None)
    if isinstance(group, FusedProjections):
        return group.parts(x)
    return tuple(getattr(parent, name)(x) for name in names)


def llama_layer_step(
    layer: LlamaDecoderLayer,
    h: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``layer(h, attention_mask=..., position_embeddings=..., past_key_values=cache, use_cache=True)``.

    h [B, S, D] -> [B, S, D]; appends the S new positions' keys and values to ``cache``."""
    attn, mlp = layer.self_attn, layer.mlp
    residual = h
    x = _rms_norm(layer.input_layernorm, h)
    input_shape = x.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    q, k, v = _projections(attn, ("q_proj", "k_proj", "v_proj"), x)
    q = q.view(hidden_shape).transpose(1, 2)
    k = k.view(hidden_shape).transpose(1, 2)
    v = v.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * cos) + (rotate_half(q) * sin)
    k = (k * cos) + (rotate_half(k) * sin)
    k, v = cache.update(k, v, attn.layer_idx)
    out, _ = sdpa_attention_forward(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling)
    out = out.reshape(*input_shape, -1).contiguous()
    h = residual + attn.o_proj(out)
    residual = h
    x = _rms_norm(layer.post_attention_layernorm, h)
    gate, up = _projections(mlp, ("gate_proj", "up_proj"), x)
    return residual + mlp.down_proj(mlp.act_fn(gate) * up)


def llama_layer_verify(
    layer: LlamaDecoderLayer,
    h: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache,
) -> torch.Tensor:
    """S consecutive one-position decode steps through one layer, in order: h [1, S, D] -> [1, S, D].

    Row i's output has the bits of :func:`llama_layer_step` on row i alone after rows 0..i-1 (a speculative verify
    that must equal plain decoding, runtime/shard.py). Whatever mixes the rows' numbers or depends on the row count
    runs per row: the projections (a matmul's rounding depends on its row count), and each position's attention
    over the keys appended so far. Element-wise operations and the norms (a reduction within each row) run on all S
    rows at once, with the same bits per row (tests/runtime/test_lean_layers.py); they are most of the small
    operations, so a verify pays them once per layer instead of once per position."""
    attn, mlp = layer.self_attn, layer.mlp
    seq_len = h.shape[1]
    residual = h
    x = _rms_norm(layer.input_layernorm, h)
    rows = [_projections(attn, ("q_proj", "k_proj", "v_proj"), one_position_row(x, i)) for i in range(seq_len)]
    hidden_shape = (1, seq_len, -1, attn.head_dim)
    q = torch.cat([r[0] for r in rows], dim=1).view(hidden_shape).transpose(1, 2)  # [1, H, S, hd]
    k = torch.cat([r[1] for r in rows], dim=1).view(hidden_shape).transpose(1, 2)
    v = torch.cat([r[2] for r in rows], dim=1).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * cos) + (rotate_half(q) * sin)
    k = (k * cos) + (rotate_half(k) * sin)
    outs = []
    for i in range(seq_len):
        keys, values = cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], attn.layer_idx)
        out, _ = sdpa_attention_forward(attn, q[:, :, i : i + 1], keys, values, None, dropout=0.0,
                                        scaling=attn.scaling)
        outs.append(attn.o_proj(out.reshape(1, 1, -1).contiguous()))
    h = residual + torch.cat(outs, dim=1)
    residual = h
    x = _rms_norm(layer.post_attention_layernorm, h)
    parts = [_projections(mlp, ("gate_proj", "up_proj"), one_position_row(x, i)) for i in range(seq_len)]
    act = mlp.act_fn(torch.cat([p[0] for p in parts], dim=1)) * torch.cat([p[1] for p in parts], dim=1)
    return residual + torch.cat([mlp.down_proj(one_position_row(act, i)) for i in range(seq_len)], dim=1)


def one_position_row(x: torch.Tensor, i: int) -> torch.Tensor:
    """Row i of [1, S, D] with a one-position step's strides ((D, D, 1), as a fresh [1, 1, D]): a slice keeps the
    [1, S, D] strides, which send bf16 matmuls down a batched path (a copy of the weight per call, aten::bmm).
    Used wherever a row of several positions meets a Linear: here, and the head at a prompt's last position."""
    return x[0, i].view(1, 1, -1)
