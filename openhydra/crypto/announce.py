"""Signed announcement envelopes for discovery records (Ed25519, RFC 8032; JSON canonicalized as below).

Implements "DHT announcements are signed, and a record whose signature fails, or whose peer id does
not match its key, is ignored" (security issue, Identity). Discovery puts its announcement into
``body`` and publishes the envelope; readers call :func:`open_envelope` and drop anything that raises.

Signed bytes: ``b"openhydra-announce:v1\\0" || peer_id || "\\0" || issued_at(u64 BE) || body`` where
``body`` is the canonical JSON of the announcement (``sort_keys``, separators ``,`` and ``:``,
UTF-8) and is carried *as that string*, so no verifier re-serializes before checking.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from openhydra.crypto.encoding import B64Bytes
from openhydra.crypto.errors import InvalidSignature
from openhydra.crypto.identity import Identity, peer_id_matches, verify_signature

DOMAIN = b"openhydra-announce:v1\0"
MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_AGE_S = 300  # announcements are refreshed every 60 s
MAX_CLOCK_SKEW_S = 60


class SignedEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=255)
    public_key: B64Bytes = Field(min_length=32, max_length=32)
    issued_at: int = Field(ge=0, lt=2**63)
    body: str = Field(max_length=MAX_BODY_BYTES)
    signature: B64Bytes = Field(min_length=64, max_length=64)


def canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def signed_bytes(peer_id: str, issued_at: int, body: str) -> bytes:
    return DOMAIN + peer_id.encode() + b"\0" + struct.pack(">Q", issued_at) + body.encode()


def seal_envelope(identity: Identity, payload: dict[str, Any], issued_at: int | None = None) -> SignedEnvelope:
    body = canonical_json(payload)
    issued_at = int(time.time()) if issued_at is None else issued_at
    return SignedEnvelope(
        peer_id=identity.peer_id,
        public_key=identity.public_key_bytes,
        issued_at=issued_at,
        body=body,
        signature=identity.sign(signed_bytes(identity.peer_id, issued_at, body)),
    )


def open_envelope(
    envelope: SignedEnvelope, now: float | None = None, max_age_s: int = DEFAULT_MAX_AGE_S
) -> dict[str, Any]:
    """The verified announcement, or :class:`InvalidSignature` saying why it must be ignored. A
    ``peer_id`` inside the body must equal the envelope's."""
    if not peer_id_matches(envelope.peer_id, envelope.public_key):
        raise InvalidSignature(f"announcement peer id {envelope.peer_id} does not match its public key")
    if not verify_signature(
        envelope.public_key, envelope.signature, signed_bytes(envelope.peer_id, envelope.issued_at, envelope.body)
    ):
        raise InvalidSignature(f"announcement signature of {envelope.peer_id} does not verify")
    now = time.time() if now is None else now
    if not -MAX_CLOCK_SKEW_S <= now - envelope.issued_at <= max_age_s:
        raise InvalidSignature(f"announcement of {envelope.peer_id} issued at {envelope.issued_at} is stale")
    try:
        payload = json.loads(envelope.body)
    except json.JSONDecodeError as exc:
        raise InvalidSignature("announcement body is not JSON") from exc
    if not isinstance(payload, dict):
        raise InvalidSignature("announcement body is not a JSON object")
    if payload.get("peer_id", envelope.peer_id) != envelope.peer_id:
        raise InvalidSignature("announcement body names another peer id than its signer")
    return payload
