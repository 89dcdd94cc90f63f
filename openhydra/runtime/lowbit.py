"""OpenHydra's own low-bit CPU matmul (runtime/kernels/lowbit.c): 4- and 8-bit weights in blocks of 32 times int8
activations on AVX-512 VNNI (or AVX2), as llama.cpp multiplies its Q4_1 and Q8_0 tensors.

PyTorch's packed int4/int8 CPU kernels convert every weight to a float and take bf16 activations, so a node also
casts each projection's input and output; at batch 1 those kernels plus the casts were ~60% of an int4 token
(docs/benchmarks.md, "One node vs llama.cpp"). This kernel quantizes each activation row per block of 32 to int8
(scale = max|x| / 127, the scheme of llama.cpp's Q8_1) and multiplies 64 byte pairs per instruction, reading fp32
or bf16 input and writing the input's dtype directly. The weights' layouts: :class:`LowBitWeight`.

It is compiled once per machine at first use (``cc -O3 -march=native -fopenmp``, 0.2 s here) into
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
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "lowbit.c"
BLOCK = 32
PAIR = 64  # the kernel's K granularity: two blocks (the rows layout's pair; the groups layout takes any K % 32)
ENV_SWITCH = "OPENHYDRA_LOWBIT"
MARCH_ENV = "OPENHYDRA_LOWBIT_MARCH"  # -march for the build (default native; tests build x86-64-v3 = AVX2 too)
ISAS = {2: "avx512-vnni", 1: "avx2"}  # oh_available()

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # [] = not tried yet; [None] = unavailable


class _Weight(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("bits", ctypes.c_int32),
                ("code_stride", ctypes.c_int64), ("scale_stride", ctypes.c_int64), ("layout", ctypes.c_int32)]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


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
    identity = SOURCE.read_bytes() + version.encode() + march.encode() + _cpu_flags().encode()
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
                command = [compiler, "-O3", f"-march={march}", *openmp, "-shared", "-fPIC", "-o", str(built),
                           str(SOURCE)]
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
    lib.oh_matmul.restype = ctypes.c_int
    lib.oh_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_int, ctypes.c_int]
    if lib.oh_available() not in ISAS:
        return None
    log.info("low-bit kernel (%s): %s", ISAS[lib.oh_available()], path)
    return lib


def isa() -> str | None:
    """Which path of the kernel this node runs ("avx512-vnni" or "avx2"), or None for PyTorch's kernels."""
    lib = kernel()
    return None if lib is None else ISAS[lib.oh_available()]


MAX_K = 32768  # lowbit.c's MAX_BLOCKS * 32: its per-row scratch lives on the stack


def supported(in_features: int) -> bool:
    """Whether the kernel takes this K (whole pairs of blocks, up to :data:`MAX_K`); else PyTorch's kernels."""
    return in_features % PAIR == 0 and 0 < in_features <= MAX_K


def lane_order(k: int) -> torch.Tensor:
    """Index [K]: position j of the rows layout (AVX2) holds element lane_order[j] (see lowbit.c)."""
    t = torch.arange(PAIR)
    within = ((t >> 2) & 1) * BLOCK + (((t >> 3) << 2) | (t & 3))  # [64] element of the pair at each position
    return (torch.arange(0, k, PAIR)[:, None] + within[None, :]).reshape(-1)


def natural_order(k: int) -> torch.Tensor:
    """Index [K]: element j of a row sits at position natural_order[j] of the rows layout."""
    return torch.argsort(lane_order(k))


def quantize_blocks8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of 32 along K (GGUF Q8_0): ``w ~= q * d``; (q [N, K] int8, d [N, K/32] fp32).
    A dequantized Q8_0 tensor gives back its own codes (its d is the block's max / 127)."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127.0
    q = torch.round(blocks / torch.where(d > 0, d, 1.0)[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), d


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] in 0..15 -> the kernel's bytes [N, K/2] (quads of blocks; see lowbit.c)."""
    n, k = q.shape
    lanes = q[:, lane_order(k)].to(torch.uint8).reshape(n, k // PAIR, PAIR)  # [N, pairs, 64]
    quads = (k // PAIR) // 2
    parts = [(lanes[:, 0 : 2 * quads : 2] | (lanes[:, 1 : 2 * quads : 2] << 4)).reshape(n, -1)]
    if (k // PAIR) % 2:
        last = lanes[:, -1]
        parts.append(last[:, :32] | (last[:, 32:] << 4))
    return torch.cat(parts, dim=1).contiguous()


def unpack_int4(codes: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: codes [N, K] in natural order (int16)."""
    n, pairs = codes.shape[0], k // PAIR
    quads = pairs // 2
    body = codes[:, : quads * PAIR].reshape(n, quads, PAIR)
    lanes = torch.stack([body & 0x0F, body >> 4], dim=2).reshape(n, 2 * quads, PAIR)
    if pairs % 2:
        last = codes[:, quads * PAIR :]
        lanes = torch.cat([lanes, torch.cat([last & 0x0F, last >> 4], dim=1)[:, None]], dim=1)
    out = torch.empty((n, k), dtype=torch.int16)
    out[:, lane_order(k)] = lanes.reshape(n, k).to(torch.int16)
    return out


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[N, G] values -> [N, 2G] bytes of their fp16 form."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def fp16_fits(scale: torch.Tensor, minimum: torch.Tensor | None = None) -> bool:
    """Whether block scales (and minimums) survive fp16, the kernel's format: finite, and no nonzero scale below
    fp16's normal range, where it would keep too few bits (a minimum there is off by < 6e-8, negligible).
    GGUF's Q4_1 and Q8_0 scales are fp16 already."""
    if not torch.isfinite(scale.to(torch.float16)).all() or bool(((scale != 0) & (scale.abs() < 2.0**-14)).any()):
        return False
    return minimum is None or bool(torch.isfinite(minimum.to(torch.float16)).all())


GROUP = 16  # rows per record in the groups layout (one 32-bit lane of a 512-bit register each)


def _record_bytes(bits: int) -> int:
    """Bytes per group of 16 rows and block of 32 in the groups layout: codes, fp16 scales, fp16 minimums (4-bit)."""
    return 256 + 64 if bits == 4 else 512 + 32


def pack_groups(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes q [N, K] (0..15, or -127..127 for 8-bit) and block scales (minimums) [N, K/32] -> the groups layout
    [ceil(N/16), K/32 * record bytes] of lowbit.c's ``dot_group`` (rows past N are zeros); read back by
    :meth:`LowBitWeight.rows_of`."""
    n, k = q.shape
    blocks, groups = k // BLOCK, -(-n // GROUP)
    pad = groups * GROUP - n
    codes = torch.nn.functional.pad(q.to(torch.int16) + (128 if bits == 8 else 0), (0, 0, 0, pad)).to(torch.uint8)
    codes = codes.reshape(groups, GROUP, blocks, 8, 4).permute(0, 2, 3, 1, 4)  # [G, blocks, k-quad, row, 4]
    if bits == 4:
        codes = codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)  # part t: k-quad 2t low, 2t + 1 high
    parts = [codes.reshape(groups, blocks, -1)]
    for values in (scale, minimum) if bits == 4 else (scale,):
        half = torch.nn.functional.pad(values.to(torch.float16), (0, 0, 0, pad))  # [Np, blocks]
        parts.append(half.reshape(groups, GROUP, blocks).permute(0, 2, 1).contiguous().view(torch.uint8))
    return torch.cat(parts, dim=2).reshape(groups, -1).contiguous()


@dataclass(eq=False)
class LowBitWeight:
    """One weight [N, K] in the kernel's layout; ``matmul(x)`` = x @ W^T for x [..., K] fp32 or bf16.

    Two layouts, by the kernel's path. ``groups`` (AVX-512 VNNI): 16 rows per record, each row one lane, so a block
    costs 8 ``vpdpbusd`` for 16 rows and no horizontal sums (:func:`pack_groups`, lowbit.c ``dot_group``).
    ``rows`` (AVX2): uint8 [N, row bytes], each row's codes (K/2 bytes for 4-bit, K for 8-bit, lane order), then its
    K/32 fp16 block scales, then (4-bit) its K/32 fp16 block minimums. Either way a weight is one run of memory: a
    decode streams every weight once, and with codes, scales and minimums in three separate arrays the kernel ran
    1.55x slower from memory (software prefetching did not help). ``rows`` is that one tensor."""

    rows: torch.Tensor
    in_features: int
    out_features: int  # the groups layout pads N to a multiple of 16
    bits: int
    lib: ctypes.CDLL

    def __post_init__(self) -> None:
        k, blocks = self.in_features, self.in_features // BLOCK
        self.layout = "groups" if self.lib.oh_available() == 2 else "rows"  # the one layout the lib's path reads
        if self.rows.dtype != torch.uint8:
            raise ValueError(f"low-bit weight: expected uint8, got {self.rows.dtype}")
        if self.layout == "groups":
            if self.rows.shape != (-(-self.out_features // GROUP), blocks * _record_bytes(self.bits)):
                raise ValueError(f"low-bit groups: unexpected shape {tuple(self.rows.shape)}")
            ptr = self.rows.data_ptr()
            self._struct = _Weight(ptr, ptr, ptr, self.out_features, k, self.bits, 0, 0, 1)
        else:
            width = k // 2 if self.bits == 4 else k
            if self.rows.shape != (self.out_features, width + 2 * blocks * (2 if self.bits == 4 else 1)):
                raise ValueError(f"low-bit rows: expected [N, {width} + scales], got {tuple(self.rows.shape)}")
            scales = self.rows[:, width : width + 2 * blocks].view(torch.float16)
            offsets = self.rows[:, width + 2 * blocks :].view(torch.float16) if self.bits == 4 else scales
            self._struct = _Weight(self.rows.data_ptr(), scales.data_ptr(), offsets.data_ptr(), self.out_features,
                                   k, self.bits, self.rows.stride(0), self.rows.stride(0) // 2, 0)
        self._handle = ctypes.addressof(self._struct)
        self._call = self.lib.oh_matmul

    @classmethod
    def int4(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, lib: ctypes.CDLL) -> LowBitWeight:
        """From 4-bit codes q [N, K] in 0..15 with ``w = minimum + q * scale`` per block of 32."""
        n, k = q.shape
        if lib.oh_available() == 2:
            return cls(pack_groups(q, scale, minimum, 4), k, n, 4, lib)
        return cls(torch.cat([pack_int4(q), _fp16_bytes(scale), _fp16_bytes(minimum)], dim=1).contiguous(), k, n, 4,
                   lib)

    @classmethod
    def int8(cls, q: torch.Tensor, scale: torch.Tensor, lib: ctypes.CDLL) -> LowBitWeight:
        """From int8 codes q [N, K] in -127..127 with ``w = q * scale`` per block of 32."""
        n, k = q.shape
        if lib.oh_available() == 2:
            return cls(pack_groups(q, scale, None, 8), k, n, 8, lib)
        codes = (q[:, lane_order(k)].to(torch.int16) + 128).to(torch.uint8)
        return cls(torch.cat([codes, _fp16_bytes(scale)], dim=1).contiguous(), k, n, 8, lib)

    def rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Rows ``ids`` [...] of the weight: codes [..., K] (int16 in natural order; signed for 8-bit), scales and
        minimums [..., K/32] fp32 (minimums None for 8-bit). What an embedding lookup reads."""
        k, blocks = self.in_features, self.in_features // BLOCK
        if self.layout == "groups":  # gather each row's bytes from its group's records (an embedding lookup per token)
            code_at, shift, scale_at, minimum_at = self._lane_bytes()
            groups, lanes = (ids // GROUP).reshape(-1, 1), (ids % GROUP).reshape(-1)
            raw = self.rows[groups, code_at[lanes]]
            codes = ((raw >> shift[lanes]) & 0x0F).to(torch.int16) if self.bits == 4 else raw.to(torch.int16) - 128

            def halves(at: torch.Tensor) -> torch.Tensor:
                return self.rows[groups, at[lanes]].view(torch.float16).to(torch.float32).reshape(*ids.shape, blocks)

            return (codes.reshape(*ids.shape, k), halves(scale_at),
                    halves(minimum_at) if self.bits == 4 else None)
        width = k // 2 if self.bits == 4 else k
        picked = self.rows[ids]
        scales = picked[..., width : width + 2 * blocks].contiguous().view(torch.float16).to(torch.float32)
        if self.bits == 4:
            codes = unpack_int4(picked[..., :width].reshape(-1, width), k).reshape(*ids.shape, k)
            minimums = picked[..., width + 2 * blocks :].contiguous().view(torch.float16).to(torch.float32)
            return codes, scales, minimums
        return picked[..., :width][..., natural_order(k)].to(torch.int16) - 128, scales, None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype is not torch.float32 and dtype is not torch.bfloat16:
            return self.matmul(x.to(torch.float32)).to(dtype)
        if not x.is_cpu or x.shape[-1] != self.in_features:
            raise ValueError(f"low-bit kernel: needs a CPU tensor [..., {self.in_features}], got {tuple(x.shape)} "
                             f"on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty((*x.shape[:-1], self.out_features), dtype=dtype)
        bf16 = dtype is torch.bfloat16
        status = self._call(self._handle, x.data_ptr(), bf16, x.numel() // self.in_features, out.data_ptr(), bf16,
                            torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"low-bit kernel failed ({status})")
        return out

    def _lane_bytes(self) -> tuple[torch.Tensor, ...]:
        """The groups layout (:func:`pack_groups`), read per lane (a row within its group): the byte offsets of its
        K codes in K order [16, K], the shift of each code within its byte [16, K] (4-bit: 0 or 4), and the byte
        offsets of its K/32 fp16 scales and minimums [16, K/16] within the group's records. Built once."""
        cached = getattr(self, "_lane_index", None)
        if cached is None:
            k, rec = self.in_features, _record_bytes(self.bits)
            width = 256 if self.bits == 4 else 512  # the codes' bytes per record; then 32 of scales, 32 of minimums
            kk, lane = torch.arange(k), torch.arange(GROUP)[:, None]
            quad = (kk % BLOCK) // 4  # k-quad within the block: part quad // 2 (4-bit, high nibble if odd) or quad
            part, shift = (quad // 2, 4 * (quad % 2)) if self.bits == 4 else (quad, torch.zeros_like(quad))
            codes = (kk // BLOCK) * rec + part * 64 + 4 * lane + kk % 4  # [16, K]
            byte = torch.arange(2 * (k // BLOCK))
            scales = (byte // 2) * rec + width + 2 * lane + byte % 2  # [16, K/16]
            cached = self._lane_index = (codes, shift.to(torch.uint8).expand(GROUP, k), scales, scales + 2 * GROUP)
        return cached

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] in natural order (for tests)."""
        codes, scales, minimums = self.rows_of(torch.arange(self.out_features))
        w = codes.to(torch.float32) * scales.repeat_interleave(BLOCK, dim=1)
        return w if minimums is None else minimums.repeat_interleave(BLOCK, dim=1) + w

    def block_scales(self) -> torch.Tensor:
        """The block scales [N, K/32] (fp32)."""
        return self.rows_of(torch.arange(self.out_features))[1]
