"""Which dtype a CPU node computes in: bfloat16 only where this CPU runs it faster than float32.

bf16 halves the bytes a decoded token reads, but a CPU without native bf16 instructions converts every
bf16 operand to fp32 inside the matmul: on an AVX2-only EPYC a bf16 prefill measured 4-7x slower than
fp32 while bf16 decode was only ~1.1x faster; on a Zen 4 with AVX-512 BF16, bf16 won both (DESIGN §4).
So ``hardware.dtype: auto`` on the CPU is decided per machine, at start, in this order:

1. an explicit ``hardware.dtype`` is honoured as given;
   with ``quantization: int4`` (a CPU kernel that computes in bf16, or OpenHydra's low-bit kernel that reads either
   dtype), float32: the rest of the layer measured faster in float32 even on a CPU with native bf16; so does
   ``quantization: int8`` where the low-bit kernel runs (runtime/lowbit.py; elsewhere int8 keeps the rules below: its
   prefill dequantizes to the runtime dtype, 4x faster in bf16 on such a CPU);
2. a native bf16 flag (x86 ``avx512_bf16`` / ``amx_bf16``, ARM ``bf16`` / ``svebf16``, macOS
   ``hw.optional.arm.FEAT_BF16``) -> bfloat16, without measuring;
3. otherwise a quick measurement (0.1-0.3 s, once per process and thread count): a prefill-shaped
   (``[64, 1024] x [1024, 1024]``) and a decode-shaped (``[1, 2048] x [2048, 4096]``) ``F.linear`` in both
   dtypes, interleaved, median of 5 each; bfloat16 only if it is faster on both shapes, else float32;
4. when the span is known (:func:`fit_to_memory`, at load): float32 that would not fit the memory
   budget while bfloat16 would (or neither fits) -> bfloat16, saying so.

The decision and its reason (one line, e.g. ``float32: no native bf16 (avx2 only); measured bf16/fp32
prefill matmul 6.10x slower, decode matmul 1.10x faster (1 thread(s))``) go to the start banner, the log and
``GET /v1/network/status`` (``model.dtype_reason``). ``python -m openhydra.hardware.dtype`` prints it.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from openhydra.hardware.cpuinfo import cpuinfo_flags
from openhydra.hardware.detect import GIB

log = logging.getLogger(__name__)

CpuDtype = Literal["float32", "bfloat16"]
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "svebf16")  # x86 cpuinfo flags, ARM Features
PREFILL_SHAPE = (64, 1024, 1024)  # (rows, in, out): a 64-token chunk through a 1024-wide projection
DECODE_SHAPE = (1, 2048, 4096)  # one token through a 32 MiB (fp32) weight: past most caches, bandwidth bound
REPEATS = 5
QUANTIZED_FP32 = ("int4",)
QUANTIZED_FP32_REASON = ("quantization={}: the CPU int4 kernel computes in bf16 whatever the dtype, and the rest of "
                         "the layer (norms, rotary, attention) runs faster in float32 (bench/bench_cpu_dtype.py "
                         "--quantization int4, SmolLM2, 1 thread, a CPU with avx512_bf16: decode 92.7 vs 77.4 tok/s, "
                         "prefill equal)")
LOWBIT_INT8_REASON = ("quantization=int8 on OpenHydra's low-bit kernel (runtime/lowbit.py), which reads either dtype: "
                      "the rest of the layer runs faster in float32 (bench/profile_decode_step.py --quantization "
                      "int8 --prompt 200, SmolLM2, 1 thread, a CPU with avx512_bf16: decode step 9.28 vs 13.77 ms, "
                      "prefill 444 vs 447 ms)")

# What serving needs over the weights (KV cache, activations, fragmentation), as auto-promotion counts it
# (hardware/promote.py PromotionPolicy): weights x (1 + fraction) + fixed bytes, within free RAM - reserve.
OVERHEAD_FRACTION = 0.2
OVERHEAD_BYTES = 512 << 20
RESERVE_BYTES = 1 * GIB


class Bf16Measurement(BaseModel):
    """Median seconds of one matmul per shape and dtype; ratio > 1: bf16 slower."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_fp32_s: float = Field(gt=0)
    prefill_bf16_s: float = Field(gt=0)
    decode_fp32_s: float = Field(gt=0)
    decode_bf16_s: float = Field(gt=0)
    threads: int = Field(ge=1)

    @property
    def prefill_ratio(self) -> float:
        return self.prefill_bf16_s / self.prefill_fp32_s

    @property
    def decode_ratio(self) -> float:
        return self.decode_bf16_s / self.decode_fp32_s

    @property
    def bf16_faster(self) -> bool:
        """bf16 wins only if it is faster on both shapes (a node prefills and decodes)."""
        return self.prefill_ratio < 1.0 and self.decode_ratio < 1.0

    def describe(self) -> str:
        return (f"measured bf16/fp32 prefill matmul {_ratio_text(self.prefill_ratio)}, "
                f"decode matmul {_ratio_text(self.decode_ratio)} ({self.threads} thread(s))")


class DtypeChoice(BaseModel):
    """The dtype a node computes in and why (one line for the banner, the log and the status page)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["float32", "bfloat16", "float16"]
    reason: str = Field(min_length=1)
    automatic: bool  # hardware.dtype was auto: fit_to_memory may still move float32 to bfloat16
    measurement: Bf16Measurement | None = None

    def line(self) -> str:
        return f"{self.dtype}: {self.reason}"


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}x slower" if ratio >= 1.0 else f"{1 / ratio:.2f}x faster"


# -- what the CPU says it has --------------------------------------------------------------------------

def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (lower case), or None where this OS does not tell us."""
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=2).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return frozenset({"bf16"}) if out == "1" else frozenset() if out == "0" else None
    return cpuinfo_flags()


def simd_summary(flags: frozenset[str]) -> str:
    """A few words on the vector unit, for the reason line."""
    if "avx512f" in flags:
        return "avx512 without bf16"
    if "avx2" in flags:
        return "avx2 only"
    if "asimd" in flags or "neon" in flags:
        return "neon without bf16"
    return "no bf16 flag"


def native_bf16_flags(flags: frozenset[str] | None) -> list[str]:
    return [f for f in NATIVE_BF16_FLAGS if flags and f in flags]


# -- the measurement -----------------------------------------------------------------------------------

def _median_linear_s(shape: tuple[int, int, int], threads: int) -> tuple[float, float]:
    """(fp32, bf16) median seconds of ``F.linear`` on a ``shape = (rows, in, out)`` problem, interleaved."""
    import torch
    import torch.nn.functional as F

    rows, k, n = shape
    # Values do not change a dense matmul's time (none are denormal); linspace fills 8 M in ms, randn in 0.1 s.
    x32 = torch.linspace(-1.0, 1.0, rows * k).reshape(rows, k)  # x: [rows, k]
    w32 = torch.linspace(1.0, -1.0, n * k).reshape(n, k)  # w: [n, k]
    pairs = {torch.float32: (x32, w32), torch.bfloat16: (x32.bfloat16(), w32.bfloat16())}
    times: dict[torch.dtype, list[float]] = {d: [] for d in pairs}
    with torch.inference_mode():
        for x, w in pairs.values():
            F.linear(x, w)  # warm up: kernel choice, thread pool, first-touch pages
        for _ in range(REPEATS):
            for dtype, (x, w) in pairs.items():
                started = time.perf_counter()
                F.linear(x, w)
                times[dtype].append(time.perf_counter() - started)
    return statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])


@functools.lru_cache(maxsize=4)
def measure_bf16_vs_fp32(threads: int) -> Bf16Measurement:
    """bf16 against fp32 on a prefill- and a decode-shaped matmul, with ``threads`` torch threads (cached)."""
    import torch

    from openhydra.runtime import compute_lane

    def measure() -> tuple[tuple[float, float], tuple[float, float]]:
        started = time.perf_counter()
        timed = _median_linear_s(PREFILL_SHAPE, threads), _median_linear_s(DECODE_SHAPE, threads)
        log.debug("bf16 vs fp32 measured in %.3f s", time.perf_counter() - started)
        return timed

    lane = compute_lane.current()
    if lane is not None and lane.threads == threads:  # where the node's steps will run, as they will run
        prefill, decode = lane.run(measure)
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            prefill, decode = measure()
        finally:
            torch.set_num_threads(before)
    return Bf16Measurement(prefill_fp32_s=prefill[0], prefill_bf16_s=prefill[1], decode_fp32_s=decode[0],
                           decode_bf16_s=decode[1], threads=threads)


# -- the decision (pure: flags and the measurement are handed in) ---------------------------------------

def choose_cpu_dtype(requested: str, flags: frozenset[str] | None,
                     measure: Callable[[], Bf16Measurement], quantization: str = "none",
                     lowbit_kernel: bool = False) -> DtypeChoice:
    """The CPU dtype for ``hardware.dtype = requested``; ``measure`` runs only when the flags do not decide.
    ``lowbit_kernel``: whether OpenHydra's low-bit kernel runs here (runtime/lowbit.py)."""
    if requested != "auto":
        return DtypeChoice(dtype=requested, reason="set by hardware.dtype", automatic=False)
    if quantization in QUANTIZED_FP32:
        return DtypeChoice(dtype="float32", reason=QUANTIZED_FP32_REASON.format(quantization), automatic=True)
    if quantization == "int8" and lowbit_kernel:
        return DtypeChoice(dtype="float32", reason=LOWBIT_INT8_REASON, automatic=True)
    native = native_bf16_flags(flags)
    if native:
        return DtypeChoice(dtype="bfloat16", reason=f"native bf16 on this CPU ({', '.join(native)})", automatic=True)
    measured = measure()
    cpu = "flags unknown" if flags is None else f"no native bf16 ({simd_summary(flags)})"
    dtype: CpuDtype = "bfloat16" if measured.bf16_faster else "float32"
    return DtypeChoice(dtype=dtype, reason=f"{cpu}; {measured.describe()}", automatic=True, measurement=measured)


def needed_bytes(parameters: int, bytes_per_parameter: int) -> int:
    """Memory to serve ``parameters`` weights: the weights, a fraction over them, and a fixed overhead."""
    return int(parameters * bytes_per_parameter * (1 + OVERHEAD_FRACTION)) + OVERHEAD_BYTES


def fit_to_memory(choice: DtypeChoice, parameters: int, budget_bytes: int) -> DtypeChoice:
    """An automatic float32 choice that would not fit ``budget_bytes`` becomes bfloat16 (half the bytes)."""
    if not choice.automatic or choice.dtype != "float32":
        return choice
    fp32, bf16 = needed_bytes(parameters, 4), needed_bytes(parameters, 2)
    if fp32 <= budget_bytes:
        return choice
    fits = "fits" if bf16 <= budget_bytes else "may not fit either"
    reason = (f"float32 would be faster, but this span's float32 weights need {fp32 / GIB:.1f} GiB and the memory "
              f"budget is {budget_bytes / GIB:.1f} GiB; bfloat16 needs {bf16 / GIB:.1f} GiB ({fits}) [{choice.reason}]")
    return choice.model_copy(update={"dtype": "bfloat16", "reason": reason})


# -- inputs from this machine ----------------------------------------------------------------------------

def memory_budget_bytes(memory_budget_gb: float | None) -> int:
    """hardware.memory_budget_gb if set, else free RAM (cgroup-aware) less a reserve for the OS."""
    if memory_budget_gb is not None:
        return int(memory_budget_gb * GIB)
    from openhydra.hardware.detect import system_memory

    return max(0, system_memory()[1] - RESERVE_BYTES)


def span_parameter_count(model_dir: str | Path, start: int, end: int | None) -> int:
    """Parameters of layers [start, end) of a safetensors checkpoint (plus embeddings / norm / head at the ends),
    read from the file headers only."""
    from openhydra.runtime.shard_layers import load_text_config
    from openhydra.runtime.weights import CheckpointIndex, open_safetensors

    total = load_text_config(model_dir).num_hidden_layers
    end = total if end is None else end
    index = CheckpointIndex.open(model_dir)
    names = [n for layer in range(start, end) for n in index.layer_tensor_names(layer).values()]
    ends = (["embed_tokens.weight"] if start == 0 else []) + (["norm.weight", "lm_head.weight"] if end == total else [])
    names += [n for canonical in ends if (n := index.source_name(canonical)) is not None]
    by_file: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        by_file.setdefault(index.weight_map[name], []).append(name)
    count = 0
    for file, file_names in by_file.items():
        with open_safetensors(index.root / file) as f:
            for name in file_names:
                shape = f.get_slice(name).get_shape()
                count += int(functools.reduce(lambda a, b: a * b, shape, 1))
    return count


def cpu_dtype_choice(requested: str, threads: int, quantization: str = "none") -> DtypeChoice:
    """This machine's choice (flags from the OS, the measurement with ``threads`` threads)."""
    lowbit_kernel = False
    if requested == "auto" and quantization == "int8":
        from openhydra.runtime import lowbit

        lowbit_kernel = lowbit.kernel() is not None
    return choose_cpu_dtype(requested, cpu_flags(), lambda: measure_bf16_vs_fp32(threads), quantization,
                            lowbit_kernel)


def main() -> None:
    """``python -m openhydra.hardware.dtype``: this CPU's automatic choice, with the load average."""
    import torch

    threads = int(os.environ.get("OPENHYDRA_THREADS", 0)) or torch.get_num_threads()
    started = time.perf_counter()
    choice = cpu_dtype_choice("auto", threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"hardware.dtype=auto on this CPU -> {choice.line()}")
    if choice.measurement is not None:
        m = choice.measurement
        print(f"  prefill {PREFILL_SHAPE}: fp32 {m.prefill_fp32_s * 1e3:.2f} ms, bf16 {m.prefill_bf16_s * 1e3:.2f} ms, "
              f"bf16/fp32 {m.prefill_ratio:.2f}")
        print(f"  decode {DECODE_SHAPE}: fp32 {m.decode_fp32_s * 1e3:.2f} ms, bf16 {m.decode_bf16_s * 1e3:.2f} ms, "
              f"bf16/fp32 {m.decode_ratio:.2f}")
    print(f"  decided in {time.perf_counter() - started:.2f} s; load average {' '.join(f'{x:.2f}' for x in load)}")


if __name__ == "__main__":
    main()
