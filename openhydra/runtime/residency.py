"""Where a process's memory is, and where the tensors a runtime holds live: mapped from a file or private.

A peer's cost to its machine is its proportional set size (PSS): private pages in full, pages shared with other
processes (library text, a weight file that several peers on one machine map) divided among them. Weights read
with ``safetensors.safe_open`` in the file's own dtype are views of a private file mapping (``rw-p``, nothing is
copied until a page is written): their pages are the page cache's, shared by every process mapping the file, and
only the pages a peer touches are resident. A cast, a quantization or ``torch.load`` makes private copies instead.

:func:`tensor_residency` says which of the two a module's tensors are (Linux ``/proc/self/maps``; on other systems
every tensor counts as private), :func:`smaps_breakdown` splits a process's RSS/PSS/USS into the weight files it
maps, anonymous memory (heap: Python objects, copied tensors, caches) and shared libraries.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel

_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")


class TensorResidency(BaseModel):
    """Bytes of distinct tensor storages, by where they live."""

    mapped_bytes: int = 0
    """Views of a file mapping (safetensors read without a copy): shared page cache, resident only when touched."""
    private_bytes: int = 0
    """Anonymous memory (copied, cast or computed tensors): this process's alone, resident in full."""
    mapped_files: list[str] = []

    @property
    def total_bytes(self) -> int:
        return self.mapped_bytes + self.private_bytes


def _file_mappings(maps_path: Path = Path("/proc/self/maps")) -> list[tuple[int, int, str]]:
    out = []
    try:
        text = maps_path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        match = _MAPS_LINE.match(line)
        if match and match.group(3).startswith("/"):
            out.append((int(match.group(1), 16), int(match.group(2), 16), match.group(3)))
    out.sort()
    return out


def tensor_residency(tensors: Iterable[torch.Tensor] | torch.nn.Module) -> TensorResidency:
    """Classify the distinct tensors in ``tensors`` (a module: its parameters and buffers, tied ones once)."""
    if isinstance(tensors, torch.nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    mappings = _file_mappings()
    starts = [m[0] for m in mappings]
    seen: set[tuple[int, int]] = set()
    result = TensorResidency()
    files: set[str] = set()
    for tensor in tensors:
        if tensor.is_meta or tensor.device.type != "cpu":
            continue
        # safetensors' views share one storage per file: key and count each tensor by its own extent.
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        if (ptr, nbytes) in seen or nbytes == 0:
            continue
        seen.add((ptr, nbytes))
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and mappings[i][0] <= ptr < mappings[i][1]:
            result.mapped_bytes += nbytes
            files.add(mappings[i][2])
        else:
            result.private_bytes += nbytes
    result.mapped_files = sorted(files)
    return result


class MemoryPart(BaseModel):
    """One part of a process's memory, in bytes (``/proc/<pid>/smaps``)."""

    rss: int = 0
    pss: int = 0
    uss: int = 0


def smaps_breakdown(pid: int | str = "self",
                    weight_suffixes: tuple[str, ...] = (".safetensors",)) -> dict[str, MemoryPart]:
    """RSS/PSS/USS of a process split into ``weights`` (mapped files ending in ``weight_suffixes``), ``anonymous``
    (heap, anonymous mappings, stacks), ``libraries`` (``.so`` files) and ``other`` files; plus ``total``."""
    parts = {name: MemoryPart() for name in ("weights", "anonymous", "libraries", "other", "total")}
    current: MemoryPart | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        match = _MAPS_LINE.match(line)
        if match:
            name = match.group(3)
            if name.endswith(weight_suffixes):
                current = parts["weights"]
            elif not name.startswith("/"):
                current = parts["anonymous"]  # [heap], [stack], anonymous, [vdso]...
            elif ".so" in Path(name).name:
                current = parts["libraries"]
            else:
                current = parts["other"]
            continue
        field, _, rest = line.partition(":")
        if current is None or field not in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
            continue
        kib = int(rest.split()[0]) * 1024
        for part in (current, parts["total"]):
            if field == "Rss":
                part.rss += kib
            elif field == "Pss":
                part.pss += kib
            else:
                part.uss += kib
    return parts
