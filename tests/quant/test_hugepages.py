"""The low-bit kernel's packed weights in 2 MiB pages (runtime/hugepages.py): placement, alignment, the OS's answer,
and the same bits as in ordinary memory."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from openhydra.runtime import hugepages, lowbit
from openhydra.runtime.quant_cpu import quantize_int4_groups


def _vmstat(name: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


def test_arena_tensors_are_aligned_disjoint_and_hold_their_values() -> None:
    arena = hugepages.HugePageArena(chunk_bytes=4 << 20)
    sources = [torch.randint(0, 255, shape, dtype=torch.uint8) for shape in ((300, 700), (1000,), (64, 64, 3))]
    placed = []
    for source in sources:
        out = arena.empty(tuple(source.shape), source.dtype)
        out.copy_(source)
        placed.append(out)
    floats = arena.empty((5, 7), torch.float32)
    floats.copy_(torch.arange(35.0).reshape(5, 7))
    big = arena.empty((5 << 20,))  # over a chunk: a chunk of its own, rounded up to whole huge pages
    big.fill_(7)
    for out, source in zip(placed, sources, strict=True):
        assert out.data_ptr() % hugepages.ALIGN == 0 and torch.equal(out, source)
    assert floats.data_ptr() % hugepages.ALIGN == 0 and torch.equal(floats, torch.arange(35.0).reshape(5, 7))
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in [*placed, floats, big])
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))  # no overlap
    assert arena.chunks == 2 and big.data_ptr() % hugepages.HUGE_PAGE == 0 and int(big.sum()) == 7 * (5 << 20)


@pytest.mark.skipif(not hugepages.available(), reason="this OS offers no transparent huge pages")
def test_the_os_backs_the_arena_with_huge_pages() -> None:
    """``MADV_HUGEPAGE`` before the first touch: faults take 2 MiB pages (or the kernel counts a fallback, which
    happens only when it has no free huge page; without the advice under THP=madvise neither counter moves)."""
    huge_before, fallback_before = hugepages.anon_huge_bytes(), _vmstat("thp_fault_fallback")
    arena = hugepages.HugePageArena(chunk_bytes=16 << 20)
    block = arena.empty((16 << 20,))
    block.fill_(1)  # touch every page
    grew = hugepages.anon_huge_bytes() - huge_before
    fell_back = _vmstat("thp_fault_fallback") - fallback_before
    assert grew >= 8 << 20 or fell_back > 0, (grew, fell_back)
    del block, arena


def test_packed_weights_land_in_huge_pages_and_compute_the_same_bits(monkeypatch) -> None:
    lib = lowbit.kernel()
    if lib is None:
        pytest.skip("no low-bit kernel here: the node uses PyTorch's kernels")
    torch.manual_seed(0)
    w = torch.randn(192, 576) * 0.05
    q = quantize_int4_groups(w, 32)
    monkeypatch.setenv(hugepages.ENV, "1")
    placed = lowbit.LowBitWeight.int4(*q, lib)
    monkeypatch.setenv(hugepages.ENV, "0")
    plain = lowbit.LowBitWeight.int4(*q, lib)
    assert torch.equal(placed.rows, plain.rows)
    if hugepages.available():
        arena = hugepages._arena
        assert arena is not None and arena._chunk is not None
        chunk_start = arena._chunk.data_ptr()
        assert chunk_start <= placed.rows.data_ptr() < chunk_start + arena._chunk.numel()
        assert not chunk_start <= plain.rows.data_ptr() < chunk_start + arena._chunk.numel()
    x = torch.randn(3, 576)
    assert torch.equal(placed.matmul(x), plain.matmul(x))


def test_switched_off_place_returns_the_tensor_itself(monkeypatch) -> None:
    monkeypatch.setenv(hugepages.ENV, "0")
    t = torch.arange(10)
    assert hugepages.place(t) is t


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / (1 << 20)


@pytest.mark.skipif(not hugepages.available(), reason="this OS offers no transparent huge pages")
def test_released_weights_give_their_memory_back(monkeypatch) -> None:
    """After a load the arena lets go of its chunk (``release``): dropping the weights unmaps their memory."""
    monkeypatch.setenv(hugepages.ENV, "1")
    hugepages.release()
    placed = hugepages.place(torch.ones(24 << 20, dtype=torch.uint8))  # 24 MiB, touched by the copy
    with_weights = _rss_mib()
    hugepages.release()
    del placed
    assert with_weights - _rss_mib() >= 16, (with_weights, _rss_mib())
