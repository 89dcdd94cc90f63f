"""A coordinator's view of the swarm: its own peer always in it, and a DHT outage bridged.

A node's own peer is alive for as long as the node is, so the coordinator need not learn it from the DHT:

- Every lookup carries the node's own record as the node builds it now (signed as for an announcement), in place of
  whatever the DHT holds for its peer id (nothing, after announces failed for a TTL or before the DHT replicated it;
  or a previous process's record, after a restart on another port or span).
- Where a lookup fails (the DHT is unreachable, or answers garbage), the coordinator routes over the records it
  knew before, plus its own, and asks the DHT again only after a back-off (1 s, doubling to 30 s), so a DHT that
  drops packets does not make every new session wait for a lookup's timeout. That retry runs in the background while
  the request that started it routes over the known records at once: a hung DHT (it accepts connections and never
  answers) cost every request that met an expired back-off the lookup's whole timeout (5 s before the first token,
  4 of 5 requests in a fault probe). Only the first lookup that meets the outage waits for it.
- The same records are carried through the recovery: the first lookups after an outage, and any answer that holds
  none of the other peers it knew (an HTTP DHT restarted empty, a Kademlia node cut off from its neighbours: both
  answer, with nothing), still include each known peer until it is in an answer again or its record is too old;
  except a peer the answer says withdrew (the HTTP DHT's ``withdrawn``, Kademlia's signed tombstones: a clean
  shutdown), dropped at once (before, a 2-node swarm whose other node stopped with Ctrl-C kept routing to it, and
  /readyz said 200, for ~165 s).

A node that only serves as a peer makes no lookups of its own until a request comes to its API, so it would meet an
outage knowing nobody: :meth:`OwnView.refresh_if_idle`, called by the node every half announce interval, looks up
when nothing else has for that long, so every node of a swarm carries what it needs to bridge an outage.

A known record is used for at most ``max_keep_s`` past its announcement (the node's own record TTL, 180 s by
default) or its own TTL, whichever is shorter: an outage shorter than that changes no route, and a longer one (or
an attacker who makes lookups fail) cannot keep a record alive longer than the DHT would have. A dead peer among
them is found as any dead peer is, when a hop to it fails. During a recovery a peer that withdrew meanwhile is still
tried until its record is too old (a refused connection marks it dead at once). With no own record to offer (the
node does not announce: it is unreachable, or shutting down) and nothing known, a failed lookup raises as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from openhydra.discovery.records import PeerAnnouncement
from openhydra.metrics import METRICS

log = logging.getLogger(__name__)

Lookup = Callable[[], list[PeerAnnouncement]]
OwnRecord = Callable[[], PeerAnnouncement | None]

BACKOFF_S = (1.0, 30.0)  # first and longest wait before asking a failing DHT again


def _in_a_thread(task: Callable[[], None]) -> None:
    threading.Thread(target=task, name="dht-retry", daemon=True).start()


class OwnView:
    """``fetch()``: a DHT lookup (raises when the DHT cannot answer); ``own()``: this node's current record, or None
    when it does not announce one; ``peer_id``: this node's. Call the instance for the merged records (thread-safe:
    the swarm looks up from request threads)."""

    def __init__(self, fetch: Lookup, own: OwnRecord, peer_id: str, max_keep_s: float,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 background: Callable[[Callable[[], None]], None] | None = None,
                 withdrawn: Callable[[], dict[str, float]] | None = None) -> None:
        """``background(task)`` runs a retry of a failing DHT off the request's thread (default: a daemon thread);
        ``withdrawn()``: the peers the last answer said withdrew (peer id -> withdrawn_at), never carried."""
        self._fetch = fetch
        self._withdrawn = withdrawn or dict
        self._background = background or _in_a_thread
        self._retrying = False  # a background retry of a failing DHT is under way
        self._own = own
        self.peer_id = peer_id
        self.max_keep_s = max_keep_s
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._known: dict[str, PeerAnnouncement] = {}  # other peers' records, as last seen
        self._recovering = False  # carrying known records the DHT does not (yet) answer with
        self._failures = 0  # consecutive failed lookups
        self._retry_at = 0.0  # monotonic time before which a failing DHT is not asked again
        self.answered = 0  # lookups the DHT answered
        self.own_added = 0  # of those, the ones that lacked this node's own record
        self.without_dht = 0  # lookups answered without the DHT (it failed, or is backed off)
        self.carried = 0  # records of the last answer that came from before an outage, not from the DHT
        self.last_error: str | None = None  # why the last lookup failed; None once one succeeds again
        self._last_lookup = -float("inf")  # monotonic time of the last call

    def status(self) -> dict[str, int | str | None]:
        """For ``/v1/network/status`` (its ``swarm.discovery``) and the dashboard."""
        with self._lock:
            state = "unreachable" if self.last_error is not None else "recovering" if self._recovering else "reachable"
            return {"dht": state, "last_error": self.last_error, "carried_records": self.carried,
                    "lookups": self.answered, "lookups_lacking_own_record": self.own_added,
                    "lookups_without_dht": self.without_dht}

    def refresh_if_idle(self, idle_s: float) -> bool:
        """Look up if no lookup ran in the last ``idle_s`` seconds (a failure is handled as in any lookup); returns
        whether it looked up."""
        with self._lock:
            idle = self._monotonic() - self._last_lookup >= idle_s
        if idle:
            with contextlib.suppress(Exception):  # nothing known and no DHT: the next request's lookup says so
                self()
        return idle

    def __call__(self) -> list[PeerAnnouncement]:
        with self._lock:
            self._last_lookup = self._monotonic()
            failing = self.last_error is not None
            retry = failing and self._monotonic() >= self._retry_at and not self._retrying
            self._retrying = self._retrying or retry
        if failing:
            records = self._without_dht(None)
            if records is not None:
                if retry:  # the back-off is over: ask the DHT again, but not on this request's time
                    self._background(self._retry)
                return records
            if retry:  # nothing to offer without the DHT: this request asks it itself, below
                with self._lock:
                    self._retrying = False
        return self._lookup()

    def _lookup(self) -> list[PeerAnnouncement]:
        try:
            records = self._fetch()
        except Exception as exc:
            return self._without_dht(exc)
        return self._answered(records)

    def _retry(self) -> None:
        try:
            with contextlib.suppress(Exception):  # still failing, and nothing known: the next request asks itself
                self._lookup()
        finally:
            with self._lock:
                self._retrying = False

    def _usable(self, record: PeerAnnouncement, now: float) -> bool:
        return not record.is_expired(now) and now < record.announced_at + self.max_keep_s

    def _answered(self, records: list[PeerAnnouncement]) -> list[PeerAnnouncement]:
        own, now = self._own(), self._clock()
        gone = self._withdrawn()
        with self._lock:
            self.answered += 1
            METRICS.discovery_lookups.labels(outcome="answered").inc()
            if self.last_error is not None:
                log.info("the DHT answers again after %d lookup(s) without it", self.without_dht)
                self.last_error, self._failures, self._recovering = None, 0, True
            others = {r.peer_id: r for r in records if r.peer_id != self.peer_id}
            # a peer that withdrew (a clean shutdown) is gone, not hidden by a DHT that restarted empty
            known = {pid: r for pid, r in self._known.items()
                     if self._usable(r, now) and gone.get(pid, -1.0) < r.announced_at}
            if known and not others.keys() & known.keys():
                self._recovering = True  # an answer with none of the peers it knew: restarted empty, or cut off
            carried = [r for pid, r in known.items() if pid not in others] if self._recovering else []
            if not carried:
                self._recovering = False
            self.carried = len(carried)
            self._known = {**{r.peer_id: r for r in carried}, **others}
            lacking = not any(r.peer_id == self.peer_id for r in records)
            if own is not None and lacking:
                self.own_added += 1
                METRICS.own_record_added.inc()
                if self.own_added == 1 or self.own_added % 100 == 0:
                    log.warning("the DHT lookup lacks this node's own record (%d time(s)): its own span is added",
                                self.own_added)
        mine = [own] if own is not None else [r for r in records if r.peer_id == self.peer_id]
        return [*others.values(), *carried, *mine]

    def _without_dht(self, exc: Exception | None) -> list[PeerAnnouncement] | None:
        """The known records and this node's own, after the lookup failed with ``exc``, or while a failing DHT is
        backed off (``exc`` None). Nothing to offer: ``exc`` is raised (None is returned while backed off)."""
        own, now = self._own(), self._clock()
        with self._lock:
            known = [r for r in self._known.values() if self._usable(r, now)]
            if exc is not None:
                first = self.last_error is None
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._failures += 1
                self._retry_at = self._monotonic() + min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (self._failures - 1))
            if own is None and not known:
                if exc is not None:
                    raise exc
                return None
            self._recovering = True
            self.carried = len(known)
            self.without_dht += 1
            METRICS.discovery_lookups.labels(outcome="without_dht").inc()
            if exc is not None and (first or self._failures % 100 == 0):  # once per outage, and every 100th try
                log.warning("DHT lookup failed (%s): routing over %d known record(s)%s; asking again in %.0f s",
                            self.last_error, len(known), " and this node's own" if own is not None else "",
                            self._retry_at - self._monotonic())
        return [*known, own] if own is not None else known
