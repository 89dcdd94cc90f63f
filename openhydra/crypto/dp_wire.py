"""DP audit records on the wire: sealed so that only the coordinator can read them (crypto/dp.py).

A hop's :class:`~openhydra.crypto.dp.DPRecord` carries the noise seed; a successor that read it could
regenerate the noise and subtract it. So the record travels down the chain sealed with AES-256-GCM under
a key only the hop and the coordinator hold: ``HMAC-SHA256(audit_key, "openhydra-dp-record-key:v1")``,
a fresh random 96-bit nonce per record, associated data binding session, hop index and step. The last hop
returns all of them in its (sealed) Result; the coordinator opens each with that hop's audit key and runs
:meth:`~openhydra.crypto.dp.DPAuditor.verify_record` (authentic tag, configured sigma/clip, the seed it
derives itself, the right session/hop/step). A missing, extra, reordered or altered record fails the step
at the hop it names.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from openhydra.crypto.dp import DPAuditor, DPParams, DPRecord, tensor_digest
from openhydra.crypto.errors import AuditFailure

KEY_DOMAIN = b"openhydra-dp-record-key:v1"
AD_DOMAIN = b"openhydra-dp-record:v1"
NONCE_BYTES = 12
MAX_RECORD_BYTES = 4096


def _key(audit_key: bytes) -> bytes:
    return hmac.new(audit_key, KEY_DOMAIN, hashlib.sha256).digest()


def _ad(session_id: str, hop_index: int, step: int) -> bytes:
    return AD_DOMAIN + struct.pack(">BQ", hop_index, step) + session_id.encode()


def seal_record(audit_key: bytes, record: DPRecord) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    body = record.model_dump_json().encode()
    return nonce + AESGCM(_key(audit_key)).encrypt(nonce, body, _ad(record.session_id, record.hop_index, record.step))


def open_record(audit_key: bytes, blob: bytes, session_id: str, hop_index: int, step: int) -> DPRecord:
    if not NONCE_BYTES < len(blob) <= MAX_RECORD_BYTES:
        raise AuditFailure(f"DP record of hop {hop_index} has a bad size ({len(blob)} bytes)")
    try:
        body = AESGCM(_key(audit_key)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                               _ad(session_id, hop_index, step))
    except InvalidTag:
        raise AuditFailure(f"DP record of hop {hop_index} step {step} does not open under its key") from None
    try:
        return DPRecord.model_validate_json(body)
    except ValueError as exc:
        raise AuditFailure(f"DP record of hop {hop_index} is malformed: {exc}") from None


def audit_records(
    blobs: Sequence[bytes], audit_keys: Sequence[bytes], params: DPParams, session_id: str, step: int
) -> int:
    """Check one step's records: exactly one per hop that pushed hidden states, in hop order.

    ``audit_keys``: hop 0..n-2's keys. Returns how many were verified; raises :class:`AuditFailure` whose
    ``hop_index`` attribute names the hop to blame."""
    for index, key in enumerate(audit_keys):
        if index >= len(blobs):
            raise _blame(AuditFailure(f"hop {index} sent no DP record for step {step} (noise not applied?)"), index)
        try:
            record = open_record(key, blobs[index], session_id, index, step)
            DPAuditor(key, params, session_id, index).verify_record(record, step)
        except AuditFailure as exc:
            raise _blame(exc, index) from None
    if len(blobs) > len(audit_keys):
        raise _blame(AuditFailure(f"{len(blobs)} DP records for {len(audit_keys)} noising hops"), len(audit_keys))
    return len(audit_keys)


def _blame(exc: AuditFailure, hop_index: int) -> AuditFailure:
    exc.hop_index = hop_index  # type: ignore[attr-defined]
    return exc


# ---- what the receiver got: the check that a hop sent the tensor its record covers -------------------------
RECEIVED_DOMAIN = b"openhydra-dp-received:v1"


def seal_received(audit_key: bytes, session_id: str, hop_index: int, step: int, received: torch.Tensor) -> bytes:
    """Hop ``hop_index``'s sealed SHA-256 of the hidden states it received (the receiver's side of the check)."""
    nonce = os.urandom(NONCE_BYTES)
    ad = RECEIVED_DOMAIN + struct.pack(">BQ", hop_index, step) + session_id.encode()
    return nonce + AESGCM(_key(audit_key)).encrypt(nonce, tensor_digest(received), ad)


def open_received(audit_key: bytes, blob: bytes, session_id: str, hop_index: int, step: int) -> bytes:
    ad = RECEIVED_DOMAIN + struct.pack(">BQ", hop_index, step) + session_id.encode()
    try:
        return AESGCM(_key(audit_key)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], ad)
    except (InvalidTag, ValueError):
        raise AuditFailure(f"received-digest of hop {hop_index} step {step} does not open under its key") from None


def audit_delivery(
    records: Sequence[bytes], received: Sequence[bytes], audit_keys: Sequence[bytes], session_id: str, step: int
) -> int:
    """Each pushing hop sent the tensor its DP record covers: the digest in hop i's record equals the digest hop
    i+1 reports it received. ``audit_keys``: every hop's key (0..n-1); ``records`` were checked by
    :func:`audit_records` already. Blames the sender on a mismatch (a receiver that lies can frame its
    predecessor, as it could by failing any step: docs/security.md). Returns how many were compared."""
    senders = len(audit_keys) - 1
    if len(received) != senders:
        raise _blame(AuditFailure(f"{len(received)} received-digests for {senders} receiving hops"),
                     min(len(received) + 1, senders))
    for index in range(senders):
        sent = open_record(audit_keys[index], records[index], session_id, index, step).digest
        got = open_received(audit_keys[index + 1], received[index], session_id, index + 1, step)
        if not hmac.compare_digest(sent, got):
            raise _blame(AuditFailure(f"hop {index} sent hidden states other than the ones its DP record covers "
                                      f"(step {step})"), index)
    return senders
