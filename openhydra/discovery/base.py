"""The discovery interface every backend implements: announce, lookup, withdraw, start, stop.

All methods are coroutines and every network call has a deadline (``timeout_s``). Lookups return
live, valid records only: each backend parses records strictly, drops the invalid ones (counted in
``rejected``), checks that each record was written by the owner of its peer id (ownership.py: a valid
signature by the key the peer id is derived from; unsigned plain names only with
``allow_unsigned_names``), and applies the injected verifier (the security layer's checks), if any.

Withdrawals are signed by the identity handed to :meth:`Discovery.set_identity` (the node's key): a
server or DHT node refuses a withdrawal of a key-derived peer id that its owner did not sign.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from openhydra.discovery.ownership import RecordRefused, Withdrawal, check_announcement, sign_withdrawal
from openhydra.discovery.records import PeerAnnouncement, RecordVerifier, freshest
from openhydra.discovery.refusals import RefusalLog

logger = logging.getLogger(__name__)
REFUSALS = RefusalLog(logger)


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
        allow_unsigned_names: bool = False,
    ) -> None:
        if announce_interval_s <= 0 or ttl_s <= 0 or timeout_s <= 0:
            raise ValueError(
                f"announce_interval_s, ttl_s and timeout_s must be > 0, got {announce_interval_s}, {ttl_s}, {timeout_s}"
            )
        self.announce_interval_s = announce_interval_s  # seconds between re-announcements
        self.ttl_s = ttl_s  # seconds a record lives without a refresh
        self.timeout_s = timeout_s  # deadline of one network call, seconds
        self.verifier = verifier
        self.prefilter: RecordVerifier | None = None
        # Also use unsigned records under plain names (privacy=off development swarms); key-derived peer ids
        # are always checked against their key.
        self.allow_unsigned_names = allow_unsigned_names
        self.identity: Any = None  # crypto.identity.Identity that signs withdrawals of its own records
        self.rejected = 0  # records dropped by parsing, ownership checks or the verifier
        self.refused: dict[str, int] = {}  # records dropped by ownership checks, by reason (ownership.REASONS)
        # own records by peer id, then model id (a peer may announce under several, e.g. slash evidence)
        self._announced: dict[str, dict[str, PeerAnnouncement]] = {}

    def set_verifier(self, verifier: RecordVerifier | None, prefilter: RecordVerifier | None = None) -> None:
        """``verifier``: checks after the ownership check (signatures); ``prefilter``: cheap checks (a proof of work,
        a swarm tag: a hash each) run first, so a flood of records without them costs no signature check."""
        self.verifier = verifier
        self.prefilter = prefilter

    def withdrawn(self, model_id: str) -> dict[str, float]:
        """Peers of ``model_id`` the last lookup's answer said withdrew (peer id -> withdrawn_at): a view that bridges
        outages (discovery/own_view.py) stops carrying their records. Empty where the backend does not say."""
        return {}

    def set_identity(self, identity: Any) -> None:
        """The key that signs withdrawals of this node's records (records themselves come signed)."""
        self.identity = identity

    def set_allow_unsigned_names(self, allow: bool) -> None:
        self.allow_unsigned_names = allow

    def withdrawal_for(self, record: PeerAnnouncement, withdrawn_at: float, expires_at: float) -> Withdrawal:
        """The withdrawal of ``record``: signed when this node holds the key of its peer id, unsigned
        otherwise (accepted only for plain names by permissive servers)."""
        identity = self.identity
        if identity is not None and getattr(identity, "peer_id", None) == record.peer_id:
            return sign_withdrawal(identity, record.model_id, withdrawn_at, expires_at)
        return Withdrawal(peer_id=record.peer_id, model_id=record.model_id, withdrawn_at=float(withdrawn_at),
                          expires_at=float(expires_at))

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (idempotent)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; own records are left to expire (call withdraw first to remove them now)."""

    async def announce(self, record: PeerAnnouncement) -> None:
        """Publish ``record`` for ``record.ttl_s`` seconds. Raises DiscoveryError."""
        await self._announce(record)
        self._announced.setdefault(record.peer_id, {})[record.model_id] = record

    async def lookup(self, model_id: str) -> list[PeerAnnouncement]:
        """Live records of peers serving ``model_id``, one per peer (the freshest)."""
        return self.keep_valid(await self._lookup(model_id))

    async def withdraw(self, peer_id: str) -> None:
        """Remove the records this object announced for ``peer_id``, every model (no-op for an unknown id)."""
        for record in self._announced.pop(peer_id, {}).values():
            await self._withdraw(record)

    def keep_valid(self, records: list[PeerAnnouncement]) -> list[PeerAnnouncement]:
        """Drop records not written by their peer id's owner, apply the verifier, keep one record per peer."""
        if self.prefilter is not None:
            records = self._passing(records, self.prefilter)
        owned = []
        for r in records:
            try:
                check_announcement(r, allow_unsigned_names=self.allow_unsigned_names)
            except RecordRefused as exc:
                self.rejected += 1
                self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
                REFUSALS.dropped(r.peer_id, exc)
                continue
            owned.append(r)
        records = owned
        if self.verifier is not None:
            records = self._passing(records, self.verifier)
        return freshest(records)

    def _passing(self, records: list[PeerAnnouncement], check: RecordVerifier) -> list[PeerAnnouncement]:
        kept = []
        for r in records:
            try:
                ok = check(r)
            except Exception:  # a verifier bug must not break lookups; the record is dropped
                logger.exception("record verifier failed on %s", r.peer_id)
                ok = False
            if ok:
                kept.append(r)
            else:
                self.rejected += 1
        return kept

    @abstractmethod
    async def _announce(self, record: PeerAnnouncement) -> None: ...

    @abstractmethod
    async def _lookup(self, model_id: str) -> list[PeerAnnouncement]: ...

    @abstractmethod
    async def _withdraw(self, record: PeerAnnouncement) -> None: ...


def latest_withdrawals(answers: Iterable[dict[str, float]]) -> dict[str, float]:
    """Several answers' withdrawn peers as one (peer id -> the latest withdrawn_at any of them gives)."""
    merged: dict[str, float] = {}
    for answer in answers:
        for peer, at in answer.items():
            merged[peer] = max(at, merged.get(peer, at))
    return merged
