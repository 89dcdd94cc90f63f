"""Localising a liar that answers honestly whenever it suspects an audit, from user sessions alone.

Such a liar lies only in sessions it takes for a user's. An audit then finds the user's answer *irreproducible*
(a replay of the user's own chain, which the liar answers honestly, disagrees with it) and can only name every
peer of that chain as a suspect (verification/audits.py). What the liar cannot tell apart is one user session from
another, so the coordinator localises it from which chains' user answers were reproduced and which were not, under
one assumption: **a single hop of the chain lies** (two liars on different spans of the same chain are never
convicted this way; each is still a suspect).

Per audited user session, its chain and a verdict: *bad* (some audit of it found the user's answer irreproducible)
or *clean* (its audits upheld the user's answer). Then, over the last ``memory`` sessions:

- **candidates**: the peers present in every bad chain (with a single liar, the liar is one of them). Bad chains
  holding an already convicted peer are explained by it and set aside;
- a candidate ``P`` is **convicted** when at least ``min_sessions`` chains were bad, all containing ``P``, and every
  other peer of those bad chains (the real liar among them, if ``P`` is honest) was in at least ``n`` clean chains
  *without* ``P``. ``n`` is set by ``P``'s observed lie rate ``r`` (bad chains ÷ chains with ``P``): a suspect
  lying as often as that lies in none of ``n`` sessions with probability ``(1 - r) ** n`` <= 1e-3
  (:data:`FALSE_CONVICTION`), and ``n >= min_sessions``: 5 clean chains each at ``r = 1``, 10 at 0.5, 31 at 0.2.
  An honest ``P`` is convicted only if the real liar lied in none of its ``n`` sessions without ``P`` while lying in
  every bad one with ``P``;
- **probing** (:meth:`avoid`): while candidates remain unconvicted, new user chains leave one of them out in turn
  where the swarm has another peer for its span, so that bad chains without an honest candidate appear; once one
  candidate is left, new chains leave it out together with the suspects already reproduced often enough without
  it, so that the remaining suspects get their clean chains. A peer that is in every chain (the only server of its
  span) can neither be left out nor exonerated; then nobody is convicted (docs/verification.md).

A conviction is a failed audit in the reputation store and a slash, and the verifier stops routing to the peer and
asking it to vote (``is_convicted``): a smart liar passes every audit it recognises, so one failed audit may leave its
score above the routing floor, and it is never convicted twice. It is not signed slash evidence for other
coordinators (verification/evidence.py), because no single answer proves it; a restarted coordinator has to
convict again.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

FALSE_CONVICTION = 1e-3
"""How likely a suspect that lies as often as the convicted peer appears to would have lied in none of its clean
chains: the bar each other suspect's clean chains must clear."""


@dataclass(frozen=True)
class Conviction:
    peer_id: str
    bad_sessions: int  # bad chains, all with the peer
    exonerated: tuple[str, ...]  # the other suspects, each in enough clean chains without the peer (_needed)


class Elimination:
    def __init__(self, min_sessions: int = 5, memory: int = 256) -> None:
        if min_sessions < 2:
            raise ValueError(f"min_sessions must be >= 2, got {min_sessions}")
        self.min_sessions, self.memory = min_sessions, memory
        self._sessions: OrderedDict[str, tuple[frozenset[str], bool]] = OrderedDict()  # id -> (chain, bad)
        self._convicted: set[str] = set()
        self._turn = 0
        self._lock = threading.Lock()  # record() on the verifier's thread, avoid() on the user's

    def record(self, session_id: str, chain: Iterable[str], *, bad: bool) -> Conviction | None:
        """One audit outcome of a user session; a session once bad stays bad. Returns a new conviction, if any."""
        with self._lock:
            known = self._sessions.pop(session_id, None)
            self._sessions[session_id] = (frozenset(chain), bad or (known is not None and known[1]))
            while len(self._sessions) > self.memory:
                self._sessions.popitem(last=False)
            conviction = self._convict()
            if conviction is not None:  # its bad sessions are explained: they no longer make anyone a candidate
                self._convicted.add(conviction.peer_id)
                for key in [k for k, (c, b) in self._sessions.items() if b and conviction.peer_id in c]:
                    del self._sessions[key]
            return conviction

    def is_convicted(self, peer_id: str) -> bool:
        return peer_id in self._convicted  # a set read: safe from any thread

    def candidates(self) -> list[str]:
        """Unconvicted peers present in every remembered bad chain (none without a bad chain), sorted."""
        with self._lock:
            return sorted(self._candidates(self._bad()) - self._convicted)

    def avoid(self) -> tuple[frozenset[str], ...]:
        """Peers for the next user chain to leave out, as sets to try in order (the router takes the first that still
        leaves a chain, else routes as usual); empty when nothing is pending.

        One candidate ``P`` at a time, in turn: leave out ``P`` together with the suspects already reproduced often
        enough without it, so that the others get tried without ``P`` (all of them, else each alone, else just
        ``P``). While a single candidate remains with fewer than ``min_sessions`` bad chains, only every other
        chain, so evidence keeps coming."""
        with self._lock:
            bad = self._bad()
            pending = sorted(self._candidates(bad) - self._convicted)
            if not pending:
                return ()
            self._turn += 1
            if len(pending) == 1 and len(bad) < self.min_sessions and self._turn % 2:
                return ()
            peer = pending[self._turn % len(pending)]
            clean, needed = self._clean_without(peer), self._needed(peer, bad)
            done = {q for q in frozenset().union(*bad) - {peer} if clean.get(q, 0) >= needed}
            # all of them; else each alone (the only server of a span cannot be left out); else just the candidate
            tries = [frozenset({peer} | done)] if len(done) > 1 else []
            return (*tries, *(frozenset({peer, q}) for q in sorted(done)), frozenset({peer}))

    def _bad(self) -> list[frozenset[str]]:
        """Remembered bad chains that no convicted peer explains."""
        return [chain for chain, bad in self._sessions.values() if bad and not chain & self._convicted]

    def _needed(self, peer: str, bad: list[frozenset[str]]) -> int:
        """Clean chains without ``peer`` each other suspect needs: enough that a liar lying at ``peer``'s observed
        rate (bad ÷ all chains with ``peer``) would have lied in one of them with probability >= 1 - FALSE_CONVICTION,
        and at least ``min_sessions``."""
        with_peer = sum(1 for chain, _ in self._sessions.values() if peer in chain and not chain & self._convicted)
        rate = len(bad) / max(with_peer, 1)
        if rate >= 1.0:
            return self.min_sessions
        return max(self.min_sessions, math.ceil(math.log(FALSE_CONVICTION) / math.log(1.0 - rate)))

    @staticmethod
    def _candidates(bad: list[frozenset[str]]) -> set[str]:
        return set(frozenset.intersection(*bad)) if bad else set()

    def _clean_without(self, peer: str) -> dict[str, int]:
        """For each peer, how many remembered clean chains held it and not ``peer``."""
        counts: dict[str, int] = {}
        for chain, bad in self._sessions.values():
            if not bad and peer not in chain:
                for q in chain:
                    counts[q] = counts.get(q, 0) + 1
        return counts

    def _convict(self) -> Conviction | None:
        bad = self._bad()
        if len(bad) < self.min_sessions:
            return None
        suspects = frozenset().union(*bad)
        for peer in sorted(self._candidates(bad) - self._convicted):
            others = sorted(suspects - {peer})
            clean, needed = self._clean_without(peer), self._needed(peer, bad)
            if all(clean.get(q, 0) >= needed for q in others):
                return Conviction(peer, len(bad), tuple(others))
        return None
