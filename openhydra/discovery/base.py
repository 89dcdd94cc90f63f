"""The discovery interface every backend implements: announce, lookup, withdraw, start, stop.

All methods are coroutines and every network call has a deadline (``timeout_s``). Lookups return
live, valid records only: each backend parses records strictly, drops the invalid ones (counted in
``rejected``), and applies the injected verifier (the security layer's signature check), if any.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from openhydra.discovery.records import PeerAnnouncement, RecordVerifier, freshest

logger = logging.getLogger(__name__)


class DiscoveryError(Exception):
    """A discovery backend could not complete a call (unreachable, timed out, refused)."""


class Discovery(ABC):
    """Where peers announce their spans and coordinators find them."""

    def __init__(
        self,
        *,
        announce_interval_s: float = 60.0,
        ttl_s: float = 180.0,
        timeout_s: float = 5.0,
        verifier: RecordVerifier | None = None,
    ) -> None:
        if announce_interval_s <= 0 or ttl_s <= 0 or timeout_s <= 0:
            raise ValueError(
                f"announce_interval_s, ttl_s and timeout_s must be > 0, got {announce_interval_s}, {ttl_s}, {timeout_s}"
            )
        self.announce_interval_s = announce_interval_s  # seconds between re-announcements
        self.ttl_s = ttl_s  # seconds a record lives without a refresh
        self.timeout_s = timeout_s  # deadline of one network call, seconds
        self.verifier = verifier
        self.rejected = 0  # records dropped by parsing or the verifier
        self._announced: dict[str, PeerAnnouncement] = {}  # own records by peer id, for withdraw

    def set_verifier(self, verifier: RecordVerifier | None) -> None:
        self.verifier = verifier

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (idempotent)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; own records are left to expire (call withdraw first to remove them now)."""

    async def announce(self, record: PeerAnnouncement) -> None:
        """Publish ``record`` for ``record.ttl_s`` seconds. Raises DiscoveryError."""
        await self._announce(record)
        self._announced[record.peer_id] = record

    async def lookup(self, model_id: str) -> list[PeerAnnouncement]:
        """Live records of peers serving ``model_id``, one per peer (the freshest)."""
        return self.keep_valid(await self._lookup(model_id))

    async def withdraw(self, peer_id: str) -> None:
        """Remove a record this object announced (no-op for an unknown peer id)."""
        record = self._announced.pop(peer_id, None)
        if record is not None:
            await self._withdraw(record)

    def keep_valid(self, records: list[PeerAnnouncement]) -> list[PeerAnnouncement]:
        """Apply the verifier and keep one record per peer."""
        if self.verifier is not None:
            kept = []
            for r in records:
                try:
                    ok = self.verifier(r)
                except Exception:  # a verifier bug must not break lookups; the record is dropped
                    logger.exception("record verifier failed on %s", r.peer_id)
                    ok = False
                if ok:
                    kept.append(r)
                else:
                    self.rejected += 1
            records = kept
        return freshest(records)

    @abstractmethod
    async def _announce(self, record: PeerAnnouncement) -> None: ...

    @abstractmethod
    async def _lookup(self, model_id: str) -> list[PeerAnnouncement]: ...

    @abstractmethod
    async def _withdraw(self, record: PeerAnnouncement) -> None: ...
