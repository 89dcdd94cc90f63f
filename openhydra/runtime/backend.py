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
from typing import TYPE_CHECKING, Any

import torch

from openhydra.runtime import compute_lane
from openhydra.runtime.quantize import QuantizationUnavailable, method_for, require_method

if TYPE_CHECKING:
    from openhydra.hardware.dtype import DtypeChoice

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
    matmul: str = "pytorch"
    """hardware.matmul: "library" puts an unquantized bf16 CPU span's matmuls on the low-bit library."""
    note: str | None = None
    """Why this is not exactly what the config asked for (logged at start)."""
    compaction: Any = None
    """The ``compaction/`` group (runtime/compaction/config.py CompactionConfig); build.py sets it."""
    dtype_choice: Any = None
    """Why this dtype (hardware/dtype.py DtypeChoice): banner, log and /v1/network/status."""
    memory_budget_gb: float | None = None

    name = "torch"

    @property
    def dtype_reason(self) -> str | None:
        return self.dtype_choice.reason if self.dtype_choice is not None else None

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        why = f"; {dtype}: {self.dtype_reason}" if self.dtype_reason else ""
        matmul = ", matmul=library" if self.matmul == "library" else ""
        return (f"torch on {self.device}, {dtype}, {self.threads} thread(s), quantization={self.quantization}"
                f"{matmul}{why}")

    def load_span(self, model_dir: Path, start: int, end: int | None):
        from openhydra.runtime.shard import ShardRuntime

        self._fit_dtype_to_memory(model_dir, start, end)
        # on the compute lane where there is one: quantizing at load uses the node's threads, as its steps do
        return compute_lane.run(ShardRuntime, model_dir, start, end, dtype=self.dtype, device=self.device,
                                compaction=self.compaction, quantization=self.quantization, matmul=self.matmul)

    def _fit_dtype_to_memory(self, model_dir: Path, start: int, end: int | None) -> None:
        """hardware.dtype=auto chose float32 on the CPU: fall back to bfloat16 if this span's fp32 weights don't fit."""
        choice = self.dtype_choice
        if choice is None or not choice.automatic or choice.dtype != "float32":
            return
        from openhydra.hardware.dtype import fit_to_memory, memory_budget_bytes, span_parameter_count

        try:
            parameters = span_parameter_count(model_dir, start, end)
        except Exception as exc:  # an estimate must never stop a load; ShardRuntime reports a bad checkpoint itself
            log.warning("hardware: could not size layers [%s, %s) of %s for the dtype choice (%s: %s); keeping %s",
                        start, end, model_dir, type(exc).__name__, exc, choice.dtype)
            return
        fitted = fit_to_memory(choice, parameters, memory_budget_bytes(self.memory_budget_gb))
        if fitted.dtype != choice.dtype:
            self.dtype_choice, self.dtype = fitted, _DTYPES[fitted.dtype]
            log.warning("hardware: dtype %s", fitted.line())


def make_backend(
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    quantization: str = "none",
    memory_budget_gb: float | None = None,
    matmul: str = "pytorch",
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
    try:
        require_method(method_for(quantization, device))  # int8/NF4 on CUDA and on the CPU (runtime/quantize.py)
    except QuantizationUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None
    if threads <= 0:
        threads = int(os.environ.get("OPENHYDRA_THREADS", 0)) or compute_lane.process_threads()
    if device == "cpu":  # all of the span's compute on one thread with `threads`, the rest on one (compute_lane.py)
        compute_lane.install(threads)
    else:
        torch.set_num_threads(threads)
    choice = _choose_dtype(dtype, device, threads, quantization)
    log.info("hardware: dtype %s", choice.line())
    chosen = TorchBackend(device=device, dtype=_DTYPES[choice.dtype], threads=threads, quantization=quantization,
                          matmul=matmul, note=note, dtype_choice=choice, memory_budget_gb=memory_budget_gb)
    if note:
        log.warning("hardware: %s", note)
    return chosen


def _choose_dtype(dtype: str, device: str, threads: int, quantization: str = "none") -> DtypeChoice:
    """hardware.dtype resolved for ``device``: the CPU decides by its flags and a measurement (hardware/dtype.py)."""
    from openhydra.hardware.dtype import DtypeChoice, cpu_dtype_choice

    if device == "cpu":
        return cpu_dtype_choice(dtype, threads, quantization)
    if dtype != "auto":
        return DtypeChoice(dtype=dtype, reason="set by hardware.dtype", automatic=False)
    # GPUs: decode is memory-bandwidth bound, and 16-bit weights read half the bytes of fp32.
    if torch.cuda.is_bf16_supported():
        return DtypeChoice(dtype="bfloat16", reason="this GPU supports bf16 (half the bytes of fp32)", automatic=True)
    return DtypeChoice(dtype="float16", reason="no bf16 on this device; float16 halves the bytes of fp32",
                       automatic=True)
