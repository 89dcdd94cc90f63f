"""OpenHydra's own low-bit CPU matmul (runtime/kernels/lowbit.c): 4- and 8-bit weights in blocks of 32 times int8
activations on AVX-512 VNNI (or AVX2), as llama.cpp multiplies its Q4_1 and Q8_0 tensors.

PyTorch's packed int4/int8 CPU kernels convert every weight to a float and take bf16 activations, so a node also
casts each projection's input and output; at batch 1 those kernels plus the casts were ~60% of an int4 token
(docs/benchmarks.md, "One node vs llama.cpp"). This kernel quantizes each activation row per block of 32 to int8
(scale = max|x| / 127, the scheme of llama.cpp's Q8_1) and multiplies byte pairs in integers (64 per instruction
with AVX-512 VNNI, 32 with AVX2), reading fp32 or bf16 input and writing the input's dtype directly. The weights'
layout: :class:`LowBitWeight`. Both paths compute the same integers and the same float operations, so a node on an
AVX2-only CPU gets the bits of one with AVX-512 VNNI (tested).

It is compiled once per machine at first use (``cc -O3 -march=native -fno-math-errno -fopenmp``, 0.2 s here) into
``$OPENHYDRA_CACHE/kernels/`` (keyed by the source, the compiler and the CPU's flags) and loaded with ctypes.
Where the CPU has neither AVX-512 VNNI nor AVX2 (with FMA and F16C), no C compiler is found, or
``OPENHYDRA_LOWBIT=0``, :func:`kernel` is None and runtime/quant_cpu.py keeps PyTorch's kernels (the earlier
behaviour, and the bits of the earlier releases). Which one a node runs: ``model.kernel`` in
``GET /v1/network/status`` and its "ready" log line.

A row's output does not depend on the other rows of its batch, the thread count, or the row count (each output is
one thread's fixed sequence of operations), so batched decode, speculative verification and prefill give each
position the bits it gets alone.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from openhydra.hardware.cpuinfo import cpuinfo_flags
from openhydra.runtime import hugepages

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "lowbit.c"
BLOCK = 32
PAIR = 64  # the K granularity the kernel takes: whole pairs of blocks (the shapes it is tested on)
ENV_SWITCH = "OPENHYDRA_LOWBIT"
MARCH_ENV = "OPENHYDRA_LOWBIT_MARCH"  # -march for the build (default native; tests build x86-64-v3 = AVX2 too)
ISAS = {2: "avx512-vnni", 1: "avx2"}  # oh_available()

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # [] = not tried yet; [None] = unavailable


class _Weight(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("group", ctypes.c_int32)]


def _cpu_flags() -> str:
    """The CPU's feature flags, space separated (empty where /proc/cpuinfo does not say)."""
    return " ".join(sorted(cpuinfo_flags() or ()))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cache_root: Path, march: str | None = None) -> Path | None:
    """Compile the kernel for ``-march=<march>`` (default ``$OPENHYDRA_LOWBIT_MARCH`` or ``native``) into
    ``cache_root/kernels/``, once: the file name carries a hash of the source, compiler, flags and CPU."""
    march = march or os.environ.get(MARCH_ENV) or "native"
    compiler = _compiler()
    if compiler is None:
        log.info("low-bit kernel: no C compiler found; using PyTorch's int4/int8 kernels")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # -ffp-contract=off: no multiply-add fused unless written (fmaf, intrinsics), so plain C code (the norms,
    # attention) computes the same bits whatever the vector width the compiler picks
    flags = ["-O3", f"-march={march}", "-fno-math-errno", "-ffp-contract=off"]
    identity = SOURCE.read_bytes() + version.encode() + " ".join(flags).encode() + _cpu_flags().encode()
    key = hashlib.sha256(identity).hexdigest()[:16]
    target = cache_root / "kernels" / f"lowbit-{key}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            # with OpenMP for hardware.threads > 1; a compiler without it (Apple clang) builds the one-thread kernel
            for openmp in (["-fopenmp"], []):
                command = [compiler, *flags, *openmp, "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lm"]
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if done.returncode == 0:
                    break
            else:
                log.info("low-bit kernel: compiling failed; using PyTorch's kernels:\n%s", done.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: nodes starting together each build, one file wins
        for stale in target.parent.glob("lowbit-*.so"):  # an earlier version's or CPU's build (a loaded copy stays)
            if stale != target:
                stale.unlink(missing_ok=True)
    except (OSError, subprocess.SubprocessError) as exc:  # an unwritable cache, a compiler that hangs
        log.info("low-bit kernel: building in %s failed (%s); using PyTorch's kernels", target.parent, exc)
        return None
    return target


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot run here (then PyTorch's kernels are used)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_load())
    return _loaded[0]


def runnable_here(flags: set[str] | None = None) -> bool:
    """Whether this CPU can run one of the kernel's paths: AVX-512 VNNI, or AVX2 with FMA and F16C."""
    flags = set(_cpu_flags().split()) if flags is None else flags
    return "avx512_vnni" in flags or {"avx2", "fma", "f16c"} <= flags


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0" or not runnable_here():
        return None
    from openhydra.runtime.model_cache import default_cache_root

    path = _build(default_cache_root())
    return None if path is None else open_library(path)


def open_library(path: Path) -> ctypes.CDLL | None:
    """Load a built kernel; None if it does not load or was built without a kernel path."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        log.info("low-bit kernel: loading %s failed (%s); using PyTorch's kernels", path, exc)
        return None
    lib.oh_available.restype = ctypes.c_int
    lib.oh_group_rows.restype = ctypes.c_int
    lib.oh_matmul.restype = ctypes.c_int
    lib.oh_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int]
    lib.oh_matmul_bf16.restype = ctypes.c_int
    lib.oh_matmul_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.oh_rms_norm.restype = ctypes.c_int
    lib.oh_rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_void_p]
    lib.oh_attention.restype = ctypes.c_int
    lib.oh_attention.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    lib.oh_attention_rows.restype = ctypes.c_int
    lib.oh_attention_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    lib.oh_append_attention_rows.restype = ctypes.c_int
    lib.oh_append_attention_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                             ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    if lib.oh_available() not in ISAS:
        return None
    log.info("low-bit kernel (%s): %s", ISAS[lib.oh_available()], path)
    return lib


def isa() -> str | None:
    """Which path of the kernel this node runs ("avx512-vnni" or "avx2"), or None for PyTorch's kernels."""
    lib = kernel()
    return None if lib is None else ISAS[lib.oh_available()]


MAX_K = 32768  # lowbit.c's MAX_K: the largest K it is tested on (an fp32 sum of 1024 blocks' terms)


def supported(in_features: int) -> bool:
    """Whether the kernel takes this K (whole pairs of blocks, up to :data:`MAX_K`); else PyTorch's kernels."""
    return in_features % PAIR == 0 and 0 < in_features <= MAX_K


def quantize_blocks8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of 32 along K (GGUF Q8_0): ``w ~= q * d``; (q [N, K] int8, d [N, K/32] fp32).
    A dequantized Q8_0 tensor gives back its own codes (its d is the block's max / 127)."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127.0
    q = torch.round(blocks / torch.where(d > 0, d, 1.0)[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), d


def fp16_fits(scale: torch.Tensor, minimum: torch.Tensor | None = None) -> bool:
    """Whether block scales (and minimums) survive fp16, the kernel's format: finite, and no nonzero scale below
    fp16's normal range, where it would keep too few bits (a minimum there is off by < 6e-8, negligible).
    GGUF's Q4_1 and Q8_0 scales are fp16 already."""
    if not torch.isfinite(scale.to(torch.float16)).all() or bool(((scale != 0) & (scale.abs() < 2.0**-14)).any()):
        return False
    return minimum is None or bool(torch.isfinite(minimum.to(torch.float16)).all())


def _codes_bytes(bits: int, group: int) -> int:
    """Bytes of codes per group of rows and block of 32 in the groups layout (lowbit.c ``scales_at``)."""
    return 16 * group if bits == 4 else 32 * group


def _record_bytes(bits: int, group: int) -> int:
    """Bytes per group of rows and block of 32 in the groups layout: codes, fp16 scales, fp16 minimums (4-bit)."""
    return _codes_bytes(bits, group) + 2 * group * (2 if bits == 4 else 1)


def pack_groups(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int,
                group: int) -> torch.Tensor:
    """Codes q [N, K] (0..15, or -127..127 for 8-bit) and block scales (minimums) [N, K/32] -> the groups layout
    [ceil(N/group), K/32 * record bytes] of lowbit.c (``group`` rows per record, one per 32-bit lane: 16 on
    AVX-512, 8 on AVX2; rows past N are zeros); read back by :meth:`LowBitWeight.rows_of`."""
    n, k = q.shape
    blocks, groups = k // BLOCK, -(-n // group)
    pad = groups * group - n
    codes = torch.nn.functional.pad(q.to(torch.int16) + (128 if bits == 8 else 0), (0, 0, 0, pad)).to(torch.uint8)
    codes = codes.reshape(groups, group, blocks, 8, 4).permute(0, 2, 3, 1, 4)  # [G, blocks, k-quad, row, 4]
    if bits == 4:
        codes = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)  # part t: k-quad 2t low, 2t + 1 high
    parts = [codes.reshape(groups, blocks, -1)]
    for values in (scale, minimum) if bits == 4 else (scale,):
        half = torch.nn.functional.pad(values.to(torch.float16), (0, 0, 0, pad))  # [Np, blocks]
        parts.append(half.reshape(groups, group, blocks).permute(0, 2, 1).contiguous().view(torch.uint8))
    return hugepages.place(torch.cat(parts, dim=2).reshape(groups, -1))  # streamed every step: 2 MiB pages


def library_matmul(x: torch.Tensor, in_features: int, out_features: int, what: str,
                   call: Callable[[torch.Tensor, int, torch.Tensor, bool], int]) -> torch.Tensor:
    """x [..., K] times a library weight [N, K]: fp32 or bf16 rows read and written in x's dtype (other dtypes go
    through fp32); ``call(x, rows, out, bf16)`` runs the library on contiguous x and returns its status."""
    dtype = x.dtype
    if dtype is not torch.float32 and dtype is not torch.bfloat16:
        return library_matmul(x.to(torch.float32), in_features, out_features, what, call).to(dtype)
    if not x.is_cpu or x.shape[-1] != in_features:
        raise ValueError(f"{what}: needs a CPU tensor [..., {in_features}], got {tuple(x.shape)} on {x.device}")
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], out_features), dtype=dtype)
    status = call(x, x.numel() // in_features, out, dtype is torch.bfloat16)
    if status != 0:
        raise RuntimeError(f"{what} failed ({status})")
    return out


@dataclass(eq=False)
class LowBitWeight:
    """One weight [N, K] in the kernel's layout; ``matmul(x)`` = x @ W^T for x [..., K] fp32 or bf16.

    The groups layout (:func:`pack_groups`, lowbit.c): ``group`` weight rows per record, each row one 32-bit lane of a
    vector register (16 with AVX-512 VNNI, 8 with AVX2: the library's ``oh_group_rows()``), so a block of 32 costs 8
    ``vpdpbusd`` for 16 rows (or 8 ``vpmaddubsw`` and one ``vpmaddwd`` for 8) and a row needs no horizontal sum.
    ``rows`` is the packed tensor [ceil(N/group), K/32 * record bytes], one run of memory: a decode streams every
    weight once, and with codes, scales and minimums in separate arrays an earlier kernel ran 1.55x slower from
    memory."""

    rows: torch.Tensor
    in_features: int
    out_features: int  # the groups layout pads N to a multiple of the group
    bits: int
    lib: ctypes.CDLL

    def __post_init__(self) -> None:
        self.group = self.lib.oh_group_rows()  # the layout the library's path reads
        if self.rows.dtype != torch.uint8:
            raise ValueError(f"low-bit weight: expected uint8, got {self.rows.dtype}")
        expected = (-(-self.out_features // self.group), self.in_features // BLOCK * _record_bytes(self.bits,
                                                                                                   self.group))
        if tuple(self.rows.shape) != expected:
            raise ValueError(f"low-bit weight: expected {expected}, got {tuple(self.rows.shape)}")
        self._struct = _Weight(self.rows.data_ptr(), self.out_features, self.in_features, self.bits, self.group)
        self._handle = ctypes.addressof(self._struct)
        self._call = self.lib.oh_matmul

    @classmethod
    def int4(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, lib: ctypes.CDLL) -> LowBitWeight:
        """From 4-bit codes q [N, K] in 0..15 with ``w = minimum + q * scale`` per block of 32."""
        n, k = q.shape
        return cls(pack_groups(q, scale, minimum, 4, lib.oh_group_rows()), k, n, 4, lib)

    @classmethod
    def int8(cls, q: torch.Tensor, scale: torch.Tensor, lib: ctypes.CDLL) -> LowBitWeight:
        """From int8 codes q [N, K] in -127..127 with ``w = q * scale`` per block of 32."""
        n, k = q.shape
        return cls(pack_groups(q, scale, None, 8, lib.oh_group_rows()), k, n, 8, lib)

    def rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rows ``ids`` [...] of the weight: codes [..., K] (int16 in natural order; signed for 8-bit), scales and
        minimums [..., K/32] fp32 (minimums None for 8-bit). What an embedding lookup reads: each row's bytes
        gathered from its group's records."""
        k, blocks = self.in_features, self.in_features // BLOCK
        code_at, shift, scale_at, minimum_at = self._lane_bytes()
        groups, lanes = (ids // self.group).reshape(-1, 1), (ids % self.group).reshape(-1)
        raw = self.rows[groups, code_at[lanes]]
        codes = ((raw >> shift[lanes]) & 0x0F).to(torch.int16) if self.bits == 4 else raw.to(torch.int16) - 128

        def halves(at: torch.Tensor) -> torch.Tensor:
            return self.rows[groups, at[lanes]].view(torch.float16).to(torch.float32).reshape(*ids.shape, blocks)

        return codes.reshape(*ids.shape, k), halves(scale_at), halves(minimum_at) if self.bits == 4 else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return library_matmul(x, self.in_features, self.out_features, "low-bit kernel", lambda x, rows, out, bf16: (
            self._call(self._handle, x.data_ptr(), bf16, rows, out.data_ptr(), bf16, torch.get_num_threads())))

    def _lane_bytes(self) -> tuple[torch.Tensor, ...]:
        """The groups layout (:func:`pack_groups`), read per lane (a row within its group): the byte offsets of its
        K codes in K order [G, K], the shift of each code within its byte [G, K] (4-bit: 0 or 4), and the byte
        offsets of its K/32 fp16 scales and minimums [G, K/16] within the group's records. Built once."""
        cached = getattr(self, "_lane_index", None)
        if cached is None:
            k, group = self.in_features, self.group
            rec = _record_bytes(self.bits, group)
            width = _codes_bytes(self.bits, group)  # the codes' bytes per record; then the scales
            kk, lane = torch.arange(k), torch.arange(group)[:, None]
            quad = (kk % BLOCK) // 4  # k-quad within the block: part quad // 2 (4-bit, high nibble if odd) or quad
            part, shift = (quad // 2, 4 * (quad % 2)) if self.bits == 4 else (quad, torch.zeros_like(quad))
            codes = (kk // BLOCK) * rec + part * 4 * group + 4 * lane + kk % 4  # [G, K]
            byte = torch.arange(2 * (k // BLOCK))
            scales = (byte // 2) * rec + width + 2 * lane + byte % 2  # [G, K/16]
            cached = self._lane_index = (codes, shift.to(torch.uint8).expand(group, k), scales, scales + 2 * group)
        return cached

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] in natural order (for tests)."""
        codes, scales, minimums = self.rows_of(torch.arange(self.out_features))
        w = codes.to(torch.float32) * scales.repeat_interleave(BLOCK, dim=1)
        return w if minimums is None else minimums.repeat_interleave(BLOCK, dim=1) + w

    def block_scales(self) -> torch.Tensor:
        """The block scales [N, K/32] (fp32)."""
        return self.rows_of(torch.arange(self.out_features))[1]


BF16_GROUP = 16  # lowbit.c's bf16 layout: 16 weight rows per group, [K][16] each
BF16_KERNEL_ROWS = 64
"""On a CPU with bf16 dot products (:func:`bf16_kernel_rows`), up to this many activation rows a :class:`Bf16Weight`
runs on the library, each row with the bits it gets alone; longer inputs (a prefill's chunks) run on PyTorch's own
bf16 matmul of the unpacked weight, faster there: its kernels use those dot products, while the library's chains of
fp32 multiply-adds are compute-bound from ~16 rows (SmolLM2's layers, 1 thread: the two cross between 48 and 80 rows,
unpacking included, at 64 in two runs of three; bench/bench_bf16_rows.py, docs/benchmarks.md)."""
NATIVE_BF16_DOT = frozenset({"avx512_bf16", "amx_bf16"})


def bf16_kernel_rows(lib: ctypes.CDLL) -> int | None:
    """Up to how many activation rows a :class:`Bf16Weight` on ``lib`` runs on the library; None: every row count.
    :data:`BF16_KERNEL_ROWS` where PyTorch's bf16 matmul has the CPU's bf16 dot products (a native bf16 flag) and
    ``lib`` runs its AVX-512 path. Elsewhere PyTorch converts bf16 operands to fp32 inside its matmul, and the
    library was ~2x faster at one row and ~3.3x at every count from 4 to 256 (its AVX2 build against PyTorch held to
    AVX2 on this EPYC; bench/bench_bf16_rows.py): it takes them all, and a row's bits never depend on the row count
    there."""
    native = not NATIVE_BF16_DOT.isdisjoint(cpuinfo_flags() or ())
    return BF16_KERNEL_ROWS if native and ISAS[lib.oh_available()] == "avx512-vnni" else None


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] -> lowbit.c's bf16 layout [ceil(N/16), K, 16] (row n's weight k at [n // 16, k, n % 16]; rows
    past N zero), in 2 MiB pages where the machine has them (streamed every step)."""
    n, k = weight.shape
    groups = -(-n // BF16_GROUP)
    padded = torch.nn.functional.pad(weight.detach().to(torch.bfloat16), (0, 0, 0, groups * BF16_GROUP - n))
    return hugepages.place(padded.reshape(groups, BF16_GROUP, k).transpose(1, 2).contiguous())


@dataclass(eq=False)
class Bf16Weight:
    """One bf16 weight [N, K] in the library's bf16 layout (:func:`pack_bf16`); ``matmul(x)`` = x @ W^T.

    Up to ``max_rows`` rows of x (:func:`bf16_kernel_rows`; None: any number), ``oh_matmul_bf16``: per output, one
    chain of fp32 multiply-adds in k order (a bf16 product is exact in fp32), rounded to bf16 once at the end (fp32 x
    and output are taken as they are): an output's bits depend only on its own weight row and activation row, not on
    the row count, the other rows, the thread count or the build (AVX2 or AVX-512). So a decode step, a speculative
    verify's rows and a batched step give a position the same bits. At batch 1 it reads the weights at close to the
    memory's bandwidth (PyTorch's bf16 matmul at batch 1 here: about 1/3 of it). Longer inputs: PyTorch's matmul of
    the unpacked weight (a transient copy), with the bits PyTorch gives them."""

    rows: torch.Tensor
    in_features: int
    out_features: int
    lib: ctypes.CDLL
    max_rows: int | None = BF16_KERNEL_ROWS

    def __post_init__(self) -> None:
        expected = (-(-self.out_features // BF16_GROUP), self.in_features, BF16_GROUP)
        if self.rows.dtype != torch.bfloat16 or tuple(self.rows.shape) != expected:
            raise ValueError(f"bf16 kernel weight: expected bf16 {expected}, got {self.rows.dtype} "
                             f"{tuple(self.rows.shape)}")
        self._call = self.lib.oh_matmul_bf16

    @classmethod
    def of(cls, weight: torch.Tensor, lib: ctypes.CDLL) -> Bf16Weight:
        n, k = weight.shape
        return cls(pack_bf16(weight), k, n, lib, bf16_kernel_rows(lib))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if self.max_rows is not None and x.is_cpu and x.dtype in (torch.bfloat16, torch.float32) and (
                x.shape[-1] == k and x.numel() > self.max_rows * k):
            return torch.nn.functional.linear(x, self.dense().to(x.dtype))
        return self.on_library(x)

    def on_library(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T on the library whatever the row count (``matmul`` takes PyTorch's past ``max_rows`` rows;
        bench/bench_bf16_rows.py times the two on either side)."""
        return library_matmul(x, self.in_features, self.out_features, "bf16 kernel", lambda x, rows, out, bf16: (
            self._call(self.rows.data_ptr(), self.out_features, self.in_features, x.data_ptr(), bf16, rows,
                       out.data_ptr(), bf16, torch.get_num_threads())))

    def dense(self) -> torch.Tensor:
        """The weight [N, K] bf16 in natural order (a copy)."""
        return self.rows.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]


class KernelRMSNorm(torch.nn.Module):
    """transformers' RMSNorm of Llama and Qwen3 (variance in fp32, ``weight * x``), or with ``zero_centered``
    Qwen3.5's (``x * (1 + weight)``, the ``1 + weight`` computed once, as exactly as each call computed it), for fp32
    rows, as the library's ``oh_rms_norm``: one call instead of six PyTorch operations (pow, mean, add, rsqrt, two
    products: about 8 µs of dispatch per norm at batch 1, two norms per layer). Its sum of squares runs in another
    order than PyTorch's, so its bits are its own: a span uses it for every layer norm or for none
    (runtime/lean_layers.py ``use_kernel_norms``: fp32 spans whose matmuls all run on this kernel), in its lean and
    transformers' layers alike. A row's bits do not depend on the other rows, and are the same on the AVX2 and
    AVX-512 builds."""

    def __init__(self, norm: torch.nn.Module, lib: ctypes.CDLL, zero_centered: bool = False) -> None:
        super().__init__()
        if norm.weight.dtype != torch.float32 or norm.weight.dim() != 1:
            raise ValueError(f"kernel RMSNorm: needs a 1-D fp32 weight, got {norm.weight.dtype} {norm.weight.dim()}-D")
        self.weight = norm.weight
        self.variance_epsilon = float(getattr(norm, "variance_epsilon", None) or norm.eps)
        self.zero_centered = zero_centered
        weight = self.weight.detach()
        self._weight = (1.0 + weight if zero_centered else weight).contiguous()
        self._call = lib.oh_rms_norm
        self.train(norm.training)  # a new module trains by default; the lean step runs only in eval mode

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        k = self._weight.numel()
        if h.dtype is not torch.float32 or not h.is_cpu or h.shape[-1] != k:
            raise ValueError(f"kernel RMSNorm: needs fp32 CPU rows of {k}, got {h.dtype} {tuple(h.shape)} "
                             f"on {h.device}")
        x = h.contiguous()
        out = torch.empty_like(x)
        self._call(x.data_ptr(), self._weight.data_ptr(), self.variance_epsilon, x.numel() // k, k, out.data_ptr())
        return out

    def extra_repr(self) -> str:
        centered = ", 1 + weight" if self.zero_centered else ""
        return f"{self._weight.numel()}, eps={self.variance_epsilon}{centered}, low-bit library"


_ATTENTION_PARAMS = ctypes.c_int64 * 20
_F32 = torch.float32


def attention(lib: ctypes.CDLL, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None, scale: float, causal: bool, past: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale) v on the library (``oh_attention``): query [B, Hq, S, D], key and value [B, Hkv, T, D]
    fp32 CPU tensors with a contiguous last dimension (any other strides: cache views are read in place), D a
    multiple of 16, ``mask`` None or bool, broadcastable to [B, Hq, S, T] (True = attend), ``causal`` as PyTorch's
    ``is_causal`` (query s sees keys 0..s), or with ``past`` keys before the first query (query s sees keys
    0..past + s: S positions appended after ``past`` cached ones, as a verify's). Returns [B, S, Hq, D] contiguous.
    Each query row is computed alone in a fixed order: its bits do not depend on the other rows, heads or batch rows
    of the call, the thread count or the build (AVX2 or AVX-512); they are not PyTorch's (its own exp and sums). A
    call costs ~3 µs of Python and ctypes besides the arithmetic: the lean decode step calls it once per layer."""
    batch, heads, rows, dim = query.shape
    kb, kv_heads, positions, kd = key.shape
    if (kb != batch or kd != dim or value.shape != key.shape or query.dtype is not _F32 or key.dtype is not _F32
            or value.dtype is not _F32 or not query.is_cpu or not key.is_cpu or not value.is_cpu):
        raise ValueError(f"kernel attention: needs fp32 CPU query [B, Hq, S, D], key and value [B, Hkv, T, D]; got "
                         f"{query.dtype} {tuple(query.shape)}, {key.dtype} {tuple(key.shape)}, {value.dtype} "
                         f"{tuple(value.shape)} on {query.device}")
    if query.stride(3) != 1:  # any other strides are read in place (a cache's views are not copied)
        query = query.contiguous()
    if key.stride(3) != 1:
        key = key.contiguous()
    if value.stride(3) != 1:
        value = value.contiguous()
    qs, ks, vs = query.stride(), key.stride(), value.stride()
    pointer, mask_strides = None, (0, 0, 0, 0)
    if mask is not None:
        if mask.dtype is not torch.bool or not mask.is_cpu:
            raise ValueError(f"kernel attention: needs a bool CPU mask, got {mask.dtype} on {mask.device}")
        mask = mask.expand(batch, heads, rows, positions)  # strides 0 where broadcast: nothing copied
        pointer, mask_strides = mask.data_ptr(), mask.stride()
    params = _ATTENTION_PARAMS(batch, heads, kv_heads, rows, positions, dim, *qs[:3], *ks[:3], *vs[:3], *mask_strides,
                               past if causal else -1)
    out = torch.empty((batch, rows, heads, dim), dtype=_F32)
    status = lib.oh_attention(query.data_ptr(), key.data_ptr(), value.data_ptr(), pointer, params, scale,
                              torch.get_num_threads(), out.data_ptr())
    if status != 0:
        raise RuntimeError(f"kernel attention failed ({status}) on query {tuple(query.shape)}, key "
                           f"{tuple(key.shape)}")
    return out


def _rows_out(rows: int, real: int, heads: int, dim: int) -> torch.Tensor:
    """The [R, 1, Hq, D] output of a rows attention call: zeros where padding rows (past ``real``) are left as
    they are."""
    shape = (rows, 1, heads, dim)
    return torch.zeros(shape, dtype=_F32) if real < rows else torch.empty(shape, dtype=_F32)


def attention_rows(lib: ctypes.CDLL, query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                   scale: float) -> torch.Tensor:
    """:func:`attention` for a batched decode step in one call: query [R, Hq, 1, D] (one position per row; R may
    exceed ``len(keys)``: the rows past them are padding and get zeros), row r attending over its own keys[r] and
    values[r] [1, Hkv, T_r, D] (a session's cache views). Returns [R, 1, Hq, D]; each row has the bits
    :func:`attention` gives it alone (the library runs the same function per row)."""
    rows, heads, one, dim = query.shape
    real = len(keys)
    if one != 1 or len(values) != real or real > rows or query.dtype is not _F32 or not query.is_cpu:
        raise ValueError(f"kernel attention rows: query {query.dtype} {tuple(query.shape)}, {real} key and "
                         f"{len(values)} value tensors")
    if query.stride(3) != 1:
        query = query.contiguous()
    out = _rows_out(rows, real, heads, dim)
    if real == 0:
        return out
    kv_heads = keys[0].shape[1]
    meta: list[int] = []
    for k, v in zip(keys, values, strict=True):
        if (k.dtype is not _F32 or v.dtype is not _F32 or not k.is_cpu or not v.is_cpu or k.shape != v.shape
                or k.shape[0] != 1 or k.shape[1] != kv_heads or k.shape[3] != dim or k.stride(3) != 1
                or v.stride(3) != 1):
            raise ValueError(f"kernel attention rows: keys {k.dtype} {tuple(k.shape)}, values {v.dtype} "
                             f"{tuple(v.shape)}; query {tuple(query.shape)}")
        ks, vs = k.stride(), v.stride()
        meta += (k.shape[2], ks[1], ks[2], vs[1], vs[2])
    pointers = ctypes.c_void_p * real
    qs = query.stride()
    status = lib.oh_attention_rows(query.data_ptr(), qs[0], qs[1], real, pointers(*(k.data_ptr() for k in keys)),
                                   pointers(*(v.data_ptr() for v in values)), (ctypes.c_int64 * len(meta))(*meta),
                                   heads, kv_heads, dim, scale, torch.get_num_threads(), out.data_ptr())
    if status != 0:
        raise RuntimeError(f"kernel attention rows failed ({status}) on query {tuple(query.shape)}")
    return out


def append_attention_rows(lib: ctypes.CDLL, qk: torch.Tensor, heads: int, value: torch.Tensor, layers: list,
                          scale: float) -> torch.Tensor:
    """A batched decode step's K/V appends and :func:`attention_rows` in one library call: qk [R, Hq + Hkv, 1, D]
    (each row's query heads, then its new key heads), value [R, Hkv, 1, D], row r < len(layers) appending its new
    key and value to ``layers[r]`` (a session's :class:`~openhydra.runtime.kv_layer.AppendLayer`; no two rows the
    same layer) and attending over that cache alone; rows past them are padding (zeros). Returns [R, 1, Hq, D], each
    row with the bits of ``layers[r].update`` followed by :func:`attention_rows` (the library copies the new
    positions into the buffers :meth:`~openhydra.runtime.kv_layer.AppendLayer.reserve` made room in, then attends
    as there). What it saves is Python: per row and layer a reservation and two views instead of an update's
    copies, views and checks and attention_rows' per-row checks."""
    rows, total, one, dim = qk.shape
    real = len(layers)
    if (one != 1 or real > rows or qk.dtype is not _F32 or value.dtype is not _F32 or not qk.is_cpu
            or not value.is_cpu or qk.stride(3) != 1 or value.stride(3) != 1 or value.shape[0] != rows
            or value.shape[1] != total - heads or value.shape[3] != dim):
        raise ValueError(f"kernel append attention rows: qk {qk.dtype} {tuple(qk.shape)}, value {value.dtype} "
                         f"{tuple(value.shape)}, {real} layers")
    out = _rows_out(rows, real, heads, dim)
    if real == 0:
        return out
    key_like, value_like = qk[:1, heads:], value[:1]  # every row's new key and value have this shape and dtype
    shape = layers[0].append_shape(key_like, value_like)
    meta: list[int] = []
    key_at, value_at, ends = [], [], []
    for layer in layers:
        end = layer.reserve(key_like, value_like, shape) + 1
        layout = layer.layout
        key_at.append(layout[0])
        value_at.append(layout[1])
        ends.append(end)
        meta.append(end)
        meta.extend(layout[2:])
    pointers = ctypes.c_void_p * real
    qs, vs = qk.stride(), value.stride()
    status = lib.oh_append_attention_rows(qk.data_ptr(), qs[0], qs[1], qk.data_ptr() + 4 * heads * qs[1], qs[0],
                                          qs[1], value.data_ptr(), vs[0], vs[1], real, pointers(*key_at),
                                          pointers(*value_at), (ctypes.c_int64 * len(meta))(*meta), heads,
                                          total - heads, dim, scale, torch.get_num_threads(), out.data_ptr())
    if status != 0:  # nothing written: checked first
        raise RuntimeError(f"kernel append attention rows failed ({status}) on qk {tuple(qk.shape)}")
    for layer, end in zip(layers, ends, strict=True):
        layer.expose(end, lazily=True)  # nobody reads them in a batched step: views made if someone does
    return out
