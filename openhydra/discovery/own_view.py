"""A coordinator's view of the swarm, with its own peer in it whatever the DHT says.

A node's own peer is alive for as long as the node is, so the coordinator need not learn it from the DHT:

- Where a lookup lacks the node's own record (announces failed for a TTL under load, the DHT has not replicated it
  yet, a partition), the node's record, built here and signed as for an announcement, joins the lookup.
- Where a lookup fails outright (the DHT is unreachable), the coordinator routes over the records of its last good
  lookup that have not yet expired, plus its own. A DHT outage does not stop a node that serves the whole model, nor
  a swarm whose peers are still up: a dead one among them is found as any dead peer is, when a hop to it fails.

With no own record to offer (the node does not announce: it is unreachable, or it is shutting down) and nothing
unexpired kept, a failed lookup raises as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from openhydra.discovery.records import PeerAnnouncement
from openhydra.metrics import METRICS

log = logging.getLogger(__name__)

Lookup = Callable[[], list[PeerAnnouncement]]
OwnRecord = Callable[[], PeerAnnouncement | None]


class OwnView:
    """``fetch()``: a DHT lookup (raises when the DHT cannot answer); ``own()``: this node's current record (built and
    signed on demand, only where a lookup needs it), or None when it does not announce one; ``peer_id``: this node's.
    Call the instance for the merged records."""

    def __init__(self, fetch: Lookup, own: OwnRecord, peer_id: str, clock: Callable[[], float] = time.time) -> None:
        self._fetch = fetch
        self._own = own
        self.peer_id = peer_id
        self._clock = clock
        self._last: list[PeerAnnouncement] = []
        self.answered = 0  # lookups the DHT answered
        self.own_added = 0  # of those, the ones that lacked this node's record
        self.without_dht = 0  # lookups answered from the last good one, the DHT being unreachable
        self.last_error: str | None = None  # why the last lookup failed; None once one succeeds again

    def status(self) -> dict[str, int | str | None]:
        """For ``/v1/network/status`` (its ``swarm.discovery``) and the dashboard."""
        return {"dht": "unreachable" if self.last_error is not None else "reachable", "last_error": self.last_error,
                "lookups": self.answered, "lookups_lacking_own_record": self.own_added,
                "lookups_without_dht": self.without_dht}

    def __call__(self) -> list[PeerAnnouncement]:
        try:
            records = self._fetch()
        except Exception as exc:
            return self._without_dht(exc)
        self.answered += 1
        METRICS.discovery_lookups.labels(outcome="answered").inc()
        if self.last_error is not None:
            log.info("the DHT answers again after %d lookup(s) without it", self.without_dht)
            self.last_error = None
        self._last = list(records)
        if any(r.peer_id == self.peer_id for r in records):
            return records
        own = self._own()
        if own is None:
            return records
        self.own_added += 1
        METRICS.own_record_added.inc()
        if self.own_added == 1 or self.own_added % 100 == 0:
            log.warning("the DHT lookup lacks this node's own record (%d time(s)): its own span is added",
                        self.own_added)
        return [*records, own]

    def _without_dht(self, exc: Exception) -> list[PeerAnnouncement]:
        own, now = self._own(), self._clock()
        kept = [r for r in self._last if not r.is_expired(now) and r.peer_id != self.peer_id]
        if own is None and not kept:
            raise exc
        first = self.last_error is None
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.without_dht += 1
        METRICS.discovery_lookups.labels(outcome="without_dht").inc()
        if first or self.without_dht % 100 == 0:  # once per outage (and every 100th lookup of a long one)
            log.warning("DHT lookup failed (%s): routing over %d unexpired record(s) of the last lookup%s",
                        self.last_error, len(kept), " and this node's own" if own is not None else "")
        return [*kept, own] if own is not None else kept
