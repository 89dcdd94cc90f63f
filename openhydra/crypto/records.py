"""Signing and verifying discovery records with the node identity (announce.py envelope, keys.py static key).

A :class:`~openhydra.discovery.records.PeerAnnouncement` carries three security fields:
``public_key`` (the Ed25519 identity key, base64), ``static_key`` (base64 of the JSON of a
:class:`~openhydra.crypto.keys.SignedStaticKey`) and ``signature`` (base64). The signature is the one
:func:`openhydra.crypto.announce.seal_envelope` makes over the record's canonical JSON without its
``signature`` field (None fields dropped, so a record survives the JSON / msgpack round trip of either
DHT unchanged), with ``issued_at = int(announced_at)``. :func:`verify_record` rebuilds that envelope
and runs :func:`~openhydra.crypto.announce.open_envelope`, then checks the static key is bound to the
same peer id. It is the verifier handed to ``Discovery.set_verifier``: a record that fails is dropped.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING

from openhydra.crypto.announce import SignedEnvelope, canonical_json, open_envelope, signed_bytes
from openhydra.crypto.errors import CryptoError
from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import SignedStaticKey
from openhydra.discovery.refusals import RefusalLog

if TYPE_CHECKING:
    from openhydra.discovery.records import PeerAnnouncement

log = logging.getLogger(__name__)
REFUSALS = RefusalLog(log)
CLOCK_SLACK_S = 60


def encode_static_key(signed: SignedStaticKey) -> str:
    return base64.b64encode(signed.model_dump_json().encode()).decode()


def decode_static_key(text: str) -> SignedStaticKey:
    """Parse a record's ``static_key`` field; raises ValueError (pydantic) on bad input."""
    return SignedStaticKey.model_validate_json(base64.b64decode(text, validate=True))


def _body(record: PeerAnnouncement) -> str:
    return canonical_json(record.model_dump(mode="json", exclude={"signature"}, exclude_none=True))


def sign_record(record: PeerAnnouncement, identity: Identity, static_key: SignedStaticKey | None) -> PeerAnnouncement:
    """The record with ``public_key``, ``static_key`` and ``signature`` filled in by ``identity``."""
    if record.peer_id != identity.peer_id:
        raise ValueError(f"record names peer {record.peer_id}, the identity is {identity.peer_id}")
    unsigned = record.model_copy(
        update={
            "public_key": base64.b64encode(identity.public_key_bytes).decode(),
            "static_key": encode_static_key(static_key) if static_key is not None else None,
            "signature": None,
        }
    )
    # The bytes open_envelope checks (announce.py); the record itself carries the body.
    body = _body(unsigned)
    signature = identity.sign(signed_bytes(identity.peer_id, int(unsigned.announced_at), body))
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def check_record(record: PeerAnnouncement, now: float | None = None, require_static_key: bool = True) -> None:
    """Raise :class:`CryptoError` (or ValueError) saying why ``record`` must be dropped."""
    if record.public_key is None or record.signature is None:
        raise CryptoError(f"record of {record.peer_id} is unsigned")
    envelope = SignedEnvelope(
        peer_id=record.peer_id,
        public_key=base64.b64decode(record.public_key, validate=True),
        issued_at=int(record.announced_at),
        body=_body(record),
        signature=base64.b64decode(record.signature, validate=True),
    )
    open_envelope(envelope, now=now, max_age_s=int(record.ttl_s) + CLOCK_SLACK_S)
    if record.static_key is None:
        if require_static_key:
            raise CryptoError(f"record of {record.peer_id} has no static key for per-hop encryption")
        return
    decode_static_key(record.static_key).verify(now, expected_peer_id=record.peer_id)


def verify_record(record: PeerAnnouncement) -> bool:
    """Discovery verifier: True keeps the record."""
    try:
        check_record(record)
    except (CryptoError, ValueError) as exc:
        REFUSALS.dropped(record.peer_id, exc)
        return False
    return True
