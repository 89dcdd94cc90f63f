"""Stake that counts on other nodes: each coordinator holds, in its own ledger, the stake a peer announces.

Every node keeps its own ledger, so a stake made with ``POST /v1/hydra/stake`` used to lock HYDRA only in the staker's
own ledger, where no other node looks: another coordinator's reputation (SPEC: 15% stake factor, which sets routing
priority) read a stake of 0 for every remote peer, and its slashing after a failed audit found nothing to burn.

A peer's HYDRA does exist in other ledgers: every coordinator that recorded a receipt the peer signed minted the peer
its share there. So a peer *announces* its stake (``stake_micro`` in its signed discovery record: the stake it holds in
its own ledger; left out at 0, so a record without a stake stays readable by nodes that predate the field), and every
coordinator that reads the record holds up to that much of the peer's HYDRA in the coordinator's own ledger as the
peer's stake (:meth:`Ledger.hold_stake`). There, reputation reads it and a failed audit slashes (burns) it, as for a
local stake.

* **Only the peer's own word.** A record counts only with a valid signature by the key the ledger's account of that
  peer is bound to (the key that signed its receipts): a record naming another peer, unsigned, or signed by another
  key moves nothing.
* **At most what it earned here.** The held stake is ``min(announced, its HYDRA + stake in this ledger)``; a peer that
  earned nothing from this coordinator has no account here and holds nothing.
* **Unbonding.** A lower announcement releases stake only after it has been announced for :data:`UNBOND_S` (counted
  from when this process first saw it; a restart counts again): a peer cannot drop its stake just before it cheats
  and so dodge the slash. Raising it takes effect at the next refresh.

The node calls :meth:`StakeHolder.sync` from its discovery refresh (node.py), in that thread, off the event loop.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from typing import Any

from openhydra.crypto.errors import CryptoError
from openhydra.crypto.records import check_record
from openhydra.discovery.records import PeerAnnouncement, freshest

log = logging.getLogger(__name__)

UNBOND_S = 3600.0
"""Seconds a lower stake must be announced before a coordinator releases the difference."""


class StakeHolder:
    def __init__(self, economy: Any, own_peer_id: str, unbond_s: float = UNBOND_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.economy = economy
        self.own_peer_id = own_peer_id
        self.unbond_s = unbond_s
        self.clock = clock
        self.held: dict[str, int] = {}  # peer id -> its stake in this ledger after the last sync
        self._lowered_since: dict[str, float] = {}  # peer id -> when a target below its held stake was first seen

    def sync(self, records: list[PeerAnnouncement]) -> dict[str, int]:
        """Hold what each signed record announces; returns the stakes that changed ({peer id: stake here})."""
        changed: dict[str, int] = {}
        now = self.clock()
        for record in freshest(records):
            peer_id = record.peer_id
            if peer_id == self.own_peer_id:
                continue
            if record.stake_micro is None and not self._holds(peer_id):  # no stake announced, none held
                continue
            try:
                check_record(record, now=now, require_static_key=False)
                key_hex = base64.b64decode(record.public_key or "", validate=True).hex()
            except (CryptoError, ValueError) as exc:
                log.debug("stake of %s not held: %s", peer_id, exc)
                continue
            target = int(record.stake_micro or 0)
            before = self.held.get(peer_id)
            if before is not None and target < before:
                since = self._lowered_since.setdefault(peer_id, now)
            else:
                self._lowered_since.pop(peer_id, None)
                since = now
            try:
                stake = self.economy.hold_stake(peer_id, key_hex, target, now - since >= self.unbond_s)
            except Exception as exc:  # a busy ledger: the next refresh tries again
                log.warning("could not hold the stake %s announced: %s", peer_id, exc)
                continue
            if stake is None:
                continue
            if stake != before:
                changed[peer_id] = stake
                if before is not None:
                    log.info("holding %d micro-HYDRA of %s as its stake (was %d; it announced %d)", stake, peer_id,
                             before, target)
            self.held[peer_id] = stake
            if stake <= target:
                self._lowered_since.pop(peer_id, None)
        return changed

    def _holds(self, peer_id: str) -> bool:
        """Whether this ledger holds stake of ``peer_id`` (read once per peer, then kept up to date by sync): a peer
        that unstakes to 0 announces no stake at all (its record stays readable by nodes that predate the field),
        and what is held for it must still be released."""
        if peer_id not in self.held:
            try:
                self.held[peer_id] = int(self.economy.stake_of(peer_id))
            except Exception:  # a busy ledger: look again at the next refresh
                return False
        return self.held[peer_id] > 0
