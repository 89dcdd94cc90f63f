"""Per-session shard state: the cache, the number of positions it holds, and a lock.

Sessions are kept in LRU order, capped at ``max_sessions`` and, where a byte bound is set (:meth:`bound_bytes`,
serving.max_kv_mb), at that many bytes of caches, and dropped after ``idle_timeout_s`` without use. A dropped session
simply starts again at length 0: the coordinator sees a position mismatch on its next step and replays the session's
history. gRPC handlers call from many threads, so the store has one lock for its map and each session one for its
cache.

Bytes are measured, not estimated: a session's cache tensors (distinct storages: a view counts once) at its first
step and again each time it has grown by ``max(64, length / 8)`` positions since (a measurement of SmolLM2's 30 layers
takes ~0.1 ms, paid once per 64 or more steps). Between measurements a session holds up to that many positions
more than counted; the bound is enforced whenever a measurement moves the total, after the step that grew it, so one
step's growth passes it until the evictions that follow.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Session:
    session_id: str
    cache: Any
    length: int = 0
    """Positions the cache holds; the next step must start here."""
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    prefix: Any = None
    """Prefix-cache fill state (runtime/prefix_cache.py SessionPrefix) while its prompt blocks are stored."""
    compaction: Any = None
    """KV-compaction state (runtime/compaction/shard_hook.py SessionCompaction) when compaction is on."""
    nbytes: int = 0
    """Bytes of its cache at the last measurement (SessionStore.grew)."""
    measured_at: int = -1
    """Its length then (-1: never measured)."""


def cache_nbytes(cache: Any) -> int:
    """Bytes of a session cache's tensors (each storage once: views of a buffer count as the buffer)."""
    storages: dict[int, int] = {}
    for layer in getattr(cache, "layers", None) or (cache if isinstance(cache, list) else []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class SessionStore:
    def __init__(
        self,
        new_cache: Callable[[], Any],
        max_sessions: int = 64,
        idle_timeout_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self._new_cache = new_cache
        self._max = max_sessions
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._max_bytes: int | None = None
        self.nbytes = 0
        """Bytes of the held sessions' caches, as last measured (0 while no byte bound is set)."""
        self.evicted_for_bytes = 0

    def acquire(self, session_id: str) -> Session:
        """The session (created empty if unknown), marked most recently used."""
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            session = self._sessions.get(session_id)
            if session is None:
                session = Session(session_id=session_id, cache=self._new_cache())
                self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            session.last_used = now
            while len(self._sessions) > self._max:
                self._forget(self._sessions.popitem(last=False)[1])
            return session

    def bound_bytes(self, max_bytes: int | None) -> None:
        """Keep the sessions' caches under ``max_bytes`` (None: no byte bound): after a step, the least recently
        used other sessions are evicted until the measured total fits (a session alone over it is kept)."""
        with self._lock:
            self._max_bytes = max_bytes
            if max_bytes is None:
                self.nbytes = 0
                for session in self._sessions.values():
                    session.nbytes, session.measured_at = 0, -1

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def max_sessions(self) -> int:
        return self._max

    def grew(self, session: Session) -> None:
        """After a step moved ``session``'s length (its lock held): measure it when due, then evict least recently
        used others while the total is over the byte bound."""
        if self._max_bytes is None:
            return
        if session.measured_at >= 0 and session.length < session.measured_at + max(64, session.measured_at // 8):
            return
        nbytes = cache_nbytes(session.cache)
        with self._lock:
            held = self._sessions.get(session.session_id) is session
            if held:
                self.nbytes += nbytes - session.nbytes
            session.nbytes, session.measured_at = nbytes, session.length
            if not held or self._max_bytes is None:
                return
            for other in list(self._sessions.values()):
                if self.nbytes <= self._max_bytes:
                    break
                if other is not session:
                    del self._sessions[other.session_id]
                    self._forget(other)
                    self.evicted_for_bytes += 1

    def _forget(self, session: Session) -> None:
        """(Under the lock.) ``session`` has left the map: its bytes no longer count."""
        self.nbytes -= session.nbytes

    def resize(self, max_sessions: int) -> None:
        """Keep at most ``max_sessions`` from now on (the least recently used beyond it go at once)."""
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        with self._lock:
            self._max = max_sessions
            while len(self._sessions) > self._max:
                self._forget(self._sessions.popitem(last=False)[1])

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            self._evict_idle(self._clock())
            return self._sessions.get(session_id)

    def truncate(
        self, session_id: str, length: int, crop: Callable[[Session], None],
        check: Callable[[Session], None] | None = None,
    ) -> None:
        """Roll ``session_id`` back to ``length`` positions (speculative-decoding rollback).

        Validates ``length`` against the session's length (a no-op when equal); then, under the session's
        lock, ``check(session)`` may refuse (raise), length 0 drops the session, and otherwise
        ``crop(session)`` cuts the backend's cache to ``length`` positions before the length is set."""
        session = self.get(session_id)
        current = 0 if session is None else session.length
        if not 0 <= length <= current:
            raise ValueError(f"session {session_id!r}: cannot truncate to {length}, it holds {current} positions")
        if session is None or length == current:
            return
        with session.lock:
            if check is not None:
                check(session)
            if length == 0:
                self.drop(session_id)
                return
            crop(session)
            session.length = length

    def rename(
        self, old_id: str, new_id: str, length: int, crop: Callable[[Session], None],
        check: Callable[[Session], None] | None = None,
    ) -> None:
        """Move ``old_id``'s state to ``new_id``, cropped to ``length`` positions (failover rebuild: the surviving
        hops keep their caches under the coordinator's new session id). KeyError if ``old_id`` is unknown;
        ValueError if ``new_id`` exists or ``length`` exceeds what the session holds; ``check`` may refuse."""
        session = self.get(old_id)
        if session is None:
            raise KeyError(f"session {old_id!r} is not held here")
        with session.lock:
            if not 0 < length <= session.length:
                raise ValueError(f"session {old_id!r}: cannot keep {length} positions, it holds {session.length}")
            if length < session.length:
                if check is not None:
                    check(session)
                crop(session)
                session.length = length
            with self._lock:
                if new_id in self._sessions:
                    raise ValueError(f"session {new_id!r} exists already")
                if self._sessions.get(old_id) is not session:
                    raise KeyError(f"session {old_id!r} was evicted meanwhile")
                del self._sessions[old_id]
                session.session_id = new_id
                session.last_used = self._clock()
                self._sessions[new_id] = session

    def drop(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._forget(session)

    def ids(self) -> list[str]:
        with self._lock:
            self._evict_idle(self._clock())
            return list(self._sessions)

    def __len__(self) -> int:
        return len(self.ids())

    def _evict_idle(self, now: float) -> None:
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self._idle_timeout_s]
        for sid in stale:
            # A session busy in forward() keeps its own reference and finishes; it just is not found again.
            self._forget(self._sessions.pop(sid))
