"""What every benchmark prints with its result: the machine, its load, the versions (docs/benchmarks.md).

Figures taken on a loaded 2-core machine did not reproduce on a quiet one, and machines differ (AVX2 only,
AVX-512 without bf16, AVX-512 BF16), so each bench prints :func:`machine_banner` when it starts and the load
average again when it ends (:func:`announce`)."""

from __future__ import annotations

import atexit
import os
import platform

from openhydra.hardware.cpuinfo import cpu_model, cpuinfo_flags

SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_banner() -> str:
    """One line: load average, CPU model and its SIMD flags, core count, key versions."""
    model, flags = cpu_model() or platform.processor() or "?", cpuinfo_flags() or frozenset()
    simd = [f for f in SIMD_FLAGS if f in flags]
    versions = []
    for name in ("torch", "transformers", "grpc"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            continue
    return (f"load average {load_average()}; CPU {model} ({os.cpu_count()} cores; {' '.join(simd) or 'no avx2'}); "
            f"Python {platform.python_version()}; {', '.join(versions)}")


def announce() -> None:
    """Print the banner now and the load average when the process exits (a bench's first and last line)."""
    print(f"machine: {machine_banner()}", flush=True)
    atexit.register(lambda: print(f"load average at the end: {load_average()}", flush=True))
