"""One model cache per machine: every node on it converts (or downloads) a model at most once.

Nodes that share a machine also share ``~/.cache/openhydra`` (``node.model_cache_dir``, or the
``OPENHYDRA_CACHE`` environment variable), whatever their own ``node.data_dir``. Materialising a folder
there follows three rules:

* **One writer.** An exclusive ``fcntl.flock`` on ``<folder>.lock`` (next to the folder) is held while
  converting. A node that finds it held logs that it is waiting, blocks, then reuses the finished folder.
* **Nothing half-written is trusted.** The converter writes into ``<folder>.partial-<pid>``; the lock
  holder checks the result, writes the completion marker (``openhydra-source.json``) and renames the
  folder into place in one ``rename``. A folder without a readable marker is never used: it is removed
  and converted again. Leftover ``.partial-*`` folders of a killed conversion are removed by the next one.
* **Damage is found, not served.** The marker records the folder's manifest (openhydra/weights/manifest.py:
  every file's size and every 1 MiB chunk's SHA-256). Every start compares the files' sizes with it (one
  ``stat`` per file): a truncated, missing or replaced file makes the folder untrusted, so it is converted
  again. ``python -m openhydra.runtime.model_cache --verify`` reads every byte against the chunk hashes (a
  flipped bit in a file of the right size) and ``--repair`` converts a damaged folder again.
* **Conversion memory stays out of the node.** The conversion runs in a child process
  (``python -m openhydra.runtime.convert_gguf``), so the serving process never holds the dequantized model;
  the child also exits when its parent dies, so a killed node leaves nothing writing into the cache.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from openhydra.weights.manifest import Manifest

log = logging.getLogger(__name__)

CACHE_ENV = "OPENHYDRA_CACHE"
DEFAULT_CACHE_ROOT = "~/.cache/openhydra"
COMPLETE_MARKER = "openhydra-source.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
WAIT_LOG_EVERY_S = 30.0
"""While blocked on another process' conversion, repeat the 'waiting' log line this often (s)."""
LOCK_POLL_S = 0.2


class ConversionError(RuntimeError):
    """The converter process failed or produced an incomplete folder."""


@dataclass(frozen=True)
class Materialized:
    path: Path
    converted: bool
    """True only for the one call (per machine and model) that ran the conversion."""
    waited_s: float
    """Time spent blocked on another process' conversion."""
    convert_s: float | None = None
    """Wall time of the converter child (None when nothing was converted)."""
    child_peak_rss_bytes: int | None = None
    """Peak resident memory of the converter child, from wait4's rusage (Linux reports KiB)."""


def default_cache_root() -> Path:
    """``$OPENHYDRA_CACHE`` or ``~/.cache/openhydra``: converted models under ``models/``, hub files under ``hub/``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def is_complete(folder: Path) -> bool:
    """A folder is trusted only with a readable completion marker, a config and weights, and files whose sizes
    are the ones its manifest recorded (:func:`untrusted_because`)."""
    return untrusted_because(folder) is None


def untrusted_because(folder: Path) -> str | None:
    """Why ``folder`` cannot be used as it is, from its marker and one ``stat`` per file; None when it can.

    A flipped bit inside a file of the right size is not seen here: :func:`verify` reads every byte.
    """
    return _checked(Path(folder))[0]


def _checked(folder: Path) -> tuple[str | None, Manifest | None]:
    """(why ``folder`` is not trusted or None, the manifest its marker pins when it has one)."""
    try:
        record = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return f"it has no readable completion marker ({COMPLETE_MARKER})", None
    if not isinstance(record, dict):
        return f"its completion marker ({COMPLETE_MARKER}) is not a JSON object", None
    if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "it has no config.json or no weights", None
    pinned = record.get("manifest")
    if not isinstance(pinned, str):  # converted before markers recorded the manifest: the marker is all we have
        return None, None
    from openhydra.weights.manifest import ManifestError, read_manifest

    try:
        signed = read_manifest(folder)
        manifest = signed.check(pinned) if signed is not None else None
    except (ManifestError, ValueError) as exc:
        return f"its manifest does not match the one recorded at conversion ({exc})", None
    if manifest is None:
        return "its manifest is missing", None
    for entry in manifest.files:
        path = folder / entry.path
        try:
            size = path.stat().st_size
        except OSError:
            return f"{entry.path} is missing", manifest
        if size != entry.size:
            return f"{entry.path} is {size:,} bytes; it was {entry.size:,} when converted", manifest
    return None, manifest


def verify(folder: Path, progress: bool = True) -> list[str]:
    """Read every byte of ``folder`` against its manifest's chunk hashes; returns what is damaged (empty: intact).

    Each problem names the file, the tensor (or header) and the byte range, so a report says which layers a
    damaged disk touched. Reads sequentially in 1 MiB chunks (~1 s per GB with SHA-NI), with a progress bar.
    """
    import itertools

    from tqdm import tqdm

    from openhydra.weights.manifest import read_manifest

    folder = Path(folder)
    reason, manifest = _checked(folder)
    if reason is not None:
        return [reason]
    if manifest is None:  # a marker from before manifests pinned one: the folder's own file, if any
        signed = read_manifest(folder)
        if signed is None:
            return ["it has no manifest to verify against"]
        manifest = signed.manifest
    chunks = manifest.chunks()
    damaged: list[str] = []
    bar = tqdm(total=sum(c.length for c in chunks), unit="B", unit_scale=True, desc=f"verifying {folder.name}",
               disable=not progress, mininterval=0.5)
    try:
        for path, file_chunks in itertools.groupby(chunks, key=lambda c: c.path):
            with open(folder / path, "rb") as f:
                for chunk in file_chunks:
                    if not chunk.intact_in(f.fileno()):
                        what = f"tensor {chunk.piece}" if chunk.piece else "header or small file"
                        damaged.append(f"{path} bytes [{chunk.offset:,}, {chunk.offset + chunk.length:,}) ({what}): "
                                       "SHA-256 differs from the manifest")
                    bar.update(chunk.length)
    finally:
        bar.close()
    return damaged


def lock_path_for(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextmanager
def cache_lock(target: Path, what: str, deadline_s: float | None = None) -> Iterator[float]:
    """Hold the exclusive lock of ``target``; yields the seconds spent waiting for it.

    The lock is an ``flock`` on an open file, so the kernel releases it when its holder exits or is killed:
    a crashed conversion never leaves the cache locked. ``deadline_s``: raise :class:`TimeoutError` instead of
    waiting longer than that (0: do not wait at all); None waits as long as the holder holds it.
    """
    lock_path = lock_path_for(target)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    started = time.monotonic()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if deadline_s == 0:
                raise TimeoutError(f"{lock_path} is held by pid {holder}") from None
            log.info("waiting for another process (pid %s) that is %s into %s (lock %s)", holder, what, target,
                     lock_path)
            next_log = started + WAIT_LOG_EVERY_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline_s is not None and time.monotonic() - started >= deadline_s:
                        raise TimeoutError(f"waited {deadline_s:.0f} s for pid {holder}, {what} into "
                                           f"{target}") from None
                    if time.monotonic() >= next_log:
                        log.info("still waiting (%.0f s) for %s into %s", time.monotonic() - started, what,
                                 target)
                        next_log += WAIT_LOG_EVERY_S
                    time.sleep(LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield time.monotonic() - started
    finally:
        os.close(fd)  # releases the flock


def _clear_leftovers(target: Path) -> None:
    """Remove what a killed conversion left: partial folders, and a target without a marker."""
    for leftover in target.parent.glob(target.name + ".partial*"):
        log.warning("removing %s left by an interrupted conversion", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    reason = untrusted_because(target) if target.exists() else None
    if reason is not None:
        log.warning("removing %s, which is not trusted: %s", target, reason)
        shutil.rmtree(target)


def _run_child(argv: list[str], what: str) -> tuple[float, int]:
    """Run the converter; returns (seconds, peak RSS bytes). Its output goes to ours (the node's log)."""
    started = time.monotonic()
    # stdin is a pipe we never write to: the child exits when it closes, i.e. when this process dies.
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdin.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise ConversionError(f"{what} failed: the converter process exited with {proc.returncode}")
    peak_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return time.monotonic() - started, peak_kib * 1024


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_stamped(folder: Path) -> bool:
    """A folder converted before version stamps were dropped (convert_gguf.drop_version_stamps)."""
    from openhydra.runtime.convert_gguf import version_stamped

    return bool(version_stamped(folder))


def _restamp(folder: Path) -> None:
    """Bring an older conversion to today's bytes (under the cache lock): drop the configs' version stamps, then
    recompute the manifest (its sizes no longer match, so ensure_manifest rebuilds it) and the marker's copy."""
    from openhydra.runtime.convert_gguf import drop_version_stamps, write_json_atomic
    from openhydra.weights.manifest import ensure_manifest

    if not drop_version_stamps(folder):
        return
    manifest_hash = ensure_manifest(folder).content_hash
    marker_path = folder / COMPLETE_MARKER
    record = json.loads(marker_path.read_text())
    log.info("%s: dropped the configs' transformers version stamps; manifest %s -> %s", folder,
             record.get("manifest"), manifest_hash)
    write_json_atomic(marker_path, {**record, "manifest": manifest_hash}, indent=2)


def materialize(target: Path, convert_argv: list[str], what: str, record: dict[str, object]) -> Materialized:
    """Make ``target`` a complete folder, running ``convert_argv + ['--out', DIR]`` at most once per machine.

    ``record`` goes into the completion marker (where the folder came from). Safe to call from any number
    of processes at once: one converts, the others wait and reuse its folder.
    """
    target = Path(target).expanduser()
    if is_complete(target) and not is_stamped(target):
        return Materialized(target, converted=False, waited_s=0.0)
    with cache_lock(target, what) as waited_s:
        if is_complete(target):
            if is_stamped(target):
                _restamp(target)
            log.info("reusing %s, which another process finished %s into", target, what)
            return Materialized(target, converted=False, waited_s=waited_s)
        _clear_leftovers(target)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        log.info("%s into %s in a child process (once per machine; other nodes wait for it)", what, target)
        try:
            seconds, peak_rss = _run_child([*convert_argv, "--out", str(partial), "--watch-parent"], what)
            if not (partial / "config.json").is_file() or not any((partial / n).is_file() for n in WEIGHT_FILES):
                raise ConversionError(f"{what}: the converter exited 0 but {partial} has no config or weights")
            from openhydra.weights.manifest import ensure_manifest  # what peers check swarm fetches against

            manifest_hash = ensure_manifest(partial).content_hash
            marker = {**record, "manifest": manifest_hash, "converted_s": round(seconds, 1),
                      "converter_peak_rss_bytes": peak_rss,
                      "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with open(partial / COMPLETE_MARKER, "w") as f:
                json.dump(marker, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(partial)
            os.rename(partial, target)  # atomic: readers see either no folder or the complete one
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log.info("%s done in %.1f s (converter peak RSS %.0f MB, in a child process); ready at %s", what, seconds,
             peak_rss / 1e6, target)
    return Materialized(target, converted=True, waited_s=waited_s, convert_s=seconds, child_peak_rss_bytes=peak_rss)


def materialize_gguf(gguf: Path, target: Path, record: dict[str, object] | None = None) -> Materialized:
    """The transformers folder for a GGUF file, converted once per machine into ``target``."""
    gguf = Path(gguf)
    argv = [sys.executable, "-m", "openhydra.runtime.convert_gguf", "--gguf", str(gguf)]
    full_record = {"from": str(gguf), "gguf_bytes": gguf.stat().st_size, "dtype": "float32", **(record or {})}
    return materialize(target, argv, f"converting {gguf.name}", full_record)


_GENERATED = {"from", "gguf_bytes", "dtype", "manifest", "converted_s", "converter_peak_rss_bytes", "completed_at"}


def _conversion_source(target: Path, gguf: Path | None) -> tuple[Path, dict[str, object]]:
    """The GGUF ``target`` was converted from (its completion marker's ``from``) and the marker's other fields, for
    ``--repair``: only a folder this cache converted is deleted and converted again, and from its own file."""
    try:
        marker = json.loads((target / COMPLETE_MARKER).read_text())
        source = Path(marker["from"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--repair: {target} has no completion marker naming the GGUF it was converted from ({exc}); "
                         "only a conversion of this cache can be repaired (a hub download or a folder of your own: "
                         "replace it with an intact copy)") from None
    if gguf is not None and gguf.resolve() != source.resolve():
        raise SystemExit(f"--repair: {target} was converted from {source}, not {gguf}")
    if not source.is_file():
        raise SystemExit(f"--repair: {source}, which {target} was converted from, is gone")
    return source, {k: v for k, v in marker.items() if k not in _GENERATED}


def main(argv: list[str] | None = None) -> int:
    """Convert a GGUF (default: the embedded SmolLM2) into the machine's cache ahead of starting nodes, or check
    a cached folder byte by byte (``--verify``) and convert it again when it is damaged (``--repair``)."""
    from openhydra.runtime.source import embedded_gguf_path, embedded_target

    parser = argparse.ArgumentParser(prog="python -m openhydra.runtime.model_cache", description=main.__doc__)
    parser.add_argument("--gguf", type=Path, default=None, help="a GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--target", type=Path, default=None,
                        help=f"the folder to materialise (default: the embedded model's folder under ${CACHE_ENV})")
    parser.add_argument("--verify", action="store_true",
                        help="read every byte of the folder against its manifest; exit 1 if anything is damaged")
    parser.add_argument("--repair", action="store_true",
                        help="with --verify: convert a damaged folder again from its GGUF")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gguf = args.gguf or embedded_gguf_path()
    target = args.target or embedded_target(default_cache_root())
    if args.repair and not args.verify:
        parser.error("--repair goes with --verify")
    if args.verify:
        started = time.monotonic()
        damaged = verify(target, progress=sys.stderr.isatty())
        report: dict[str, object] = {"path": str(target), "intact": not damaged, "damaged": damaged[:20],
                                     "damaged_count": len(damaged), "seconds": round(time.monotonic() - started, 2)}
        if damaged and args.repair:
            source, record = _conversion_source(target, args.gguf)
            with cache_lock(target, "repairing"):  # no node converts or reads it as trusted meanwhile
                if target.exists():
                    log.warning("removing %s to convert it again from %s: %s", target, source, damaged[0])
                    shutil.rmtree(target)
            materialize_gguf(source, target, record)
            report["repaired"] = not verify(target, progress=False)
        print(json.dumps(report), flush=True)
        return 0 if not damaged or report.get("repaired") else 1
    result = materialize_gguf(gguf, target)
    print(json.dumps({**asdict(result), "path": str(result.path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
