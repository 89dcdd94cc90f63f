"""The HTTP DHT's table: announcements by model and peer, each expiring after its TTL.

Expiry uses the server's own monotonic clock from the moment a record arrives (a peer's wall
clock is not trusted for it). The table is bounded: when it is full, expired records are swept,
and a record from a peer not yet in the table is refused (existing peers may still refresh), so a
flood of fake peers cannot push real ones out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from openhydra.discovery.records import PeerAnnouncement


class StoreFull(Exception):
    """The table holds its maximum number of records."""


@dataclass(frozen=True)
class StoreLimits:
    max_records: int = 100_000  # records over all models
    max_per_model: int = 20_000  # records for one model
    max_ttl_s: float = 3600.0  # a longer ttl_s is cut to this, seconds
    max_models: int = 1_000  # distinct model ids


class AnnouncementStore:
    def __init__(self, limits: StoreLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._models: dict[str, dict[str, tuple[float, PeerAnnouncement]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, record: PeerAnnouncement) -> float:
        """Store or refresh ``record``; returns seconds until it expires. Raises StoreFull."""
        now = self._clock()
        lim = self.limits
        peers = self._models.get(record.model_id)
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
        ttl = min(record.ttl_s, lim.max_ttl_s)
        peers = self._models.setdefault(record.model_id, {})
        if record.peer_id not in peers:
            self._count += 1
        peers[record.peer_id] = (now + ttl, record)
        return ttl

    def get(self, model_id: str) -> list[PeerAnnouncement]:
        self._sweep_model(model_id, self._clock())
        return [rec for _, rec in self._models.get(model_id, {}).values()]

    def remove(self, model_id: str, peer_id: str) -> bool:
        peers = self._models.get(model_id)
        if peers is None or peer_id not in peers:
            return False
        del peers[peer_id]
        self._count -= 1
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
        self._count -= len(dead)
        if not peers:
            del self._models[model_id]
