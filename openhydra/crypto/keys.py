"""Key agreement: identity-bound static X25519 keys, per-session per-hop ephemeral keys (RFC 7748, 5869).

Implements the "Transport" row of SPEC.md "Security and privacy" and DESIGN.md §5.

Static key binding (after libp2p Noise, whose handshake payload signs ``"noise-libp2p-static-key:" ||
static_key`` with the identity key): each node generates an X25519 key pair at start-up (never from a
seed) and advertises a :class:`SignedStaticKey`. The Ed25519 identity signs::

    b"openhydra-static-key:v1" || identity_public(32) || static_public(32) || expires_at(u64 BE)

A verifier checks the signature, that ``peer_id`` is the id of ``identity_key``, and the expiry.

Per-hop agreement: for every (session, hop) the coordinator generates a fresh ephemeral X25519 key
``e`` and computes ``DH(e, S_hop)`` against the hop's verified static key; the hop computes
``DH(s_hop, E)`` from the ephemeral public key it finds in its onion layer. Both then run::

    HKDF-SHA256(ikm = DH output,
                salt = SHA-256(b"openhydra-hop-salt:v1" || session_id),
                info = b"openhydra-hop-keys:v1" || hop_index(u16 BE) || E(32) || S_hop(32),
                L = 128)

and split the output into four independent 256-bit keys (:class:`HopKeys`): the onion-layer key,
the ingress key (messages *into* this hop), the return key (this hop → coordinator) and the DP audit
key. The ephemeral private key is dropped once the keys are derived, so compromising a node's static
key later does not reveal past sessions whose hop keys are gone (forward secrecy per session).
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field

from openhydra.crypto.encoding import B64Bytes
from openhydra.crypto.errors import InvalidStaticKey
from openhydra.crypto.identity import Identity, peer_id_matches, verify_signature

X25519_KEY_LEN = 32
STATIC_KEY_DOMAIN = b"openhydra-static-key:v1"
HOP_SALT_DOMAIN = b"openhydra-hop-salt:v1"
HOP_INFO_DOMAIN = b"openhydra-hop-keys:v1"
DEFAULT_STATIC_KEY_TTL_S = 24 * 3600
MAX_HOPS = 255


class StaticKeyPair:
    """A node's X25519 key pair for hop key agreement; regenerated at every start (not persisted)."""

    __slots__ = ("_private", "public_bytes")

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private = private_key
        self.public_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> StaticKeyPair:
        return cls(X25519PrivateKey.generate())

    def exchange(self, peer_public: bytes) -> bytes:
        return _exchange(self._private, peer_public)

    def signed_by(self, identity: Identity, ttl_s: int = DEFAULT_STATIC_KEY_TTL_S) -> SignedStaticKey:
        return SignedStaticKey.create(identity, self.public_bytes, expires_at=int(time.time()) + ttl_s)

    def __repr__(self) -> str:
        return f"StaticKeyPair(public={self.public_bytes.hex()[:16]}…)"


class SignedStaticKey(BaseModel):
    """A static X25519 key as advertised in announcements, bound to the node's Ed25519 identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: str = Field(max_length=64)
    identity_key: B64Bytes = Field(min_length=32, max_length=32)
    static_key: B64Bytes = Field(min_length=32, max_length=32)
    expires_at: int = Field(ge=0, lt=2**63)
    signature: B64Bytes = Field(min_length=64, max_length=64)

    @staticmethod
    def signing_payload(identity_key: bytes, static_key: bytes, expires_at: int) -> bytes:
        return STATIC_KEY_DOMAIN + identity_key + static_key + struct.pack(">Q", expires_at)

    @classmethod
    def create(cls, identity: Identity, static_key: bytes, expires_at: int) -> SignedStaticKey:
        payload = cls.signing_payload(identity.public_key_bytes, static_key, expires_at)
        return cls(
            peer_id=identity.peer_id,
            identity_key=identity.public_key_bytes,
            static_key=static_key,
            expires_at=expires_at,
            signature=identity.sign(payload),
        )

    def verify(self, now: float | None = None, expected_peer_id: str | None = None) -> bytes:
        """Return the verified static key, or raise :class:`InvalidStaticKey` saying why."""
        if not peer_id_matches(self.peer_id, self.identity_key):
            raise InvalidStaticKey(f"peer id {self.peer_id} does not match the identity key it carries")
        if expected_peer_id is not None and expected_peer_id != self.peer_id:
            raise InvalidStaticKey(f"static key is for {self.peer_id}, expected {expected_peer_id}")
        payload = self.signing_payload(self.identity_key, self.static_key, self.expires_at)
        if not verify_signature(self.identity_key, self.signature, payload):
            raise InvalidStaticKey(f"static key signature of {self.peer_id} does not verify")
        now = time.time() if now is None else now
        if self.expires_at <= now:
            raise InvalidStaticKey(f"static key of {self.peer_id} expired at {self.expires_at}")
        return self.static_key

    def is_valid(self, now: float | None = None, expected_peer_id: str | None = None) -> bool:
        try:
            self.verify(now, expected_peer_id)
        except InvalidStaticKey:
            return False
        return True


@dataclass(frozen=True, slots=True, repr=False)
class HopKeys:
    """The four 256-bit keys one (session, hop) shares with the coordinator."""

    layer_key: bytes
    """Encrypts this hop's onion layer."""
    ingress_key: bytes
    """Seals activations sent *to* this hop (by the coordinator or the predecessor)."""
    return_key: bytes
    """Seals what this hop sends back to the coordinator (results, errors)."""
    audit_key: bytes
    """HMAC key for this hop's differential-privacy audit tags."""

    def __repr__(self) -> str:
        return "HopKeys(<redacted>)"


def derive_hop_keys(
    shared_secret: bytes, session_id: str, hop_index: int, ephemeral_public: bytes, static_public: bytes
) -> HopKeys:
    if not 0 <= hop_index <= MAX_HOPS:
        raise ValueError(f"hop_index must be in [0, {MAX_HOPS}], got {hop_index}")
    salt = hashlib.sha256(HOP_SALT_DOMAIN + session_id.encode()).digest()
    info = HOP_INFO_DOMAIN + struct.pack(">H", hop_index) + ephemeral_public + static_public
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=salt, info=info).derive(shared_secret)
    return HopKeys(okm[0:32], okm[32:64], okm[64:96], okm[96:128])


def _exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    if len(peer_public) != X25519_KEY_LEN:
        raise InvalidStaticKey(f"an X25519 public key is {X25519_KEY_LEN} bytes, got {len(peer_public)}")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # all-zero output: a low-order point (RFC 7748 §6.1)
        raise InvalidStaticKey("X25519 exchange with a low-order public key") from exc


def initiate_hop(static_public: bytes, session_id: str, hop_index: int) -> tuple[bytes, HopKeys]:
    """Coordinator side: a fresh ephemeral key for this (session, hop). Returns (E, keys)."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = _exchange(ephemeral, static_public)
    return ephemeral_public, derive_hop_keys(shared, session_id, hop_index, ephemeral_public, static_public)


def accept_hop(static: StaticKeyPair, ephemeral_public: bytes, session_id: str, hop_index: int) -> HopKeys:
    """Hop side: the same keys from the coordinator's ephemeral public key."""
    shared = static.exchange(ephemeral_public)
    return derive_hop_keys(shared, session_id, hop_index, ephemeral_public, static.public_bytes)
