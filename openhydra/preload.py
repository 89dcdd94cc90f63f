"""What a process that forks node processes imports before it forks, and how the pages stay shared after the fork.

Two users: the test suite's fork server (openhydra/testing/forkserver.py) and a ``-m`` sweep of nodes that serve
(openhydra/sweep.py), whose jobs run at once on one machine. Every node imports the same ~300 MiB of modules
(torch alone ~136 MiB of private memory per process; docs/benchmarks.md, "Peer memory per span"); nodes forked
from one process that imported them share those pages copy-on-write, as long as nothing writes to them.

The first writer is Python's own cycle collector: a full collection in a child touches the header of every object
it tracks, which copied ~106 MiB of the parent's pages into each child in a measurement (bench/bench_peer_memory.py,
``--sweep``). :func:`freeze` moves everything imported so far out of the collector's reach (``gc.freeze``) before
the fork, so a child copies only the pages it really writes.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import threading

PRELOAD = (
    "torch", "numpy", "transformers", "transformers.modeling_utils", "transformers.generation",
    "transformers.models.llama.modeling_llama", "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.qwen3_5.modeling_qwen3_5", "safetensors.torch", "tokenizers", "hydra", "omegaconf",
    "sanic", "pydantic", "cryptography.hazmat.primitives.ciphers.aead", "httpx",
    "openhydra.config.load", "openhydra.runtime.backend", "openhydra.runtime.shard", "openhydra.hardware.dtype",
    "openhydra.runtime.compaction.attention", "openhydra.economy.economy", "openhydra.crypto.identity",
    "openhydra.discovery.records", "openhydra.api.errors",
)
"""Imported before forking (a module missing here is simply imported by the child). Not gRPC (nor the modules that
import it: the node, the API, the router): gRPC does not support ``fork()`` after its import, so a process that has
``grpc`` loaded does not fork nodes. (The "Internal error from Core" once blamed on that came back in a CI run
without it: gRPC core itself reports some lost connections so; peer/errors.py::transport_status.) Not the modules a
child runs as ``__main__`` (``openhydra.cli``, ``openhydra.peer.server``): runpy would run a second copy of an
imported module, and warns."""


def preload(names: tuple[str, ...] = PRELOAD) -> dict[str, str]:
    """Import ``names``; the ones that failed, with why (the child imports them itself and reports it there)."""
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = repr(exc)
    return failed


def freeze() -> None:
    """Collect, then move every object that exists now out of the cycle collector's reach (see the module doc)."""
    gc.collect()
    gc.freeze()


def threads() -> int:
    """This process's threads (the kernel's count: also those Python did not start)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


_OPENBLAS_THREADS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                     "openblas_get_num_threads64_", "openblas_get_num_threads")


def openblas_workers() -> int:
    """Running worker threads of the OpenBLAS libraries loaded (NumPy's, SciPy's own copy: each running pool's
    size - 1). OpenBLAS stops them itself before a fork (its pthread_atfork handler: ``blas_server_avail`` drops to
    0) and starts them again when next used, so a pool that is down counts none."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return 0
    import ctypes

    workers = 0
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        name = next((n for n in _OPENBLAS_THREADS if hasattr(lib, n)), None)
        if name is None:
            continue
        try:
            running = ctypes.c_int.in_dll(lib, "blas_server_avail").value
        except ValueError:  # not exported by this build: assume its pool runs
            running = 1
        if running:
            workers += max(0, int(getattr(lib, name)()) - 1)
    return workers


def fork_hazard() -> str | None:
    """What in this process a forked child would inherit broken (None: nothing): another thread (an OpenMP pool, a
    gRPC poller) would be missing in the child with whatever lock it held, and gRPC does not survive a fork after
    its import. NumPy's OpenBLAS pool is no obstacle (see :func:`openblas_workers`). The test fork server checks
    this before each fork."""
    if "grpc" in sys.modules:
        return "gRPC is already imported in this process"
    count = threads() - openblas_workers()
    if count > 1:
        return f"this process runs {count} threads besides OpenBLAS's"
    return None


def fork_unsafe_because() -> str | None:
    """Why this process must not fork a node (None: it may): not Linux, or a :func:`fork_hazard`."""
    if not hasattr(os, "fork") or sys.platform != "linux":
        return f"no fork() on {sys.platform} for this (macOS frameworks do not survive it)"
    return fork_hazard()


def reseed() -> None:
    """In a forked child: random generators of its own, as a fresh process has (Python's ``random`` reseeds itself
    after a fork; NumPy's and torch's do not)."""
    import contextlib

    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed()
    with contextlib.suppress(ImportError):
        import torch

        torch.seed()
