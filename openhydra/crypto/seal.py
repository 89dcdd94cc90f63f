"""AES-256-GCM sealing of one activation message, with a replay guard (NIST SP 800-38D, RFC 5116).

Implements "X25519 ECDH key agreement + AES-256-GCM per activation" of SPEC.md "Security and privacy"
and DESIGN.md §5: a fresh nonce per message, associated data binding session, step and hop, and
rejection of tampered, truncated, reordered or replayed messages.

Wire format (all integers big-endian)::

    magic   b"OHA1"                 4
    dir     u8   0 = forward (into the hop), 1 = return (hop → coordinator)
    hop     u8   index of the hop whose key protects the message
    step    u64  decode step (prefill chunks and tokens); must not go backwards
    seq     u64  per-channel message counter from 1; must strictly increase
    sid_len u8, session id (UTF-8, 1..255 bytes)
    nonce   12 random bytes
    ciphertext || 16-byte GCM tag

The associated data is the whole header (magic through nonce), so every field above is
authenticated, and a message sealed for another session, hop, direction or step fails to open.

Nonces: 96 bits from ``os.urandom`` per message, not a counter. A counter nonce is only safe while
exactly one sender holds the key with unbroken state; a hop's ingress key is handed to another
process (its predecessor), which may crash, be retried or be replaced, and a counter that restarts
at 0 would reuse nonces (fatal for GCM). Random nonces need no such state; SP 800-38D §8.3 bounds them
at 2**32 messages per key for a collision probability under 2**-32. A hop key lives for one route of
one session (a failover builds a new onion, so every hop gets fresh keys); even at 10**7 messages the
chance of any collision is about 10**14 / 2**97 ≈ 6e-16, and :class:`Sealer` refuses to exceed 2**32
(:class:`KeyExhausted`).
Replay protection comes from the authenticated ``seq``, not from the nonce.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from openhydra.crypto.errors import KeyExhausted, MalformedMessage, ReplayedMessage, TamperedMessage

MAGIC = b"OHA1"
NONCE_LEN = 12
TAG_LEN = 16
MAX_MESSAGES_PER_KEY = 2**32
_FIXED = struct.Struct(">4sBBQQB")  # magic, dir, hop, step, seq, sid_len


class Direction(IntEnum):
    FORWARD = 0
    RETURN = 1


@dataclass(frozen=True, slots=True)
class OpenedMessage:
    step: int
    seq: int
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class MessageHeader:
    direction: Direction
    hop_index: int
    step: int
    seq: int
    session_id: str
    header_len: int


def _check_key(key: bytes) -> AESGCM:
    if len(key) != 32:
        raise ValueError(f"AES-256-GCM needs a 32-byte key, got {len(key)}")
    return AESGCM(key)


def _encode_session(session_id: str) -> bytes:
    sid = session_id.encode()
    if not 1 <= len(sid) <= 255:
        raise ValueError(f"session id must be 1..255 UTF-8 bytes, got {len(sid)}")
    return sid


def parse_header(message: bytes) -> MessageHeader:
    """Read the cleartext header without authenticating it (for routing and metrics only)."""
    if len(message) < _FIXED.size:
        raise MalformedMessage(f"sealed message of {len(message)} bytes is shorter than its header")
    magic, direction, hop, step, seq, sid_len = _FIXED.unpack_from(message)
    if magic != MAGIC:
        raise MalformedMessage("sealed message has the wrong magic")
    header_len = _FIXED.size + sid_len + NONCE_LEN
    if sid_len == 0 or len(message) < header_len + TAG_LEN or direction > 1:
        raise MalformedMessage("sealed message is truncated or has a bad header")
    try:
        session_id = bytes(message[_FIXED.size : _FIXED.size + sid_len]).decode()
    except UnicodeDecodeError as exc:
        raise MalformedMessage("session id is not UTF-8") from exc
    return MessageHeader(Direction(direction), hop, step, seq, session_id, header_len)


class Sealer:
    """The sending end of one (session, hop, direction) channel."""

    def __init__(self, key: bytes, session_id: str, hop_index: int, direction: Direction) -> None:
        self._aead = _check_key(key)
        self._sid = _encode_session(session_id)
        if not 0 <= hop_index <= 255:
            raise ValueError(f"hop_index must be in [0, 255], got {hop_index}")
        self.hop_index = hop_index
        self.direction = Direction(direction)
        self._seq = 0

    @property
    def messages_sealed(self) -> int:
        return self._seq

    def seal(self, step: int, plaintext: bytes) -> bytes:
        if not 0 <= step < 2**64:
            raise ValueError(f"step must be in [0, 2**64), got {step}")
        if self._seq >= MAX_MESSAGES_PER_KEY:
            raise KeyExhausted(f"{MAX_MESSAGES_PER_KEY} messages sealed under one key; re-key the session")
        self._seq += 1
        header = (
            _FIXED.pack(MAGIC, self.direction, self.hop_index, step, self._seq, len(self._sid))
            + self._sid
            + os.urandom(NONCE_LEN)
        )
        return header + self._aead.encrypt(header[-NONCE_LEN:], plaintext, header)


class Opener:
    """The receiving end of one channel: authenticates, then enforces strictly increasing ``seq``
    and non-decreasing ``step``. State moves only after a message authenticates, so forged headers
    cannot push the window forward."""

    def __init__(self, key: bytes, session_id: str, hop_index: int, direction: Direction) -> None:
        self._aead = _check_key(key)
        self.session_id = session_id
        _encode_session(session_id)
        self.hop_index = hop_index
        self.direction = Direction(direction)
        self.last_seq = 0
        self.last_step = -1

    def open(self, message: bytes) -> OpenedMessage:
        header = parse_header(message)
        if (header.session_id, header.hop_index, header.direction) != (
            self.session_id,
            self.hop_index,
            self.direction,
        ):
            raise TamperedMessage("message was sealed for another session, hop or direction")
        nonce = message[header.header_len - NONCE_LEN : header.header_len]
        try:
            plaintext = self._aead.decrypt(
                bytes(nonce), bytes(message[header.header_len :]), bytes(message[: header.header_len])
            )
        except InvalidTag as exc:
            raise TamperedMessage("activation message failed authentication") from exc
        if header.seq <= self.last_seq:
            raise ReplayedMessage(f"message seq {header.seq} already seen (last accepted {self.last_seq})")
        if header.step < self.last_step:
            raise ReplayedMessage(f"step {header.step} arrived after step {self.last_step}")
        self.last_seq = header.seq
        self.last_step = header.step
        return OpenedMessage(header.step, header.seq, plaintext)


def channel(
    key: bytes, session_id: str, hop_index: int, direction: Direction = Direction.FORWARD
) -> tuple[Sealer, Opener]:
    """Both ends of one channel (handy for tests and for the coordinator's own loopback)."""
    return Sealer(key, session_id, hop_index, direction), Opener(key, session_id, hop_index, direction)
