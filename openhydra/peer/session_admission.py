"""Which sessions a peer keeps crypto state for: admission after authentication, single-use ids, fair eviction.

Anyone can build an onion to a peer (its static key is public), so peeling one proves nothing about the sender.
A peer therefore (docs/security.md, "Sessions"):

- keeps no state for a session until its first sealed step opens under the keys the onion carried (junk costs the
  peer one X25519 and nothing stays behind);
- admits a session id at most once per hop while an onion naming it could still be fresh: each hop's onion payload
  carries the time the coordinator issued it, onions older than :data:`MAX_ONION_AGE_S` (or too far in the future)
  are refused, and every admitted id is remembered for that long, so a recorded first message (onion and sealed
  step) is refused after its session closed, and a replayed stream gets no compute;
- never evicts a live session (one whose span holds a cache, or admitted in the last :data:`ADMIT_GRACE_S`) to make
  room: each source (the IP address of the stream that delivered the onion) keeps at most
  :data:`MAX_PENDING_PER_SOURCE` sessions without a cache, evicting its own oldest first; beyond the global cap the
  oldest idle session goes; if every session is live the new one is refused.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from openhydra.crypto.errors import CryptoError, ReplayedMessage

MAX_ONION_AGE_S = 600.0
"""An onion is accepted within this many seconds of its issue time (either side: clock skew between machines)."""
MAX_USED_IDS = 262_144
"""Session ids remembered per hop (about 40 MB at most); when all are younger than 2 x MAX_ONION_AGE_S, new
sessions are refused rather than forgetting one that could still be replayed."""
MAX_PENDING_PER_SOURCE = 64
"""Sessions without a cache (admitted, no step computed) one source IP may hold."""
ADMIT_GRACE_S = 10.0
"""A freshly admitted session is not evicted by the global cap for this long (its first step is on its way)."""
_PAYLOAD = struct.Struct(">IIQ")  # span start, span end, issued at (unix ms)
PREFIX_SALT_BYTES = 16
"""The hop's prefix-cache salt after the span and time (peer/privacy.py ``prefix_salt``): absent from older onions."""


class SessionsBusy(CryptoError):
    """Every held session is live and the table is full, or the id memory is: refuse, evict nothing."""

    reason = "busy"


def encode_payload(start: int, end: int, issued_ms: int | None = None, prefix_salt: bytes = b"") -> bytes:
    """A hop's onion payload: its span, the onion's issue time and its prefix-cache salt (or none)."""
    if prefix_salt and len(prefix_salt) != PREFIX_SALT_BYTES:
        raise ValueError(f"a prefix salt is {PREFIX_SALT_BYTES} bytes")
    return _PAYLOAD.pack(start, end, int(time.time() * 1000) if issued_ms is None else issued_ms) + prefix_salt


def decode_payload(payload: bytes) -> tuple[tuple[int, int] | None, int | None, bytes]:
    """(span, issued_ms, prefix salt) from a hop payload; (None, None, b"") if it is not one."""
    if len(payload) not in (_PAYLOAD.size, _PAYLOAD.size + PREFIX_SALT_BYTES):
        return None, None, b""
    start, end, issued = _PAYLOAD.unpack(payload[: _PAYLOAD.size])
    return (start, end), issued, payload[_PAYLOAD.size :]


def source_of(peer: str) -> str:
    """The IP address in a gRPC ``context.peer()`` string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


class SessionAdmission:
    def __init__(self, capacity: int, max_used: int = MAX_USED_IDS,
                 per_source: int = MAX_PENDING_PER_SOURCE) -> None:
        self.capacity, self.max_used, self.per_source = capacity, max_used, per_source
        self._used: OrderedDict[str, float] = OrderedDict()  # session id -> remembered until (unix s)
        self._pending: dict[str, OrderedDict[str, float]] = {}  # source -> its sessions without a cache yet
        self.is_live: Callable[[str], bool] = lambda _sid: False

    def check(self, session_id: str, issued_ms: int | None, now: float | None = None) -> None:
        """Raise :class:`ReplayedMessage` unless an onion issued at ``issued_ms`` may open ``session_id`` here."""
        now = time.time() if now is None else now
        if issued_ms is None:
            raise ReplayedMessage("onion payload carries no issue time: cannot tell a replay from a new session")
        if abs(now - issued_ms / 1000) > MAX_ONION_AGE_S:
            raise ReplayedMessage(f"onion issued {now - issued_ms / 1000:.0f} s from now: stale or replayed")
        if session_id in self._used:
            raise ReplayedMessage("session id already used at this hop")

    def was_keyed(self, session_id: str) -> bool:
        """This hop admitted ``session_id`` under keys within the replay window."""
        return session_id in self._used

    def admit(self, session_id: str, source: str, sessions: OrderedDict[str, Any], now: float | None = None) -> None:
        """Make room for ``session_id`` (authenticated, not yet in ``sessions``), evicting from ``sessions``."""
        now = time.time() if now is None else now
        while self._used and next(iter(self._used.values())) < now:
            self._used.popitem(last=False)
        if len(self._used) >= self.max_used:
            raise SessionsBusy("too many sessions within the replay window; try later")
        if len(self._pending) > self.capacity:
            self.forget_pending()
        mine = self._pending.setdefault(source, OrderedDict())
        for sid in list(mine):  # sessions that computed a step (or left) no longer count against their source
            if sid not in sessions or self.is_live(sid):
                del mine[sid]
        while len(mine) >= self.per_source:
            old, _ = mine.popitem(last=False)
            sessions.pop(old, None)
        if len(sessions) >= self.capacity and not self._evict_idle(sessions, now):
            raise SessionsBusy(f"{len(sessions)} live sessions held; refusing a new one")
        mine[session_id] = now
        self._used[session_id] = now + 2 * MAX_ONION_AGE_S

    def _evict_idle(self, sessions: OrderedDict[str, Any], now: float) -> bool:
        for sid, state in sessions.items():  # least recently used first
            if self.is_live(sid) or now - getattr(state, "admitted_at", 0.0) < ADMIT_GRACE_S:
                continue
            del sessions[sid]
            return True
        return False

    def forget_pending(self) -> None:
        """Drop empty per-source tables (their sources went quiet)."""
        for source in [s for s, mine in self._pending.items() if not mine]:
            del self._pending[source]
