"""Weight quantization of a shard's own decoder layers, chosen by ``hardware.quantization``.

What each setting does, by device (measured on this machine's CPU, see docs/benchmarks.md):

| setting | CUDA | CPU |
| --- | --- | --- |
| ``int8`` | bitsandbytes LLM.int8 (``Linear8bitLt``) | int8 weight-only, per-row scales (``_weight_int8pack_mm``) |
| ``int4`` | refused (use ``nf4``)                   | int4 weight-only, groups of 32 (``_weight_int4pack_mm_for_cpu``)|
| ``nf4``  | bitsandbytes NF4 (``Linear4bit``)       | bitsandbytes NF4 (works, but slower than bf16) |

On the CPU, three int8 routes were measured on SmolLM2-135M (1 thread, loaded machine):
bitsandbytes' int8 matmul is no faster than fp32 at batch 1 (a 576x1536 Linear: 218 us vs 225 us);
torch's dynamic int8 (fbgemm) is fast (36 us) but quantizes activations too, and SmolLM2's outlier
activations drop top-1 agreement with fp32 to 0.56; weight-only int8 keeps activations in bf16, agrees
0.94 with fp32 (bf16 alone: 0.955) and decodes ~1.4x faster than bf16 with ~0.6x the memory. So
``int8`` on a CPU is weight-only. The CPU kernels live in runtime/quant_cpu.py. CPU int8 and int4 also
store the lm_head and the embedding table as int8 (one shared tensor when tied, as llama.cpp's Q8_0
head); with other methods the embeddings, the final norm and the lm_head keep the runtime dtype.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from openhydra.runtime.quant_cpu import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    fuse_projections,
    int4_supported,
    quantize_cpu_head,
    replace_linears,
)

__all__ = ["Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "QuantizationUnavailable", "method_for", "module_bytes",
           "quantize_head", "quantize_linears", "require_method"]

log = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "int4", "nf4"]
Method = Literal["none", "int8_weight_only", "int4_weight_only", "bnb_int8", "bnb_nf4"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "int4", "nf4")


class QuantizationUnavailable(RuntimeError):
    """The requested quantization cannot run here (missing package or unsupported device)."""


def method_for(quantization: str, device: str) -> Method:
    """Which implementation ``quantization`` uses on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"hardware.quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return "none"
    kind = device.split(":")[0]
    if kind == "cpu":
        return {"int8": "int8_weight_only", "int4": "int4_weight_only"}.get(quantization, "bnb_nf4")  # type: ignore
    if kind == "cuda" and quantization == "int4":
        raise QuantizationUnavailable("hardware.quantization=int4 is the CPU's packed int4 kernel; on CUDA use nf4")
    if kind == "cuda":
        return "bnb_int8" if quantization == "int8" else "bnb_nf4"
    raise QuantizationUnavailable(f"hardware.quantization={quantization} is not supported on device {device!r}; "
                                  "use a CPU or CUDA device, or quantization=none")


def quantize_linears(root: nn.Module, method: Method, device: str, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` under ``root`` in place; returns how many were replaced (a fused group of
    CPU int8/int4 projections counts as its members).

    ``root`` must already hold real weights (not ``meta``) on ``device``.
    """
    if method == "none":
        return 0
    require_method(method)
    fused = 0
    if method in ("int8_weight_only", "int4_weight_only"):  # one kernel call for q/k/v and for gate/up
        fused = fuse_projections(root, lambda linear: _quantized(linear, method, device, compute_dtype))
    count = replace_linears(root, lambda linear: _quantized(linear, method, device, compute_dtype)) + fused
    _release_freed_memory()
    return count


def _release_freed_memory() -> None:
    """Hand the freed full-precision weights back to the OS (glibc keeps freed heap pages otherwise).

    Measured on SmolLM2 int8: RSS after loading was 412 MB without this (the bf16 weights' pages
    stayed in malloc's arenas) for 163 MB of quantized parameters.
    """
    import contextlib
    import ctypes
    import gc

    from openhydra.runtime import hugepages

    hugepages.release()  # the packed weights hold their huge-page chunks; the arena no longer does
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def quantize_head(modules: nn.Module, method: Method, dtype: torch.dtype) -> None:
    """CPU int8/int4: the lm_head and embedding table go int8 too (one shared int8 tensor when tied).

    The tied head of a small model is a large share of the bytes read per token (SmolLM2: 28M of 135M
    weights), and llama.cpp's Q4_1 GGUF keeps it in Q8_0; other methods leave both in ``dtype``.
    """
    if method in ("int8_weight_only", "int4_weight_only"):
        quantize_cpu_head(modules, dtype)
        _release_freed_memory()


def _quantized(linear: nn.Linear, method: Method, device: str, compute_dtype: torch.dtype) -> nn.Module:
    if method == "int8_weight_only":
        return Int8WeightOnlyLinear(linear, compute_dtype)
    if method == "int4_weight_only":
        if int4_supported(linear.in_features, linear.out_features):
            return Int4WeightOnlyLinear(linear, compute_dtype)
        return Int8WeightOnlyLinear(linear, compute_dtype)  # a shape the int4 kernel cannot take
    import bitsandbytes as bnb

    weight = linear.weight.detach().to("cpu", torch.float32 if compute_dtype == torch.float32 else torch.float16)
    bias = None if linear.bias is None else linear.bias.detach()
    if method == "bnb_int8":
        new: nn.Module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                             has_fp16_weights=False, threshold=6.0, device="meta")
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias is not None:
        new.bias = nn.Parameter(bias.to("cpu", compute_dtype), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes when the weight moves to its device


def module_bytes(root: nn.Module) -> int:
    """Bytes of the module's parameters, quantized ones and their scales included (tied ones once)."""
    seen: set[int] = set()
    total = 0
    for tensor in root.parameters():
        if tensor.is_meta or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
        total += _bnb_state_bytes(tensor)
    return total


def _bnb_state_bytes(tensor: torch.Tensor) -> int:
    """The scales bitsandbytes keeps beside a quantized weight (row scales for int8, absmax for NF4)."""
    extra = 0
    scb = getattr(tensor, "SCB", None)
    if isinstance(scb, torch.Tensor):
        extra += scb.numel() * scb.element_size()
    state = getattr(tensor, "quant_state", None)
    absmax = getattr(state, "absmax", None)
    if isinstance(absmax, torch.Tensor):
        extra += absmax.numel() * absmax.element_size()
    return extra


def require_method(method: Method) -> None:
    """Raise :class:`QuantizationUnavailable` if ``method`` needs a package that is not installed."""
    if not method.startswith("bnb_"):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise QuantizationUnavailable(
            f"{method} needs bitsandbytes: pip install 'openhydra-network[quant]' (bitsandbytes>=0.50)"
        ) from exc
