"""Weight-only int8 and int4 Linear layers for the CPU: OpenHydra's low-bit kernel where it runs, else PyTorch's.

Each token of single-stream decode reads every weight once, so the bytes per weight set the speed
limit (DESIGN.md §4: ~23 GB/s on one thread). These layers keep weights at 8 or 4 bits in memory and
in the matmul, and never materialise a bf16/fp32 copy. Two backends, chosen per layer at load:

- **the low-bit kernel** (runtime/lowbit.py, runtime/kernels/lowbit.c), where the CPU has AVX-512 VNNI or AVX2 and
  a C compiler is found: 4-bit codes in blocks of 32 with an fp16 scale and minimum each (GGUF's Q4_1, its own fp16
  values) or int8 in blocks of 32 with an fp16 scale (GGUF's Q8_0), times activations quantized to int8 per block
  of 32 (llama.cpp's scheme). It reads and writes the runtime dtype (fp32 or bf16), so no casts around it, and a
  row's output does not depend on the other rows of its batch;
- **PyTorch's packed kernels** elsewhere: :class:`Int8WeightOnlyLinear` with one scale per output row on
  ``torch._weight_int8pack_mm`` (the kernel gpt-fast uses); :class:`Int4WeightOnlyLinear` with asymmetric groups of
  ``group_size`` along K (scale and zero per group), packed once by ``_convert_weight_to_int4pack_for_cpu`` and
  multiplied by ``_weight_int4pack_mm_for_cpu`` (the op torchao's ``Int4CPULayout`` also calls). Both compute in
  bf16 (their fp32 and fp16 paths are reference loops, 10-30x slower here, see bench/bench_int_kernels.py), so
  activations of another dtype are cast to bf16 and back.

Groups of 32 with ``w = min + q * d`` are exactly GGUF's Q4_1 blocks, so re-quantizing a dequantized Q4_1 tensor
gives back its codes (the torch backend rounds the block scale/min from fp16 to bf16; the low-bit kernel keeps
fp16). Also here:

- :class:`Int8Embedding`: the tied embedding table in int8; the lm_head shares the same int8 tensor;
- :class:`FusedProjections`: sibling Linears that read the same input (``q/k/v_proj``, ``gate/up_proj``) as one
  quantized matmul. Rows of the weight are independent in every format (int8 scales per row or per block, int4
  groups along K), and the kernels compute each output column alone, so the fused outputs equal the separate ones
  bit for bit (tested); a decode step makes 4 kernel calls per Llama layer instead of 7.

Everything outside these layers (norms, attention, the KV cache) keeps the runtime's dtype. Kernel choice, speed
and accuracy against the other candidates: docs/benchmarks.md, "CPU low-bit kernels".
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from openhydra.runtime import lowbit

KERNEL_DTYPE = torch.bfloat16
INT4_GROUP_SIZE = 32  # GGUF Q4_0/Q4_1 block size; smaller groups = closer to the fp32 weights
INT8_DECODE_ROWS = 32  # up to this many rows use the int8 kernel; longer inputs (prefill) dequantize per call
# (measured, 1 thread: at 8-16 rows the kernel is 2-10x faster than dequantize + fp32 matmul, for the 49152-row
# head too, which batched decode and speculative verification feed; near 64 rows they cross)


def int4_supported(in_features: int, out_features: int, group_size: int = INT4_GROUP_SIZE) -> bool:
    """Whether a Linear can go 4-bit here: K divisible by the group size (and even, to pack two codes a byte), and N
    a multiple of 16 (PyTorch's packing needs it; the low-bit kernel does not, but a layer must load on both)."""
    return in_features % group_size == 0 and in_features % 2 == 0 and out_features > 0 and out_features % 16 == 0


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ~= q * scales[:, None]``; returns (q [N, K] int8, scales [N] fp32)."""
    w = weight.detach().to(torch.float32)  # [N, K]
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [N]
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scales


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of ``group_size`` along K: ``w ~= minimum + q * scale``.

    Returns (q [N, K] int32 in 0..15, scale [N, K/g] fp32, minimum [N, K/g] fp32).
    """
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)  # [N, G, g]
    minimum = groups.amin(dim=-1)
    scale = ((groups.amax(dim=-1) - minimum) / 15.0).clamp(min=1e-8)
    q = torch.round((groups - minimum[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, minimum


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., K] (any float dtype) times an int8 weight [N, K] with per-row bf16 scales, on the int8 kernel in
    bf16: [..., N] in x's dtype. The decode path of :class:`Int8WeightOnlyLinear` (no bias)."""
    k = weight.shape[1]
    out = torch.ops.aten._weight_int8pack_mm.default(x.reshape(x.numel() // k, k).to(KERNEL_DTYPE), weight, scales)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor,
                in_features: int, out_features: int, kernel_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] (any float dtype) times a packed int4 weight, on the int4 kernel in ``kernel_dtype``: [..., N]
    in x's dtype. :class:`Int4WeightOnlyLinear` without its bias."""
    flat = x.reshape(x.numel() // in_features, in_features).to(kernel_dtype)  # [R, K]
    out = torch.ops.aten._weight_int4pack_mm_for_cpu.default(flat, packed, group_size, scales_and_zeros)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)  # [..., N]


class Int8WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8; output in the input's dtype.

    With the low-bit kernel (runtime/lowbit.py, AVX-512 VNNI or AVX2): int8 in blocks of 32 along K with an fp16 scale
    each (GGUF's Q8_0), every row count on the kernel. Otherwise: one scale per output row, and decode (a few rows)
    runs ``_weight_int8pack_mm`` in bf16, reading 1 byte per weight, while longer inputs (prefill) dequantize the
    weight for that call and run a dense matmul in the input's dtype (faster than the int8 kernel there, measured).
    ``shared`` is another module's (weight, scales) in either format (the tied embedding table's).
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None,
                 shared: tuple[nn.Parameter, nn.Parameter] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if shared is None:
            shared = quantize_int8(linear.weight)
        self.weight, self.scales = shared  # [N, K] int8 and [N] bf16, or (lowbit) the kernel's packed uint8 and None
        self.lowbit = lowbit_int8(self.weight, self.scales, self.in_features, self.out_features)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowbit is not None:
            out = self.lowbit.matmul(x)
        elif x.numel() // self.in_features <= INT8_DECODE_ROWS and x.device.type == "cpu":
            out = int8_matmul(x, self.weight, self.scales, self.out_features)
        else:
            dense = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]  # [N, K]
            out = nn.functional.linear(x, dense)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer multiplies by."""
        if self.lowbit is not None:
            return self.lowbit.dequantized()
        return self.weight.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        kind = "blocks of 32, low-bit kernel" if self.lowbit is not None else "per-row"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only {kind}"


class Int4WeightOnlyLinear(nn.Module):
    """A Linear whose weight is 4-bit (asymmetric groups along K); output in the input's dtype.

    With the low-bit kernel (runtime/lowbit.py; groups of 32, fp16 scale and minimum per group as GGUF's Q4_1):
    the codes in the kernel's layout. Otherwise PyTorch's packed int4 kernel, in ``kernel_dtype``."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None,
                 group_size: int = INT4_GROUP_SIZE, kernel_dtype: torch.dtype = KERNEL_DTYPE) -> None:
        super().__init__()
        n, k = linear.out_features, linear.in_features
        if not int4_supported(k, n, group_size):
            raise ValueError(f"int4 needs in_features divisible by {group_size}, got {k}")
        self.dtype = kernel_dtype  # bf16: the torch kernel's fast path here (fp16/fp32 run reference loops)
        self.in_features, self.out_features, self.group_size = k, n, group_size
        q, scale, minimum = quantize_int4_groups(linear.weight, group_size)
        lib = lowbit.kernel() if group_size == lowbit.BLOCK and lowbit.supported(k) else None
        self.lowbit: lowbit.LowBitWeight | None = None
        if lib is not None and lowbit.fp16_fits(scale, minimum):
            self.lowbit = lowbit.LowBitWeight.int4(q, scale, minimum, lib)
            # [N, K/2 + K/8] uint8: each row's codes, then its fp16 scales and minimums (runtime/lowbit.py)
            self.weight = nn.Parameter(self.lowbit.rows, requires_grad=False)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # [N, K/2] uint8
            # The kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale.
            scales_and_zeros = torch.stack([scale, minimum + 8 * scale], dim=-1).transpose(0, 1)  # [K/g, N, 2]
            self.weight = nn.Parameter(packed, requires_grad=False)
            self.scales_and_zeros = nn.Parameter(scales_and_zeros.contiguous().to(self.dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowbit is not None:
            out = self.lowbit.matmul(x)
        else:
            out = int4_matmul(x, self.weight, self.group_size, self.scales_and_zeros, self.in_features,
                              self.out_features, self.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] this layer multiplies by (through the torch kernel itself, for tests)."""
        if self.lowbit is not None:
            return self.lowbit.dequantized()
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size,
                                                          self.scales_and_zeros).float().T.contiguous()

    def extra_repr(self) -> str:
        kind = ", low-bit kernel" if self.lowbit is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 weight-only g{self.group_size}{kind}")


class Bf16KernelLinear(nn.Module):
    """A bf16 Linear on the library's bf16 matmul (runtime/lowbit.py :class:`~openhydra.runtime.lowbit.Bf16Weight`):
    the same weights, read at close to the memory's bandwidth at batch 1, each row's output with the bits it gets
    alone up to ``self.lowbit.max_rows`` rows (``lowbit.bf16_kernel_rows``). Not a quantization: ``weight`` is the
    packed bf16 tensor."""

    def __init__(self, linear: nn.Linear, lib) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.lowbit = lowbit.Bf16Weight.of(linear.weight, lib)
        self.weight = nn.Parameter(self.lowbit.rows, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lowbit.matmul(x)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in fp32 (exactly the bf16 values), for tests."""
        return self.lowbit.dense().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16, low-bit library"


def _bf16_library(dtype: torch.dtype, device: str):
    """The low-bit library, where a span in ``dtype`` on ``device`` can run its matmuls on its bf16 kernel, else
    None."""
    lib = lowbit.kernel()
    return lib if lib is not None and dtype == torch.bfloat16 and device.split(":")[0] == "cpu" else None


def use_bf16_kernel(layers: nn.Module, dtype: torch.dtype, device: str) -> int:
    """At load, for an unquantized bf16 span on the CPU with ``hardware.matmul=library``, where the library runs: every
    ``nn.Linear`` of its decoder layers becomes a :class:`Bf16KernelLinear`, sibling projections fused as the
    quantized ones are (q/k/v, gate/up: rows independent, so the same bits). The head: :func:`use_bf16_head`.
    Returns how many Linears changed (0 elsewhere)."""
    lib = _bf16_library(dtype, device)
    if lib is None:
        return 0
    fused = fuse_projections(layers, lambda linear: Bf16KernelLinear(linear, lib))
    return fused + replace_linears(layers, lambda linear: Bf16KernelLinear(linear, lib))


class Bf16PackedEmbedding(nn.Module):
    """The embedding table of a span whose tied head runs on the bf16 kernel: lookups read the head's packed tensor
    (one copy of the table in memory); a row's values are the table's, exactly."""

    def __init__(self, head: Bf16KernelLinear, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = head.weight  # the same Parameter: counted once
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group = lowbit.BF16_GROUP
        return self.weight[ids // group, :, ids % group]  # [..., D]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bf16, the head's packed table"


def use_bf16_head(modules: nn.Module, dtype: torch.dtype, device: str) -> bool:
    """:func:`use_bf16_kernel` for the span's lm_head (``modules`` as :class:`ShardModules`): the head is the
    largest matmul of a small model (SmolLM2: 28M of 135M weights). Tied to the span's own embedding table, the
    table becomes lookups in the packed head (:class:`Bf16PackedEmbedding`). The coordinator's head under
    ``privacy=onion`` (peer/head.py) is built the same way. Returns whether the head changed."""
    lib = _bf16_library(dtype, device)
    head = getattr(modules, "lm_head", None)
    if lib is None or type(head) is not nn.Linear:
        return False
    embed = getattr(modules, "embed_tokens", None)
    tied = embed is not None and type(embed) is nn.Embedding and head.weight is embed.weight
    modules.lm_head = Bf16KernelLinear(head, lib)
    if tied:
        modules.embed_tokens = Bf16PackedEmbedding(modules.lm_head, embed.padding_idx)
    return True


class Int8Embedding(nn.Module):
    """An embedding table stored in int8 (the format of :func:`quantize_int8`); a lookup dequantizes only its rows."""

    def __init__(self, embedding: nn.Embedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight, self.scales = quantize_int8(embedding.weight)  # see Int8WeightOnlyLinear
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.lowbit = lowbit_int8(self.weight, self.scales, self.embedding_dim, self.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.lowbit is None:
            return self.weight[ids].to(self.dtype) * self.scales[ids].to(self.dtype)[..., None]  # [..., D]
        codes, scales, _ = self.lowbit.rows_of(ids)  # [..., D] in natural order, [..., D/32]
        return (codes * scales.repeat_interleave(lowbit.BLOCK, dim=-1)).to(self.dtype)

    def extra_repr(self) -> str:
        kind = "per-row" if self.lowbit is None else "blocks of 32"
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 {kind}"


def quantize_int8(weight: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter | None]:
    """int8 (weight, scales) for :class:`Int8WeightOnlyLinear` and :class:`Int8Embedding`: GGUF Q8_0-style blocks in
    the low-bit kernel's layout (codes and fp16 scales in one tensor, scales None) where that kernel runs, else
    per-row int8 with bf16 scales."""
    if lowbit.kernel() is not None and lowbit.supported(weight.shape[1]):
        q, d = lowbit.quantize_blocks8(weight)
        if lowbit.fp16_fits(d):
            return nn.Parameter(lowbit.LowBitWeight.int8(q, d, lowbit.kernel()).rows, requires_grad=False), None
    q, scales = quantize_int8_rows(weight)
    return nn.Parameter(q, requires_grad=False), nn.Parameter(scales.to(KERNEL_DTYPE), requires_grad=False)


def lowbit_int8(weight: torch.Tensor, scales: torch.Tensor | None, in_features: int,
                out_features: int) -> lowbit.LowBitWeight | None:
    """The kernel's view of a :func:`quantize_int8` pair in its own format (None for per-row int8)."""
    return None if scales is not None else lowbit.LowBitWeight(weight, in_features, out_features, 8, lowbit.kernel())


def quantize_cpu_head(modules: nn.Module, dtype: torch.dtype) -> None:
    """int8 for the lm_head and the embedding table; when tied, both use one int8 tensor (read once per token).

    ``modules`` has ``embed_tokens`` (or None) and ``lm_head`` (or None), as :class:`ShardModules`.
    """
    embed, head = getattr(modules, "embed_tokens", None), getattr(modules, "lm_head", None)
    tied = embed is not None and head is not None and head.weight is embed.weight
    if embed is not None and type(embed) is nn.Embedding:
        modules.embed_tokens = Int8Embedding(embed, dtype)
    if head is not None and type(head) is nn.Linear:
        shared = (modules.embed_tokens.weight, modules.embed_tokens.scales) if tied else None
        modules.lm_head = Int8WeightOnlyLinear(head, dtype, shared=shared)


def kernel_summary(root: nn.Module) -> str | None:
    """Which kernels run this module's CPU int8/int4 layers, for the status page and the log: "low-bit kernel
    (avx512-vnni)", "PyTorch's int4/int8 kernels", both with a comma, or None when it has none."""
    kinds = set()
    for module in root.modules():
        if isinstance(module, (Int4WeightOnlyLinear, Int8WeightOnlyLinear)):
            kinds.add("PyTorch's int4/int8 kernels" if module.lowbit is None else f"low-bit kernel ({lowbit.isa()})")
        elif isinstance(module, Bf16KernelLinear):
            kinds.add(f"bf16 on the low-bit library ({lowbit.isa()})")
    return ", ".join(sorted(kinds)) or None


FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling Linears of one parent that transformers' decoder layers call on the same input, in this order."""


class FusedProjections(nn.Module):
    """One quantized matmul for sibling projections of the same input; ``parts(x)`` gives each one's output.

    The parent keeps its attributes (``q_proj`` ...) as :class:`ProjectionSlice` modules, so transformers'
    layer code runs unchanged: the first slice called on an input computes all parts, the others take theirs
    (matched by the input tensor's identity, per thread, each part handed out once), so a layer still reads
    each weight once per step. runtime/lean_layers.py calls ``fused`` directly and takes views of its output.
    """

    def __init__(self, fused: nn.Module, names: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.fused = fused
        self.names, self.sizes = names, sizes
        self._pending = threading.local()  # (input, outputs, handed out) of the last call, per thread

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part.contiguous() for part in self.fused(x).split(self.sizes, dim=-1))

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pending = getattr(self._pending, "value", None)
        if pending is None or pending[0] is not x or pending[2][index]:
            pending = (x, self.parts(x), [False] * len(self.sizes))
        pending[2][index] = True
        self._pending.value = None if all(pending[2]) else pending  # nothing kept once every part is out
        return pending[1][index]

    def extra_repr(self) -> str:
        return "+".join(f"{n}[{s}]" for n, s in zip(self.names, self.sizes, strict=True))


class ProjectionSlice(nn.Module):
    """``parent.q_proj`` after fusion: its part of the :class:`FusedProjections` registered on the parent."""

    def __init__(self, group: FusedProjections, index: int, in_features: int) -> None:
        super().__init__()
        self.__dict__["group"] = group  # not a submodule: the parent owns the group (its weights counted once)
        self.index = index
        self.in_features, self.out_features = in_features, group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.group.names[self.index]} of fused_{'_'.join(self.group.names)}"


def replace_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every ``nn.Linear`` under ``root`` by ``make(linear)``, in place; returns how many were replaced."""
    targets = [(name, module) for name, module in root.named_modules() if type(module) is nn.Linear]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, leaf, make(linear))
    return len(targets)


def fuse_projections(root: nn.Module, quantize: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace each group of :data:`FUSABLE` sibling ``nn.Linear`` modules under ``root`` (same input size, all with
    or all without bias) by one ``quantize``d Linear of their stacked weights; returns how many Linears were fused."""
    fused = 0
    for parent in list(root.modules()):
        for names in FUSABLE:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(m) is nn.Linear for m in linears):
                continue
            if len({m.in_features for m in linears}) != 1 or len({m.bias is None for m in linears}) != 1:
                continue
            stacked = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears),
                                bias=linears[0].bias is not None, device="meta")
            stacked.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
            if stacked.bias is not None:
                stacked.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
            group = FusedProjections(quantize(stacked), names, tuple(m.out_features for m in linears))
            del stacked, linears
            setattr(parent, "fused_" + "_".join(names), group)
            for index, name in enumerate(names):
                setattr(parent, name, ProjectionSlice(group, index, group.fused.in_features))
            fused += len(names)
    return fused
