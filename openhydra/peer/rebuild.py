"""Failover rebuild: replace one span of a chain without recomputing the others (see peer.proto, Step fields 40-44).

A full replay re-runs a session's whole history on every hop of the new chain: its cost grows with the history and
the number of hops (a 4-peer chain at token 50 stalled 3-4 s on a quiet 2-core machine). But only the replaced span
lost anything. So:

* every hop that pushes hidden states on keeps the exact bytes it pushed per message (:class:`Retained`, bounded);
* after a failure the coordinator opens a new session id on the new route; its first message tells each surviving
  hop to *adopt* the old session's cache, cropped to the committed positions, authenticated by an
  :func:`adopt_tag` that only the coordinator which ran the old session can compute (it holds the old per-hop audit
  keys; a stranger who saw the session id in the clear cannot);
* the history is re-sent as rebuild messages: the hop just before the replaced layers re-pushes what it retained for
  exactly that message (same positions, same bytes, so the replacement builds the cache the dead hop had), the
  replacement computes, every other hop passes an empty marker on, and the last hop answers each message.

Anything missing (a retained message evicted, an old session gone, a cache that cannot be cropped) is refused with
FAILED_PRECONDITION and the coordinator falls back to a full replay: the rebuild is an optimisation, never a
different answer.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from openhydra.peer.proto import peer_pb2 as pb

ADOPT_LABEL = b"openhydra-adopt\x00"
DEFAULT_RETAIN_BYTES = 256 << 20
"""Retained activations per peer across sessions (LRU by session): 256 MiB is ~110k positions of a 576-wide fp32
model or ~26k of a 5120-wide bf16 one. A session evicted from it falls back to a full replay on failover."""


def adopt_tag(audit_key: bytes, new_session: str, old_session: str, length: int) -> bytes:
    """HMAC-SHA256 binding "move ``old_session``'s cache, cropped to ``length``, to ``new_session``" to one hop."""
    message = ADOPT_LABEL + struct.pack(">Q", length) + _field(new_session) + _field(old_session)
    return hmac.new(audit_key, message, hashlib.sha256).digest()


def _field(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">H", len(raw)) + raw


class Role(Enum):
    """What a hop does with one rebuild message."""

    RELAY = "relay"  # it holds these positions already: pass an empty marker on (or answer, if last)
    FEED = "feed"  # it holds them and the replacement starts right after it: re-push what it retained
    COMPUTE = "compute"  # it is (part of) the replacement: run the span as usual


def role(start: int, end: int, rebuild_start: int, rebuild_end: int) -> Role:
    """This hop's role for layers [start, end) when [rebuild_start, rebuild_end) is rebuilt; ValueError if the
    span straddles a boundary (the replacement must tile exactly the failed span)."""
    if not 0 <= rebuild_start < rebuild_end:
        raise ValueError(f"invalid rebuild span [{rebuild_start},{rebuild_end})")
    if rebuild_start <= start and end <= rebuild_end:
        return Role.COMPUTE
    if end == rebuild_start:
        return Role.FEED
    if end < rebuild_start or start >= rebuild_end:
        return Role.RELAY
    raise ValueError(f"span [{start},{end}) straddles the rebuilt layers [{rebuild_start},{rebuild_end})")


@dataclass(frozen=True)
class _Kept:
    start: int
    count: int
    tensor: bytes  # the serialized pb.Tensor as pushed (after DP noise and codec)


class Retained:
    """The hidden states each session pushed, per message, within a byte budget (LRU by session)."""

    def __init__(self, budget_bytes: int = DEFAULT_RETAIN_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._sessions: OrderedDict[str, dict[tuple[int, int], _Kept]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted_sessions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def keep(self, session_id: str, start: int, count: int, tensor: pb.Tensor) -> None:
        if self.budget_bytes <= 0:
            return
        kept = _Kept(start, count, tensor.SerializeToString())
        with self._lock:
            messages = self._sessions.setdefault(session_id, {})
            self._sessions.move_to_end(session_id)
            old = messages.pop((start, count), None)
            if old is not None:
                self._bytes -= len(old.tensor)
            messages[(start, count)] = kept
            self._bytes += len(kept.tensor)
            while self._bytes > self.budget_bytes and self._sessions:
                _sid, dropped = self._sessions.popitem(last=False)
                self._bytes -= sum(len(k.tensor) for k in dropped.values())
                self.evicted_sessions += 1

    def get(self, session_id: str, start: int, count: int) -> pb.Tensor | None:
        with self._lock:
            kept = self._sessions.get(session_id, {}).get((start, count))
        if kept is None:
            return None
        tensor = pb.Tensor()
        tensor.ParseFromString(kept.tensor)
        return tensor

    def rename(self, old: str, new: str, length: int) -> None:
        """``old``'s messages that end within ``length`` positions become ``new``'s; the rest is dropped."""
        with self._lock:
            messages = self._sessions.pop(old, None)
            if messages is None:
                return
            kept = {k: v for k, v in messages.items() if v.start + v.count <= length}
            self._bytes -= sum(len(v.tensor) for k, v in messages.items() if k not in kept)
            self._sessions[new] = kept

    def drop(self, session_id: str) -> None:
        with self._lock:
            messages = self._sessions.pop(session_id, None)
            if messages is not None:
                self._bytes -= sum(len(k.tensor) for k in messages.values())
