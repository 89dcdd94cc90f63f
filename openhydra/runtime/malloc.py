"""glibc malloc tuning for a long-running node: fewer arenas, and freed heap handed back to the OS.

A node runs many threads (torch's intra-op pool, the decode batcher, gRPC and Sanic workers). glibc gives threads
their own malloc arenas (up to 8 per core), and a freed block in one arena is never reused by another, so a
serving process's heap grows with churn (issue 15: prefix-cache K/V clones, per-request tensors). Two knobs:

- :func:`limit_arenas` — ``mallopt(M_ARENA_MAX, n)``; called by ``openhydra-node`` before any thread starts.
  ``MALLOC_ARENA_MAX`` in the environment wins if set; ``OPENHYDRA_MALLOC_ARENA_MAX=0`` turns it off.
- :func:`maybe_trim` — ``malloc_trim(0)`` at most every ``OPENHYDRA_MALLOC_TRIM_S`` seconds (default 5; 0: off),
  called when a session closes.

Both are no-ops where the C library is not glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc malloc.h
DEFAULT_ARENAS = 2
DEFAULT_TRIM_INTERVAL_S = 5.0

_lock = threading.Lock()
_last_trim = -math.inf  # never: the first call trims (monotonic time starts near 0 at boot)
_libc: ctypes.CDLL | None = None
_libc_checked = False


def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None on any other C library."""
    global _libc, _libc_checked
    if _libc_checked:
        return _libc
    _libc_checked = True
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # musl has no such symbol: AttributeError
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    _libc = libc
    return libc


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default


def limit_arenas(arenas: int | None = None) -> int | None:
    """Cap glibc's malloc arenas (before threads start). Returns the cap set, or None if nothing was set."""
    if "MALLOC_ARENA_MAX" in os.environ:  # glibc already read it at start-up: the operator's choice stands
        return None
    n = int(_env_number("OPENHYDRA_MALLOC_ARENA_MAX", DEFAULT_ARENAS) if arenas is None else arenas)
    libc = glibc()
    if n <= 0 or libc is None:
        return None
    return n if libc.mallopt(M_ARENA_MAX, n) == 1 else None


def trim_interval_s() -> float:
    return _env_number("OPENHYDRA_MALLOC_TRIM_S", DEFAULT_TRIM_INTERVAL_S)


def maybe_trim(interval_s: float | None = None) -> bool:
    """``malloc_trim(0)`` unless one ran less than ``interval_s`` ago (another thread may be trimming). Returns
    whether it ran."""
    global _last_trim
    interval = trim_interval_s() if interval_s is None else interval_s
    libc = glibc()
    if interval <= 0 or libc is None:
        return False
    now = time.monotonic()
    if now - _last_trim < interval or not _lock.acquire(blocking=False):
        return False
    try:
        _last_trim = now
        libc.malloc_trim(0)
    finally:
        _lock.release()
    return True
