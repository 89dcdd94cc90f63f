"""Ban list with exponential backoff: a peer that fails is skipped for a while, longer each time.

The first failure bans a peer for ``initial_s``; each further failure within ``forget_after_s`` of
the previous ban's end multiplies the ban by ``multiplier``, up to ``max_s``. A success (or a quiet
period of ``forget_after_s``) forgets the streak. The clock is injected so tests need no sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BanTunables:
    initial_s: float = 1.0  # first ban, seconds
    max_s: float = 60.0  # longest ban, seconds
    multiplier: float = 2.0  # each consecutive failure multiplies the ban by this
    forget_after_s: float = 300.0  # seconds without failure after a ban ends before the streak resets

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if self.forget_after_s < 0:
            raise ValueError(f"forget_after_s must be >= 0, got {self.forget_after_s}")


@dataclass
class _Entry:
    strikes: int
    until: float  # clock time the ban ends


class BanList:
    """Which peers to avoid right now. Not thread-safe: use from one event loop."""

    def __init__(self, tunables: BanTunables | None = None, clock: Callable[[], float] = time.monotonic):
        self.tunables = tunables or BanTunables()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    def ban(self, peer_id: str) -> float:
        """Record a failure of ``peer_id``; returns the ban duration in seconds."""
        now = self._clock()
        t = self.tunables
        entry = self._entries.get(peer_id)
        if entry is None or now > entry.until + t.forget_after_s:
            strikes = 1
        elif now < entry.until:
            return entry.until - now  # already banned: failures of in-flight calls do not stack
        else:
            strikes = entry.strikes + 1
        duration = min(t.max_s, t.initial_s * t.multiplier ** (strikes - 1))
        self._entries[peer_id] = _Entry(strikes=strikes, until=now + duration)
        return duration

    def lift(self, peer_id: str) -> None:
        """End ``peer_id``'s ban now but keep its streak: its next failure bans it longer, as if it had waited the
        ban out (a restarted process, router/swarm.py; the peer picks its record's ``instance`` itself, so a new
        one must not wipe the streak: a banned peer re-announcing under a new instance reset its bans to 1 s)."""
        entry = self._entries.get(peer_id)
        if entry is not None:
            entry.until = min(entry.until, self._clock())

    def success(self, peer_id: str) -> None:
        """The peer answered correctly (or is a new process, see router/swarm.py): forget its failures."""
        self._entries.pop(peer_id, None)

    def is_banned(self, peer_id: str) -> bool:
        entry = self._entries.get(peer_id)
        return entry is not None and self._clock() < entry.until

    def remaining_s(self, peer_id: str) -> float:
        entry = self._entries.get(peer_id)
        return 0.0 if entry is None else max(0.0, entry.until - self._clock())

    def banned(self) -> frozenset[str]:
        """Peers banned right now (also drops streaks old enough to forget)."""
        now = self._clock()
        forget = self.tunables.forget_after_s
        for peer_id in [p for p, e in self._entries.items() if now > e.until + forget]:
            del self._entries[peer_id]
        return frozenset(p for p, e in self._entries.items() if now < e.until)

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, str) and self.is_banned(peer_id)

    def __len__(self) -> int:
        return len(self.banned())


def _in_a_thread(task: Callable[[], None]) -> None:
    threading.Thread(target=task, name="peer-probation-probe", daemon=True).start()


class Probation:
    """Peers that stopped answering stay out of routes after their ban lapses until a probe off the request path
    finds them answering again (the half-open state of a circuit breaker).

    A peer that timed out (SIGSTOPped, wedged, its packets dropped) is alive as far as its record and TCP go, so
    before this the first request routed to it after each ban paid the liveness patience (seconds) before failing
    over. Now the lapse only starts a probe (``probe(address)``: Info, sub-second when the peer is alive), run by
    ``run`` on a thread of its own; the peer is routable once it answers, and banned again, longer, when it does not.
    A refused connection is not held here: its record is dead until the peer announces again (router/swarm.py)."""

    def __init__(self, bans: BanList, probe: Callable[[str], bool],
                 run: Callable[[Callable[[], None]], None] = _in_a_thread) -> None:
        self._bans = bans
        self._probe = probe
        self._run = run
        self._held: dict[str, str] = {}  # peer id -> the address that stopped answering
        self._probing: set[str] = set()
        self._lock = threading.Lock()
        self.probes = 0  # probes started
        self.released = 0  # peers routable again after a probe answered

    def hold(self, peer_id: str, address: str) -> None:
        with self._lock:
            self._held[peer_id] = address

    def release(self, peer_id: str) -> None:
        """A new process of the peer (a restart), or a step it served: no probe needed."""
        with self._lock:
            self._held.pop(peer_id, None)

    def held(self, banned: frozenset[str]) -> frozenset[str]:
        """The peers to leave out of routes besides ``banned`` (the ban list's now); starts a probe of each held peer
        whose ban has lapsed and that no probe is under way for."""
        with self._lock:
            due = [(p, a) for p, a in self._held.items() if p not in banned and p not in self._probing]
            self._probing.update(p for p, _ in due)
            self.probes += len(due)
            held = frozenset(self._held)
        for peer_id, address in due:
            self._run(lambda peer_id=peer_id, address=address: self._check(peer_id, address))
        return held

    def _check(self, peer_id: str, address: str) -> None:
        try:
            answered = bool(self._probe(address))
        except Exception:  # a probe that fails in any way is a peer that does not answer
            answered = False
        with self._lock:
            self._probing.discard(peer_id)
            if self._held.get(peer_id) != address:
                return  # released meanwhile (restarted), or held again for another address
            if answered:
                del self._held[peer_id]
                self.released += 1
        if not answered:
            self._bans.ban(peer_id)  # still silent: the next probe waits longer
