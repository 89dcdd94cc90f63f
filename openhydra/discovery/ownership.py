"""Who may write a discovery record: only the owner of the peer id, and only forward in time.

A peer id derived from an Ed25519 key (the libp2p ``12D3KooW...`` form, crypto/identity.py) is *owned*:

- an announcement under it must carry ``public_key`` (that key) and a valid ``signature``
  (crypto/records.py, the "Signed announcement" envelope of docs/security.md);
- a record replaces another only when its signed ``announced_at`` is newer (no rollback);
- a withdrawal (HTTP delete, Kademlia tombstone) is a :class:`Withdrawal` signed by the same key.

A peer id that is not a key (``alice``) has no owner: such records are unsigned by nature and are accepted
only where ``allow_unsigned_names`` is on (``privacy=off`` swarms with ``node.peer_id``, tests, demos).
Key-derived ids are checked whatever that flag says, so turning it on never lets anyone speak for a key.

Every check raises :class:`RecordRefused` with a stable ``reason`` (the metrics label and the error code)
and the HTTP status the DHT server answers with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from openhydra.crypto.announce import MAX_CLOCK_SKEW_S, canonical_json
from openhydra.crypto.errors import CryptoError
from openhydra.crypto.identity import Identity, peer_id_matches, public_key_from_peer_id, verify_signature
from openhydra.crypto.records import check_record
from openhydra.discovery.records import _MODEL_ID, _PEER_ID, B64, MAX_TTL_S, Finite, PeerAnnouncement

WITHDRAW_DOMAIN = b"openhydra-withdraw:v1\0"  # never the announcement's domain: one signature, one meaning
WITHDRAWAL_MAX_AGE_S = 300  # an HTTP withdrawal older than this is a replay
REASONS = ("unsigned", "peer_id_mismatch", "invalid_signature", "stale")
STATUS = {"unsigned": 401, "peer_id_mismatch": 403, "invalid_signature": 403, "stale": 409}
CODE = {
    "unsigned": "unsigned_record",
    "peer_id_mismatch": "peer_id_mismatch",
    "invalid_signature": "invalid_signature",
    "stale": "stale_record",
}
ERROR_TYPE = {401: "authentication_error", 403: "permission_error", 409: "invalid_request_error"}


class RecordRefused(Exception):
    """A record or withdrawal that must not be stored or used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = STATUS[reason]
        self.code = CODE[reason]


def owner_key(peer_id: str) -> bytes | None:
    """The Ed25519 key a peer id is derived from, or None for a plain name (no owner)."""
    try:
        return public_key_from_peer_id(peer_id)
    except ValueError:
        return None


def _b64(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class _SignatureCache:
    """Signatures already checked (the same record comes back on every lookup): bounded, LRU."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._ok: OrderedDict[str, bool] = OrderedDict()

    def get(self, key: str) -> bool | None:
        value = self._ok.get(key)
        if value is not None:
            self._ok.move_to_end(key)
        return value

    def put(self, key: str, ok: bool) -> None:
        self._ok[key] = ok
        self._ok.move_to_end(key)
        while len(self._ok) > self.size:
            self._ok.popitem(last=False)


_cache = _SignatureCache()


def check_announcement(
    record: PeerAnnouncement, *, allow_unsigned_names: bool = False, now: float | None = None
) -> None:
    """Raise :class:`RecordRefused` unless ``record`` may be stored or used (see the module docstring).
    Freshness: ``announced_at`` at most 60 s ahead of ``now`` and at most ``ttl_s + 60`` s behind it."""
    now = time.time() if now is None else now
    if record.signature is None or record.public_key is None:
        if owner_key(record.peer_id) is not None:
            raise RecordRefused("unsigned", f"record of {record.peer_id} is unsigned; that peer id needs its signature")
        if not allow_unsigned_names:
            raise RecordRefused("unsigned", f"record of {record.peer_id} is unsigned (unsigned names are not accepted)")
        return
    public_key = _b64(record.public_key)
    if public_key is None or len(public_key) != 32 or not peer_id_matches(record.peer_id, public_key):
        raise RecordRefused("peer_id_mismatch", f"record's public_key is not the key of peer id {record.peer_id}")
    age = now - record.announced_at
    if not -MAX_CLOCK_SKEW_S <= age <= record.ttl_s + MAX_CLOCK_SKEW_S:
        raise RecordRefused("stale", f"record of {record.peer_id} announced {age:.0f} s ago is outside its lifetime")
    cache_key = hashlib.sha256(record.model_dump_json().encode()).hexdigest()
    ok = _cache.get(cache_key)
    if ok is None:
        try:
            # The signature over the record's canonical JSON (and the static key's binding, when present).
            check_record(record, now=now, require_static_key=False)
            ok = True
        except (CryptoError, ValueError):
            ok = False
        _cache.put(cache_key, ok)
    if not ok:
        raise RecordRefused("invalid_signature", f"record signature of {record.peer_id} does not verify")


class Withdrawal(BaseModel):
    """A peer's signed "forget my record of ``model_id``": the HTTP delete body and the Kademlia tombstone.

    ``withdrawn_at`` orders it against announcements (an older announcement cannot come back after it);
    ``expires_at`` bounds how long a Kademlia node may keep it (its DHT expiration may not exceed this)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, protected_namespaces=())

    withdrawn: Literal[True] = True
    peer_id: str = Field(pattern=_PEER_ID)
    model_id: str = Field(pattern=_MODEL_ID)
    withdrawn_at: Finite = Field(gt=0.0, le=4_102_444_800.0)  # withdrawer's unix time, s
    expires_at: Finite = Field(gt=0.0, le=4_102_444_800.0)
    public_key: B64 | None = None
    signature: B64 | None = None

    def signing_payload(self) -> bytes:
        body = canonical_json(self.model_dump(mode="json", exclude={"signature"}, exclude_none=True))
        return WITHDRAW_DOMAIN + body.encode()

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def sign_withdrawal(identity: Identity, model_id: str, withdrawn_at: float, expires_at: float) -> Withdrawal:
    unsigned = Withdrawal(
        peer_id=identity.peer_id,
        model_id=model_id,
        withdrawn_at=float(withdrawn_at),
        expires_at=float(expires_at),
        public_key=base64.b64encode(identity.public_key_bytes).decode(),
    )
    signature = identity.sign(unsigned.signing_payload())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def check_withdrawal(w: Withdrawal, *, allow_unsigned_names: bool = False, now: float | None = None) -> None:
    """Raise :class:`RecordRefused` unless ``w`` was signed by the owner of ``w.peer_id`` and is current:
    ``withdrawn_at`` at most 60 s ahead, ``now`` not past ``expires_at`` (+60 s), and a lifetime
    ``expires_at - withdrawn_at`` of at most a day."""
    now = time.time() if now is None else now
    if w.signature is None or w.public_key is None:
        if owner_key(w.peer_id) is not None or not allow_unsigned_names:
            raise RecordRefused("unsigned", f"withdrawal of {w.peer_id} is not signed by that peer")
        return
    public_key = _b64(w.public_key)
    if public_key is None or len(public_key) != 32 or not peer_id_matches(w.peer_id, public_key):
        raise RecordRefused("peer_id_mismatch", f"withdrawal's public_key is not the key of peer id {w.peer_id}")
    if not (
        w.withdrawn_at - MAX_CLOCK_SKEW_S <= now <= w.expires_at + MAX_CLOCK_SKEW_S
        and 0 <= w.expires_at - w.withdrawn_at <= MAX_TTL_S + MAX_CLOCK_SKEW_S
    ):
        raise RecordRefused("stale", f"withdrawal of {w.peer_id} at {w.withdrawn_at:.0f} is outside its lifetime")
    signature = _b64(w.signature)
    if signature is None or not verify_signature(public_key, signature, w.signing_payload()):
        raise RecordRefused("invalid_signature", f"withdrawal signature of {w.peer_id} does not verify")
