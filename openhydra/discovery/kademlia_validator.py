"""A hivemind record validator: under a key-derived peer id, only that peer's signed values live.

hivemind calls :meth:`OwnerValidator.validate` when a DHT node is asked to store a value (by its own
application or by another node) and on every value another node returns to a lookup; a value that fails
is neither stored nor returned (hivemind.dht.validation.RecordValidatorBase). So with this validator on
every honest node, a value under the subkey ``12D3KooW...`` (one peer's slot of a model key, kademlia.py)
is one of:

- that peer's announcement, signed by its key (ownership.check_announcement), with a DHT expiration no
  later than its signed ``announced_at + ttl_s`` -- so an old signed record replayed with a far expiration
  cannot outlive (and so replace) a newer one;
- that peer's :class:`~openhydra.discovery.ownership.Withdrawal` (tombstone), signed by its key, with a DHT
  expiration no later than its signed ``expires_at``.

Anything else under an owned subkey (unsigned, signed by another key, a tombstone nobody signed) is refused.
Subkeys that are not key-derived (plain names, other applications' data) are left to the readers, which
drop unsigned names unless configured otherwise (base.Discovery.keep_valid).

The validator runs inside hivemind's DHT process, so it holds no state and is picklable.
"""

from __future__ import annotations

import logging
from typing import Any

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from pydantic import ValidationError

from openhydra.discovery.ownership import RecordRefused, Withdrawal, check_announcement, check_withdrawal, owner_key
from openhydra.discovery.records import PeerAnnouncement

logger = logging.getLogger(__name__)

EXPIRATION_SLACK_S = 1e-3  # float rounding between the signed numbers and hivemind's expiration


def is_tombstone(value: Any) -> bool:
    return isinstance(value, dict) and value.get("withdrawn") is True


class OwnerValidator(RecordValidatorBase):
    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:
            return True  # not a subkey of ours (hivemind's reserved markers are not strings either)
        if not isinstance(subkey, str) or owner_key(subkey) is None:
            return True
        try:
            value = MSGPackSerializer.loads(record.value)
            if is_tombstone(value):
                withdrawal = Withdrawal.model_validate(value)
                if withdrawal.peer_id != subkey:
                    raise RecordRefused("peer_id_mismatch", f"tombstone of {withdrawal.peer_id} filed under {subkey}")
                check_withdrawal(withdrawal)
                if record.expiration_time > withdrawal.expires_at + EXPIRATION_SLACK_S:
                    raise RecordRefused("stale", f"tombstone of {subkey} stored to outlive its signed expires_at")
                return True
            announcement = PeerAnnouncement.from_wire(value)
            if announcement.peer_id != subkey:
                raise RecordRefused("peer_id_mismatch", f"record of {announcement.peer_id} filed under {subkey}")
            check_announcement(announcement)
            if record.expiration_time > announcement.announced_at + announcement.ttl_s + EXPIRATION_SLACK_S:
                raise RecordRefused("stale", f"record of {subkey} stored to outlive its signed lifetime")
            return True
        except (RecordRefused, ValidationError, ValueError, TypeError) as exc:
            logger.info("refused a DHT value under %s: %s", subkey, exc)
            return False
        except Exception as exc:  # a malformed value must never break the DHT; it is just refused
            logger.info("refused an unreadable DHT value under %s: %s", subkey, exc)
            return False
