"""Detect this machine's hardware: backend, memory and a quick measured throughput.

Apple Silicon -> MLX, an NVIDIA GPU -> CUDA (``torch.cuda``), an AMD GPU -> ROCm (``torch.version.hip``),
anything else -> CPU. Memory comes from the OS (``/proc/meminfo`` and the cgroup limit on Linux,
``sysctl`` on macOS) and from the GPU driver through torch. The throughput figures are measured, not
looked up: a square fp32 matmul (GFLOP/s) and a large tensor copy (GB/s read + written), each for a
fixed short time on the device the node would use, about 0.3 s together.

The result is a :class:`HardwareProfile` (pydantic): the node logs it, auto-promotion
(``openhydra/hardware/promote.py``) reads it, and tests feed recorded profiles (JSON) to that logic.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from openhydra.hardware.cpuinfo import cpu_model

log = logging.getLogger(__name__)

Backend = Literal["mlx", "cuda", "rocm", "cpu"]
GIB = 1 << 30


class HardwareProfile(BaseModel):
    """What a machine offers a node. Bytes are bytes; rates are measured on the serving device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend
    device_name: str = Field(min_length=1, max_length=200)
    memory_total_bytes: int = Field(gt=0)  # system RAM (the cgroup limit if lower)
    memory_available_bytes: int = Field(ge=0)  # RAM free for a new process right now
    accelerator_memory_bytes: int | None = Field(default=None, gt=0)  # GPU memory (None: no discrete GPU)
    accelerator_available_bytes: int | None = Field(default=None, ge=0)
    cpu_cores: int = Field(ge=1)  # cores this process may use
    gflops: float = Field(ge=0)  # measured fp32 matmul throughput, GFLOP/s (0: not measured)
    memory_bandwidth_gbs: float = Field(ge=0)  # measured copy bandwidth, GB/s read + written (0: not measured)
    platform: str = ""  # e.g. "Linux x86_64"
    note: str | None = None  # a recorded fixture says where it comes from

    @property
    def serving_memory_bytes(self) -> int:
        """Bytes this node can give to weights: GPU memory on a discrete GPU, otherwise free RAM.

        On Apple Silicon memory is unified: at most 3/4 of it (macOS keeps the rest from the GPU).
        """
        if self.backend in ("cuda", "rocm") and self.accelerator_memory_bytes:
            free = self.accelerator_available_bytes
            return min(self.accelerator_memory_bytes, free) if free is not None else self.accelerator_memory_bytes
        if self.backend == "mlx":
            return min(self.memory_available_bytes, self.memory_total_bytes * 3 // 4)
        return self.memory_available_bytes

    def summary(self) -> str:
        accel = (f", {self.accelerator_memory_bytes / GIB:.1f} GiB accelerator memory"
                 if self.accelerator_memory_bytes else "")
        return (f"{self.backend} ({self.device_name}): {self.memory_total_bytes / GIB:.1f} GiB RAM "
                f"({self.memory_available_bytes / GIB:.1f} GiB free){accel}, {self.cpu_cores} core(s), "
                f"{self.gflops:.0f} GFLOP/s matmul, {self.memory_bandwidth_gbs:.1f} GB/s copy")


# -- what kind of machine ----------------------------------------------------------------------------

def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def detect_backend() -> Backend:
    """Apple Silicon -> mlx; a GPU torch sees -> rocm (HIP build) or cuda; otherwise cpu. No benchmark."""
    if is_apple_silicon():
        return "mlx"
    import torch

    if torch.cuda.is_available():
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return "cpu"


def _sysctl(name: str) -> str | None:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    if platform.system() == "Darwin":
        name = _sysctl("machdep.cpu.brand_string")
        if name:
            return name
    return cpu_model() or platform.processor() or platform.machine() or "unknown CPU"


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _cgroup_usage() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM, bounded by the cgroup limit on Linux."""
    if platform.system() == "Darwin":
        total = int(_sysctl("hw.memsize") or 0)
        page = int(_sysctl("hw.pagesize") or 4096)
        free_pages = 0
        try:
            vm = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=2).stdout
            for key in ("Pages free", "Pages inactive", "Pages purgeable"):
                match = re.search(rf"{key}:\s+(\d+)", vm)
                free_pages += int(match.group(1)) if match else 0
        except (OSError, subprocess.SubprocessError):
            pass
        return total, min(total, free_pages * page) if free_pages else total // 2
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable", info.get("MemFree", total // 2))
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        used = _cgroup_usage() or 0
        total, available = limit, min(available, max(0, limit - used))
    return total, available


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# -- quick measurements ------------------------------------------------------------------------------

def measure_throughput(device: str = "cpu", budget_s: float = 0.3) -> tuple[float, float]:
    """(GFLOP/s of an fp32 matmul, GB/s of a tensor copy) on ``device``, in about ``budget_s`` seconds."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        n = 1024 if device.startswith("cuda") else 384
        a = torch.randn(n, n, device=device)  # a, b: [n, n] fp32
        b = torch.randn(n, n, device=device)
        torch.mm(a, b)  # warm up (kernel selection, thread pool)
        sync()
        reps, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            if reps % 4 == 0:
                sync()
                if time.perf_counter() - started > budget_s / 2:
                    break
        gflops = 2 * n**3 * reps / (time.perf_counter() - started) / 1e9
        numel = (256 if device.startswith("cuda") else 16) * (1 << 20) // 4  # 256 / 16 MiB of fp32
        src = torch.empty(numel, device=device).fill_(1.0)  # src, dst: [numel]
        dst = torch.empty_like(src)
        dst.copy_(src)
        sync()
        reps, started = 0, time.perf_counter()
        while time.perf_counter() - started < budget_s / 2:
            dst.copy_(src)
            reps += 1
            if reps % 4 == 0:
                sync()
        sync()
        bandwidth = 2 * src.numel() * 4 * reps / (time.perf_counter() - started) / 1e9
    return round(gflops, 1), round(bandwidth, 2)


def detect(measure: bool = True, budget_s: float = 0.3) -> HardwareProfile:
    """This machine's profile; ``measure=False`` skips the throughput measurement (figures 0)."""
    backend = detect_backend()
    total, available = system_memory()
    accel_total = accel_free = None
    name = _cpu_name()
    device = "cpu"
    if backend in ("cuda", "rocm"):
        import torch

        props = torch.cuda.get_device_properties(0)
        name, accel_total, device = props.name, int(props.total_memory), "cuda"
        try:
            accel_free = int(torch.cuda.mem_get_info(0)[0])
        except RuntimeError:
            accel_free = None
    gflops = bandwidth = 0.0
    if measure:
        gflops, bandwidth = measure_throughput(device, budget_s)
    return HardwareProfile(
        backend=backend, device_name=name, memory_total_bytes=total, memory_available_bytes=available,
        accelerator_memory_bytes=accel_total, accelerator_available_bytes=accel_free, cpu_cores=usable_cores(),
        gflops=gflops, memory_bandwidth_gbs=bandwidth, platform=f"{platform.system()} {platform.machine()}",
    )


def main() -> None:
    """``python -m openhydra.hardware.detect``: print this machine's profile as JSON (a fixture)."""
    started = time.perf_counter()
    profile = detect()
    print(profile.model_dump_json(indent=2))
    log.info("detected in %.2f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
