"""One thread per process runs a CPU node's multi-threaded compute: the compute lane.

Why. PyTorch's CPU wheels (and the low-bit library, runtime/lowbit.py) parallelise with GNU OpenMP. Every thread
that starts a parallel region of N threads becomes the master of its own pool of N - 1 workers, and the pools live
as long as their masters. Once the process's OpenMP threads outnumber its CPUs, libgomp stops letting idle workers
spin between regions (its "throttled" spin count: 100 turns instead of ~3 ms) and wakes them through the kernel for
every region instead. A decode step is a few hundred regions, microseconds apart. A node has many threads that
compute something (the event loop's inline steps, the shard worker's prefills, the decode batcher, the
coordinator's decode workers, the dtype measurement at start): measured on the 2-vCPU VMs of our CI (a process with
a second master holding a pool), a SmolLM2 ``cpu_int4`` decode step went from 4.0 to 12.2 ms and a bf16 one from
18.4 to 32.5 ms, so a node with its default thread count (every core) decoded slower than with one thread
(docs/benchmarks.md, "One compute lane").

What. Where a CPU node runs more than one thread (``hardware.threads``), the process default becomes one thread
(``torch.set_num_threads(1)``: every thread computes alone and never starts a pool), and one thread, the lane, is
given the node's N threads through the OpenMP runtime's per-thread setting (``omp_set_num_threads`` called on that
thread; MKL's per-thread setting where torch bundles MKL). Every step of the node's span runs on the lane: prefill
chunks, decode steps, verifies, continuous batching's batched forwards. So there is one pool of N threads in the
process and it spins between the regions of a step as OpenMP intends. Work elsewhere (sampling, embedding lookups,
encoding) runs on one thread, as it mostly did: its tensors are small.

With one thread (``hardware.threads=1``, what the benchmarks pin) there is no lane: nothing changes, and a peer
keeps running small steps on its event loop (peer/forward.py). ``OPENHYDRA_COMPUTE_LANE=0`` turns the lane off
(the earlier behaviour, for comparison: bench/bench_threads.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

ENV_SWITCH = "OPENHYDRA_COMPUTE_LANE"
SPIN_COUNT = "10000"
"""libgomp's spin count for a node's process (``GOMP_SPINCOUNT``; its default is 300,000, ~3 ms): long enough to
catch a step's next region (microseconds away), short enough that after a step the lane's workers sleep instead of
holding a core another node on the machine needs (bench/bench_threads.py --swarm)."""
T = TypeVar("T")

_lock = threading.Lock()
_lane: ComputeLane | None = None


def set_spin_default() -> bool:
    """``openhydra-node`` calls this first, before torch loads libgomp (which reads its environment once): sets
    ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless it or ``OMP_WAIT_POLICY`` is set, or torch is already imported.
    Returns whether it set it."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def _torch_cpu_library() -> ctypes.CDLL | None:
    """torch's CPU library: looking a symbol up through it finds the definition it was linked against (its OpenMP
    runtime among its dependencies), not another copy in the process (SciPy's wheels carry their own libgomp)."""
    import torch

    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


def openmp_runtime() -> Any | None:
    """torch's OpenMP runtime's ``omp_set_num_threads``/``omp_get_max_threads``, or None where they cannot be
    reached (then there is no lane)."""
    lib = _torch_cpu_library()
    if lib is None:
        return None
    try:
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        lib.omp_get_max_threads.restype = ctypes.c_int
    except AttributeError:
        return None
    return lib


def _mkl_set_local(lib: ctypes.CDLL) -> Callable[[int], Any] | None:
    """MKL's per-thread thread count (``MKL_Set_Num_Threads_Local``, C interface), looked up through torch's CPU
    library ``lib``, where torch bundles MKL: its fp32 matmuls otherwise follow the process default."""
    try:
        fn = lib.MKL_Set_Num_Threads_Local
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class ComputeLane:
    """A single worker thread whose OpenMP (and MKL) thread count is ``threads``; the process default stays 1.
    ``omp``: torch's CPU library as :func:`openmp_runtime` returns it."""

    def __init__(self, threads: int, omp: Any) -> None:
        self.threads = threads
        self._omp = omp
        self._mkl = _mkl_set_local(omp)
        self.jobs = 0  # calls run on the lane (status, tests)
        self.ident: int | None = None
        self.effective = 0  # torch.get_num_threads() seen on the lane once set up
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute-lane",
                                            initializer=self._setup)
        self._executor.submit(lambda: None).result()  # the thread exists and is set up before any step

    def _setup(self) -> None:
        import torch

        self.ident = threading.get_ident()
        torch.get_num_threads()  # torch's per-thread lazy set-up first: it would reset what follows
        self._omp.omp_set_num_threads(self.threads)
        if self._mkl is not None:
            self._mkl(self.threads)
        self.effective = torch.get_num_threads()

    def on_lane(self) -> bool:
        return threading.get_ident() == self.ident

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future:
        """``fn(*args, **kwargs)`` on the lane; on the lane itself it runs at once (a finished future)."""
        if self.on_lane():
            done: Future = Future()
            try:
                done.set_result(self._count(fn, *args, **kwargs))
            except BaseException as exc:  # handed to the caller through the future
                done.set_exception(exc)
            return done
        return self._executor.submit(self._count, fn, *args, **kwargs)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the lane, waited for (from any thread; on the lane it is a plain call)."""
        return self.submit(fn, *args, **kwargs).result()

    def _count(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.jobs += 1
        return fn(*args, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=True)  # the thread ends, and with it its OpenMP pool


def install(threads: int) -> ComputeLane | None:
    """At start, where the node sets its thread count (runtime/backend.py, CPU only): with ``threads`` > 1, the
    process default becomes 1 and a lane with ``threads`` is started (or kept, if one with that count runs). With 1,
    or with the lane switched off (``OPENHYDRA_COMPUTE_LANE=0``) or no OpenMP runtime found, the process default is
    ``threads`` and there is no lane. Returns the lane, if any."""
    import torch

    global _lane
    with _lock:
        wanted = threads > 1 and os.environ.get(ENV_SWITCH, "1") != "0"
        omp = openmp_runtime() if wanted else None
        if wanted and omp is None:
            log.info("compute lane: no OpenMP runtime found in this process; %d threads everywhere", threads)
        if _lane is not None and (omp is None or _lane.threads != threads):
            _lane.close()
            _lane = None
        if omp is None:
            torch.set_num_threads(threads)
            return None
        torch.set_num_threads(1)
        if _lane is None:
            lane = ComputeLane(threads, omp)
            if lane.effective != threads:  # the runtime did not take the per-thread setting: no lane
                log.warning("compute lane: asked for %d threads, the lane got %d; %d threads everywhere",
                            threads, lane.effective, threads)
                lane.close()
                torch.set_num_threads(threads)
                return None
            _lane = lane
            log.info("compute lane: %d threads on one thread, 1 elsewhere", threads)
        return _lane


def process_threads() -> int:
    """The threads a node computes with: the lane's, or torch's setting where there is no lane."""
    import torch

    lane = _lane
    return lane.threads if lane is not None else torch.get_num_threads()


def status() -> dict[str, Any]:
    """``/v1/network/status`` ``compute``: the threads, whether a lane runs them, and how many calls it ran."""
    import torch

    lane = _lane
    if lane is None:
        return {"threads": torch.get_num_threads(), "lane": False, "lane_calls": 0}
    return {"threads": lane.threads, "lane": True, "lane_calls": lane.jobs}


def current() -> ComputeLane | None:
    """The process's lane, or None (one thread, or switched off): callers then compute where they are."""
    return _lane


def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the lane if there is one, else here."""
    lane = _lane
    if lane is None:
        return fn(*args, **kwargs)
    return lane.run(fn, *args, **kwargs)
