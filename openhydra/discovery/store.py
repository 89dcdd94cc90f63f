"""The HTTP DHT's table: announcements by model and peer, each expiring after its TTL.

Expiry uses the server's own monotonic clock from the moment a record arrives (a peer's wall
clock is not trusted for it). The table is bounded: when it is full, expired records are swept,
and a record from a peer not yet in the table is refused (existing peers may still refresh), so a
flood of fake peers cannot push real ones out.

Ordering (no rollback): each (model, peer) keeps the ``announced_at`` of its newest record, or the
``withdrawn_at`` of its withdrawal, as a *floor*, also after the record expires or is withdrawn, for as long
as an older signed record could still pass the freshness check (its ``announced_at + ttl_s + 60`` s, wall
clock). A record at or below the floor is refused with :class:`StaleRecord` (the same record posted twice is
accepted but does not extend its expiry). The floors are bounded like the records.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from openhydra.discovery.records import PeerAnnouncement


class StoreFull(Exception):
    """The table holds its maximum number of records."""


class SourceQuota(StoreFull):
    """The address that sent a record already keeps ``max_peers_per_source`` other peers in the table."""


class StaleRecord(Exception):
    """A record or withdrawal older than what the table already holds for that peer (a replay or rollback)."""


FLOOR_SLACK_S = 60.0  # clock skew allowed by the freshness check (ownership.py)


@dataclass(frozen=True)
class StoreLimits:
    max_records: int = 100_000  # records over all models
    max_per_model: int = 20_000  # records for one model
    max_ttl_s: float = 3600.0  # a longer ttl_s is cut to this, seconds
    max_models: int = 1_000  # distinct model ids
    max_peers_per_source: int = 256
    """Live peer ids first announced from one source (an IPv4 address, an IPv6 /64): one machine cannot fill a
    model's table with throwaway identities (a red team's 19,798 records in 90 s from one address refused every
    honest newcomer with 503 and made each lookup a 9.5 MB answer). A peer already in the table may always refresh."""


class AnnouncementStore:
    def __init__(
        self,
        limits: StoreLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._wall = wall  # unix time, for floors (they are compared with signed unix timestamps)
        self._models: dict[str, dict[str, tuple[float, PeerAnnouncement]]] = {}
        self._count = 0
        self._floors: dict[tuple[str, str], tuple[float, float]] = {}  # (model, peer) -> (floor, keep until)
        self._sources: dict[tuple[str, str], str] = {}  # (model, peer) -> the source that first announced it
        self._withdrawals: dict[tuple[str, str], float] = {}  # (model, peer) -> withdrawn_at, while it has no record
        self._by_source: dict[str, set[tuple[str, str]]] = {}

    def __len__(self) -> int:
        return self._count

    def put(self, record: PeerAnnouncement, source: str | None = None) -> float:
        """Store or refresh ``record``, sent from ``source`` (see :func:`source_of`; None: not counted); returns
        seconds until it expires. Raises StoreFull (SourceQuota) or StaleRecord."""
        now = self._clock()
        lim = self.limits
        peers = self._models.get(record.model_id)
        current = peers.get(record.peer_id) if peers is not None else None
        if current is not None and current[1] == record:
            return max(0.0, current[0] - now)  # the same record again: idempotent, no longer life
        floor = self._floor(record.model_id, record.peer_id)
        if floor is not None and record.announced_at <= floor:
            raise StaleRecord(
                f"record of {record.peer_id} announced at {record.announced_at:.3f} is not newer than "
                f"{floor:.3f}, which this table already holds"
            )
        is_new = peers is None or record.peer_id not in peers
        if is_new:
            if self._count >= lim.max_records or (peers is None and len(self._models) >= lim.max_models):
                self.sweep()
            if self._count >= lim.max_records:
                raise StoreFull(f"table holds {self._count} records (max {lim.max_records})")
            if peers is None and len(self._models) >= lim.max_models:
                raise StoreFull(f"table holds {len(self._models)} models (max {lim.max_models})")
            if peers is not None and len(peers) >= lim.max_per_model:
                self._sweep_model(record.model_id, now)
                peers = self._models.get(record.model_id)
                if peers is not None and len(peers) >= lim.max_per_model:
                    raise StoreFull(f"model {record.model_id} has {len(peers)} records (max {lim.max_per_model})")
            if source is not None and len(self._live_from(source, now)) >= lim.max_peers_per_source:
                raise SourceQuota(f"{source} already announces {lim.max_peers_per_source} peers (the most one "
                                  "address may keep in this table)")
        ttl = min(record.ttl_s, lim.max_ttl_s)
        peers = self._models.setdefault(record.model_id, {})
        if record.peer_id not in peers:
            self._count += 1
        peers[record.peer_id] = (now + ttl, record)
        self._withdrawals.pop((record.model_id, record.peer_id), None)  # announced again after withdrawing
        if is_new and source is not None:
            key = (record.model_id, record.peer_id)
            self._forget_source(key)
            self._sources[key] = source
            self._by_source.setdefault(source, set()).add(key)
        self._raise_floor(record.model_id, record.peer_id, record.announced_at, record.announced_at + record.ttl_s)
        return ttl

    def withdraw(self, model_id: str, peer_id: str, withdrawn_at: float) -> bool:
        """Remove the peer's record if it is not newer than ``withdrawn_at``; older records stay refused.
        Raises StaleRecord when the table holds something newer (a replayed withdrawal)."""
        floor = self._floor(model_id, peer_id)
        if floor is not None and withdrawn_at < floor:
            raise StaleRecord(f"withdrawal of {peer_id} at {withdrawn_at:.3f} is older than its record ({floor:.3f})")
        peers = self._models.get(model_id) or {}
        current = peers.get(peer_id)
        lifetime = current[1].announced_at + current[1].ttl_s if current is not None else withdrawn_at
        self._raise_floor(model_id, peer_id, withdrawn_at, max(lifetime, withdrawn_at))
        if len(self._withdrawals) >= self.limits.max_records:  # bounded like the records: forget the oldest
            del self._withdrawals[min(self._withdrawals, key=self._withdrawals.__getitem__)]
        self._withdrawals[(model_id, peer_id)] = withdrawn_at
        return self.remove(model_id, peer_id)

    def withdrawn(self, model_id: str) -> dict[str, float]:
        """Peers of ``model_id`` that withdrew and have not announced since: peer id -> ``withdrawn_at``, for as long
        as an older record of theirs could still pass a reader's freshness check (their floor). A reader that kept a
        copy of such a peer's record (discovery/own_view.py, bridging a DHT outage) drops it at once."""
        out = {}
        for (model, peer), at in list(self._withdrawals.items()):
            if model != model_id:
                continue
            if self._floor(model, peer) is None:  # nothing older can pass any more: the tombstone has done its job
                del self._withdrawals[(model, peer)]
                continue
            out[peer] = at
        return out

    def _floor(self, model_id: str, peer_id: str) -> float | None:
        entry = self._floors.get((model_id, peer_id))
        if entry is None:
            return None
        if entry[1] + FLOOR_SLACK_S < self._wall():
            del self._floors[(model_id, peer_id)]
            return None
        return entry[0]

    def _raise_floor(self, model_id: str, peer_id: str, floor: float, valid_until: float) -> None:
        """Remember ``floor`` until no record at or below it can pass the freshness check (``valid_until``)."""
        key = (model_id, peer_id)
        old = self._floors.get(key)
        if old is not None:
            floor, valid_until = max(floor, old[0]), max(valid_until, old[1])
        elif len(self._floors) >= 2 * self.limits.max_records:
            wall = self._wall()
            for k in [k for k, (_, until) in self._floors.items() if until + FLOOR_SLACK_S < wall]:
                del self._floors[k]
            if len(self._floors) >= 2 * self.limits.max_records:  # still full: forget the one ending first
                del self._floors[min(self._floors, key=lambda k: self._floors[k][1])]
        self._floors[key] = (floor, valid_until)

    def _live_from(self, source: str, now: float) -> set[tuple[str, str]]:
        """The live (model, peer) keys first announced from ``source`` (drops those that expired or left)."""
        keys = self._by_source.get(source, set())
        for key in [k for k in keys if (entry := self._models.get(k[0], {}).get(k[1])) is None or entry[0] <= now]:
            self._forget_source(key)
        return self._by_source.get(source, set())

    def _forget_source(self, key: tuple[str, str]) -> None:
        source = self._sources.pop(key, None)
        if source is not None:
            keys = self._by_source.get(source)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_source[source]

    def get(self, model_id: str) -> list[PeerAnnouncement]:
        self._sweep_model(model_id, self._clock())
        return [rec for _, rec in self._models.get(model_id, {}).values()]

    def remove(self, model_id: str, peer_id: str) -> bool:
        peers = self._models.get(model_id)
        if peers is None or peer_id not in peers:
            return False
        del peers[peer_id]
        self._count -= 1
        self._forget_source((model_id, peer_id))
        if not peers:
            del self._models[model_id]
        return True

    def models(self) -> dict[str, int]:
        self.sweep()
        return {m: len(p) for m, p in self._models.items()}

    def sweep(self) -> None:
        now = self._clock()
        for model_id in list(self._models):
            self._sweep_model(model_id, now)

    def _sweep_model(self, model_id: str, now: float) -> None:
        peers = self._models.get(model_id)
        if not peers:
            return
        dead = [p for p, (expires, _) in peers.items() if expires <= now]
        for p in dead:
            del peers[p]
            self._forget_source((model_id, p))
        self._count -= len(dead)
        if not peers:
            del self._models[model_id]


def source_of(address: str) -> str:
    """What :attr:`StoreLimits.max_peers_per_source` counts per: an IPv4 address, or an IPv6 address's /64 (one host
    commonly holds a whole /64); an IPv4-mapped IPv6 address counts as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
