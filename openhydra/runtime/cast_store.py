"""A span's weights kept in the dtype its node computes in, memory-mapped from the model cache.

A checkpoint stored in one dtype and served in another (the embedded SmolLM2, converted from its GGUF to float32, on
a CPU whose default is bfloat16; the hub's bfloat16 Qwen3.5 on a CPU that computes in float32) is cast at every load,
and the cast tensors are private anonymous memory: two nodes holding the same span on one machine each hold a copy,
and the kernel can never drop it under memory pressure. Read in the file's own dtype, the same tensors are views of
the file's mapping: page cache, shared by every process that maps the file, clean pages the kernel can reclaim.

So the first load of a span casts its tensors once into a safetensors file under ``<model cache>/casts/`` and every
later load on the machine maps that file. Nothing changes in the values: each tensor is ``stored.to(dtype)``, the
cast the load would have done, saved bit for bit (tests/runtime/test_cast_store.py compares every parameter).

The file follows the model cache's rules (runtime/model_cache.py):

* **One writer.** The cast is written under the file's ``flock``; a node that finds it held waits, then maps the
  finished file. It waits at most :data:`LOCK_WAIT_S` plus the time the span's bytes take at
  :data:`LOCK_WAIT_BYTES_PER_S` (a writer stopped or stuck on a slow disk), then casts in memory.
* **Nothing half-written is trusted.** It is written to ``<file>.partial-<pid>``, flushed and renamed into place. Its
  header records what it was cast from (the source file's path, size, mtime and inode, the dtype, the tensor names):
  a file whose record, names, dtypes or size do not match is not used but written again. When the source file
  changes (a new conversion or download), its older casts are removed. The source is stamped before the load opens
  it and again before a cast is used or put in place: a source replaced while it was being read is cast in memory,
  never kept under the new file's stamp. A writer removes its own file's partials under its lock, and another
  file's only under that file's lock (never by guessing from a pid, which another PID namespace may reuse).
* **Never a reason not to serve.** Any failure (a full disk, a read-only cache, a damaged file written again and
  damaged again) logs one warning and the load casts in memory as before. A cast needs disk space for the span's
  bytes plus :data:`MIN_FREE_BYTES`.

Used where the cast tensors are the weights a span serves: a CPU span whose matmuls stay PyTorch's (quantized and
library spans replace the cast tensors with their own layouts, so a file would be written for nothing), and the
coordinator's head. ``node.cast_weights: false`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when what a cast file holds changes: files of another format are not used (and are removed as stale)."""
STAMP_KEY = "openhydra_cast"
MIN_FREE_BYTES = 1 << 30
"""A cast is written only if the disk keeps at least this much free beyond it."""
LOCK_WAIT_S = 60.0
LOCK_WAIT_BYTES_PER_S = 50 * 2**20
"""How long a load waits for another process writing the same cast: LOCK_WAIT_S plus the span's cast bytes at this
rate, then it casts in memory."""

_root: Path | None = None


def configure(root: Path | None) -> None:
    """Where this process keeps cast weights (``<model cache>/casts``), or None: cast in memory at every load."""
    global _root
    _root = Path(root).expanduser() if root is not None else None


def current() -> Path | None:
    return _root


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_stamp(source: Path) -> dict[str, object]:
    """What identifies the source file's contents without reading them: replaced or rewritten, it stamps anew."""
    st = source.stat()
    return {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
            "format": FORMAT}


def cast_path(root: Path, source: Path, dtype: torch.dtype, names: list[str]) -> tuple[Path, dict[str, object]]:
    """The cast file of ``names`` (checkpoint names in ``source``) cast to ``dtype``, and the stamp it must carry."""
    stamp = {**source_stamp(source), "dtype": dtype_name(dtype), "names": _sha("\n".join(sorted(names)))}
    folder = root / _sha(str(source.resolve()))[:16]
    return folder / f"{dtype_name(dtype)}-{_sha(json.dumps(stamp, sort_keys=True))[:20]}.safetensors", stamp


def cast_tensors(source: Path, names: list[str], dtype: torch.dtype, read: Callable[[str], torch.Tensor],
                 opened: dict[str, object]) -> dict[str, torch.Tensor] | None:
    """``{name: read(name).to(dtype)}`` as views of a cast file in the configured store, writing the file if no
    valid one exists; None where there is no store or it cannot be used (the caller casts in memory).

    ``opened``: :func:`source_stamp` of ``source`` taken before the caller opened it (``read`` reads that opening).
    If the file on disk is no longer the one stamped then, the cast would describe one file and hold another's
    tensors: None."""
    root = current()
    if root is None or not names:
        return None
    path = source
    try:
        path, stamp = cast_path(root, source, dtype, names)
        if not _same_source(opened, stamp):
            log.warning("weights: %s changed while it was being loaded; casting in memory", source)
            return None
        found = _open_valid(path, stamp, names, dtype)
        if found is not None:
            return found
        return _write_then_open(path, stamp, names, dtype, read)
    except Exception as exc:  # the cache is an optimisation: a load never fails because of it
        log.warning("weights: could not use cast file %s (%s: %s); casting in memory", path, type(exc).__name__, exc)
        return None


_IDENTITY = ("source", "size", "mtime_ns", "inode")


def _same_source(a: dict[str, object], b: dict[str, object]) -> bool:
    return all(a.get(k) == b.get(k) for k in _IDENTITY)


def _open_valid(path: Path, stamp: dict[str, object], names: list[str], dtype: torch.dtype,
                warn: bool = True) -> dict[str, torch.Tensor] | None:
    """The file's tensors as views of its mapping, or None when it is missing or does not hold exactly this cast
    (said in a warning unless ``warn`` is false: the writer's second look, under the lock, after the first said it)."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            recorded = json.loads((f.metadata() or {}).get(STAMP_KEY, "null"))
            if recorded != stamp or set(f.keys()) != set(names):
                reason = "it was cast from another source or for other tensors"
                out = None
            else:
                out = {name: f.get_tensor(name) for name in names}
                wrong = [n for n, t in out.items() if t.dtype != dtype]
                reason = f"tensors {wrong[:3]} are not {dtype_name(dtype)}" if wrong else ""
                out = None if wrong else out
    except Exception as exc:  # safetensors' own error for a truncated or overwritten file
        reason, out = f"{type(exc).__name__}: {exc}", None
    if out is None and warn:
        log.warning("weights: cast file %s is not used (%s); writing it again", path, reason)
    return out


def _write_then_open(path: Path, stamp: dict[str, object], names: list[str], dtype: torch.dtype,
                     read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import save_file

    from openhydra.runtime.model_cache import cache_lock, fsync_dir

    # sized from the stored tensors (views of the source's mapping), before anything is cast
    needed = sum(read(name).numel() for name in names) * torch.empty((), dtype=dtype).element_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(path, "casting weights", deadline_s=LOCK_WAIT_S + needed / LOCK_WAIT_BYTES_PER_S):
        found = _open_valid(path, stamp, names, dtype, warn=False)
        if found is not None:  # another node wrote it while this one waited
            return found
        _remove_partials(path)  # a writer killed before its rename: nobody else writes them while this lock is held
        free = shutil.disk_usage(path.parent).free
        if free < needed + MIN_FREE_BYTES:
            log.warning("weights: not keeping a %s copy of %d tensors (%.0f MiB) in %s: %.1f GiB free; casting in "
                        "memory", dtype_name(dtype), len(names), needed / 2**20, path.parent, free / 2**30)
            return None
        _remove_stale(path, stamp)
        tensors = {name: read(name).to(dtype).contiguous() for name in names}
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            save_file(tensors, str(partial), metadata={STAMP_KEY: json.dumps(stamp, sort_keys=True)})
            del tensors  # the cast copies: the file's mapping replaces them below
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            if not _same_source(stamp, source_stamp(Path(str(stamp["source"])))):
                log.warning("weights: %s changed while it was being cast; casting in memory", stamp["source"])
                return None
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        fsync_dir(path.parent)
        log.info("weights: kept %d tensors (%.0f MiB) as %s in %s, mapped by every node on this machine that "
                 "serves them", len(names), needed / 2**20, dtype_name(dtype), path)
        return _open_valid(path, stamp, names, dtype)


def _remove_partials(path: Path) -> None:
    """``path``'s partial files; only under ``path``'s lock, which every writer of them holds while writing."""
    for partial in path.parent.glob(path.name + ".partial-*"):
        log.info("weights: removing %s, left by a writer that did not finish", partial)
        partial.unlink(missing_ok=True)


def _remove_stale(path: Path, stamp: dict[str, object]) -> None:
    """The casts in ``path``'s folder of an older version of the same source file (another size, mtime, inode or
    format), with their partials and lock files, and the partials of other casts nobody is writing. A file is
    removed only under its own lock (taken without waiting: one in use is left for later); a file that cannot be
    read or removed is left alone, it never stops this cast."""
    from safetensors import safe_open

    from openhydra.runtime.model_cache import cache_lock, lock_path_for

    same = ("size", "mtime_ns", "inode", "format")
    for other in sorted(path.parent.iterdir()):
        name = other.name
        if name.endswith(".lock") or other == path or not other.exists():  # gone with an earlier one's cast
            continue
        cast = other.with_name(name.partition(".partial-")[0]) if ".partial-" in name else other
        if cast == path or not cast.name.endswith(".safetensors"):
            continue
        stale = False
        if cast == other:
            try:
                with safe_open(other, framework="pt") as f:
                    recorded = json.loads((f.metadata() or {}).get(STAMP_KEY, "null"))
            except Exception:
                recorded = None
            recorded = recorded if isinstance(recorded, dict) else {}
            stale = any(recorded.get(k) != stamp[k] for k in same)
        if cast != other or stale:
            try:
                with cache_lock(cast, "removing an old cast", deadline_s=0):
                    if stale:
                        log.info("weights: removing %s, cast from an older version of %s", cast, stamp["source"])
                        cast.unlink(missing_ok=True)  # a process still mapping it keeps its pages until it unmaps
                    _remove_partials(cast)
                    if not cast.exists():  # nothing left to write or map under this name
                        lock_path_for(cast).unlink(missing_ok=True)
            except (TimeoutError, OSError) as exc:
                log.info("weights: left %s in place (%s)", other, exc)
