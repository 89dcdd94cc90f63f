"""The low-bit kernel's packed weights in 2 MiB pages (Linux transparent huge pages), where the OS offers them.

A decode step streams every weight once. In 4 KiB pages that is a TLB miss, and a page walk, every 4 KiB: 32,000 of
them per token for SmolLM2's ~126 MB of int4 + int8 weights, and in a virtual machine each walk is two-dimensional
(guest and host tables). In 2 MiB pages the TLB covers the whole model. ``bench/bench_hugepages.py`` measures the
step both ways, interleaved in one process.

Only memory that is private to the process already goes here: the packed copies the kernel reads
(``lowbit.pack_groups``). Weights that are views of the mapped checkpoint (fp32) stay in the page cache, where nodes on
one machine share them. Tensors are carved from 2 MiB-aligned chunks of private anonymous memory marked
``MADV_HUGEPAGE`` (what ``transparent_hugepage/enabled = madvise``, a common default, asks for); a chunk is unmapped
when the last tensor in it is gone (:func:`release` after each load drops the arena's own hold).
``OPENHYDRA_HUGEPAGES=0``, a non-Linux OS or THP set to ``never``: plain torch allocations, the same bytes.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
CHUNK_BYTES = 32 << 20
"""Weights are carved from chunks this big (one bigger tensor gets a chunk of its own)."""
ALIGN = 4096
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
ENV = "OPENHYDRA_HUGEPAGES"


def available() -> bool:
    """Whether this OS can back memory with transparent huge pages on request."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_ENABLED.read_text()
    except OSError:
        return False


class HugePageArena:
    """Tensors carved from 2 MiB-aligned ``MADV_HUGEPAGE`` chunks, 4 KiB-aligned each (thread-safe)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._chunk: torch.Tensor | None = None  # uint8 view of the current chunk's aligned part
        self._used = 0
        self.chunks = 0  # chunks mapped so far (for tests and status)

    def _new_chunk(self, size: int) -> None:
        region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: faults then take 2 MiB pages
        whole = torch.frombuffer(region, dtype=torch.uint8)  # holds ``region`` alive as long as any view of it
        start = -whole.data_ptr() % HUGE_PAGE
        self._chunk, self._used = whole[start : start + size], 0
        self.chunks += 1

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            if self._chunk is None or self._used + nbytes > self._chunk.numel():
                self._new_chunk(max(self.chunk_bytes, -(-nbytes // HUGE_PAGE) * HUGE_PAGE))
            piece = self._chunk[self._used : self._used + nbytes]
            self._used += -(-nbytes // ALIGN) * ALIGN
        return piece.view(dtype).view(shape)


_arena: HugePageArena | None = None
_arena_lock = threading.Lock()


def release() -> None:
    """Stop carving from the current chunk (called after a model's weights are packed): the tensors keep their chunks
    alive and nothing else does, so a model dropped later gives all its memory back, and the next load starts afresh."""
    global _arena
    with _arena_lock:
        _arena = None


def anon_huge_bytes(pid: int | str = "self") -> int:
    """Anonymous memory of process ``pid`` in transparent huge pages (``AnonHugePages`` of its smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0" and available()


def place(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values in huge pages (a contiguous copy from the process's arena), or ``tensor`` itself where
    huge pages are off or unavailable."""
    global _arena
    if not enabled():
        return tensor
    with _arena_lock:
        if _arena is None:
            _arena = HugePageArena()
        arena = _arena  # a release() on another thread from here on leaves this carve to the arena it began in
    out = arena.empty(tuple(tensor.shape), tensor.dtype)
    out.copy_(tensor)
    return out
