"""Compute backends chosen by the `hardware/` config group.

`make_backend` is the `_target_` of every hardware option: it resolves `auto` against what this
machine has (CUDA/ROCm GPU, Apple Silicon, CPU), sets the thread count once for the process, and
returns an object that loads a model span with the chosen device and dtype.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openhydra.runtime.quantize import QuantizationUnavailable, method_for, require_method

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackendUnavailable(RuntimeError):
    pass


def _is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _mlx_available() -> bool:
    from openhydra.runtime.mlx_backend import mlx_import_error

    return mlx_import_error() is None


@dataclass
class TorchBackend:
    device: str
    dtype: torch.dtype
    threads: int
    quantization: str
    note: str | None = None
    """Why this is not exactly what the config asked for (logged at start)."""
    compaction: Any = None
    """The ``compaction/`` group (runtime/compaction/config.py CompactionConfig); build.py sets it."""

    name = "torch"

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"torch on {self.device}, {dtype}, {self.threads} thread(s), quantization={self.quantization}"

    def load_span(self, model_dir: Path, start: int, end: int | None):
        from openhydra.runtime.shard import ShardRuntime

        return ShardRuntime(model_dir, start, end, dtype=self.dtype, device=self.device, compaction=self.compaction,
                            quantization=self.quantization)


def make_backend(
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    quantization: str = "none",
    memory_budget_gb: float | None = None,
) -> Any:
    """A :class:`TorchBackend`, or an ``MlxBackend`` (runtime/mlx_backend.py) for ``backend: mlx``."""
    note = None
    if backend == "auto":  # hardware=auto: Apple Silicon -> mlx, NVIDIA -> cuda, AMD -> rocm, else cpu
        from openhydra.hardware.detect import detect_backend

        detected = detect_backend()
        log.info("hardware=auto: detected %s", detected)
        if detected in ("cuda", "rocm") and device == "auto":
            device = "cuda"  # ROCm builds of torch expose the GPU as a cuda device
    if backend == "mlx" or (backend == "auto" and detected == "mlx"):
        dtype = "bfloat16" if dtype == "auto" else dtype
        if _mlx_available():
            from openhydra.runtime.mlx_backend import MlxBackend

            if quantization != "none":
                note = f"quantization={quantization} is not implemented on MLX; weights stay {dtype}"
            if not _is_apple_silicon():
                note = "MLX runs on the CPU here (mlx[cpu], no Apple GPU)" + (f"; {note}" if note else "")
            if note:
                log.warning("hardware: %s", note)
            return MlxBackend(dtype=dtype, threads=threads, note=note)
        note = "MLX needs the mlx and mlx-lm packages (pip install 'openhydra-network[mlx]'); running PyTorch on CPU"
        backend, device = "torch", "cpu"
    if device in ("auto", "gpu"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"hardware asks for a CUDA/ROCm GPU but torch {torch.__version__} sees none; "
            "use hardware=cpu or hardware=auto"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailable("hardware asks for Apple MPS but torch sees none; use hardware=auto")
    if dtype == "auto":
        # Decode is memory-bandwidth bound: 16-bit weights read half the bytes of fp32.
        dtype = "bfloat16" if device == "cpu" or torch.cuda.is_bf16_supported() else "float16"
    try:
        require_method(method_for(quantization, device))  # int8/NF4 on CUDA and on the CPU (runtime/quantize.py)
    except QuantizationUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None
    if threads <= 0:
        threads = int(os.environ.get("OPENHYDRA_THREADS", 0)) or torch.get_num_threads()
    torch.set_num_threads(threads)
    chosen = TorchBackend(device=device, dtype=_DTYPES[dtype], threads=threads, quantization=quantization,
                          note=note)
    if note:
        log.warning("hardware: %s", note)
    return chosen
