"""Who may join: the geo-challenge proof of work and the private-swarm secret, in announcements and RPCs.

Two optional admission rules, each switched on by the ``privacy`` config and enforced by every node on
every record it looks up (the discovery verifier) and, for the secret, on every gRPC call a peer accepts:

- **Proof of work** (``privacy.pow_difficulty_bits > 0``, :mod:`openhydra.crypto.pow`): a record must carry
  ``geo_proof``, a :class:`~openhydra.crypto.pow.GeoProof` for its own peer id and claimed region in the
  current or previous 10-minute window with at least that many leading zero bits. Keeping an identity
  in the swarm costs one proof per window; minting N identities costs N proofs.
- **Swarm secret** (``privacy.swarm_secret``): a record must carry ``swarm_tag`` =
  HMAC-SHA256(secret, "openhydra-swarm-record:v1" || canonical record without signature, tag and keys), so
  strangers' records are ignored; and every peer RPC must carry the metadata ``openhydra-swarm`` =
  HMAC-SHA256(secret, "openhydra-swarm-rpc:v1") (hex), so strangers can neither push steps into the
  swarm's peers nor get them to compute. The RPC token is a bearer credential: it protects the secret
  itself, not the channel (gRPC between peers is not TLS; activations are sealed separately). See
  docs/security.md.

Order when announcing: proof, then tag, then the identity signature (which covers both).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading

from openhydra.crypto.announce import canonical_json
from openhydra.crypto.errors import CryptoError, InvalidProofOfWork
from openhydra.crypto.pow import GeoProof, solve, verify, window_of

RECORD_DOMAIN = b"openhydra-swarm-record:v1"
RPC_DOMAIN = b"openhydra-swarm-rpc:v1"
RPC_METADATA_KEY = "openhydra-swarm"


class NotInSwarm(CryptoError):
    """A record or call without a valid private-swarm credential."""

    reason = "not_in_swarm"


def rpc_token(secret: str) -> str:
    return hmac.new(secret.encode(), RPC_DOMAIN, hashlib.sha256).hexdigest()


def rpc_token_ok(expected: str, metadata) -> bool:
    """``metadata``: a gRPC invocation metadata sequence of (key, value)."""
    for key, value in metadata or ():
        if key == RPC_METADATA_KEY:
            got = value.decode() if isinstance(value, bytes) else str(value)
            return hmac.compare_digest(got.encode(), expected.encode())
    return False


def _record_bytes(record) -> bytes:
    # The identity fields are bound by the signature (which covers this tag); the tag binds everything else.
    data = record.model_dump(mode="json", exclude={"signature", "swarm_tag", "public_key", "static_key"},
                             exclude_none=True)
    return RECORD_DOMAIN + canonical_json(data).encode()


def record_tag(secret: str, record) -> str:
    return base64.b64encode(hmac.new(secret.encode(), _record_bytes(record), hashlib.sha256).digest()).decode()


def encode_proof(proof: GeoProof) -> str:
    return base64.b64encode(proof.model_dump_json().encode()).decode()


def decode_proof(text: str) -> GeoProof:
    return GeoProof.model_validate_json(base64.b64decode(text, validate=True))


class Membership:
    """A node's admission rules: stamps its own records and checks everyone else's."""

    def __init__(self, difficulty_bits: int = 0, region: str = "unspecified", secret: str | None = None) -> None:
        self.difficulty_bits = difficulty_bits
        self.region = region
        self.secret = secret
        self._proofs: dict[tuple[str, int], GeoProof] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.difficulty_bits > 0 or self.secret is not None

    @property
    def token(self) -> str | None:
        """The RPC credential, or None in an open swarm."""
        return rpc_token(self.secret) if self.secret is not None else None

    def stamp(self, record):
        """The record with this node's proof and swarm tag (sign it after this)."""
        update: dict[str, object] = {}
        if self.difficulty_bits > 0:
            update["geo_proof"] = encode_proof(self._proof(record.peer_id, record.announced_at))
            update["region"] = self.region
        if update:
            record = record.model_copy(update=update)
        if self.secret is not None:
            record = record.model_copy(update={"swarm_tag": record_tag(self.secret, record)})
        return record

    def check(self, record, now: float | None = None) -> None:
        """Raise :class:`CryptoError` saying why ``record`` must be dropped."""
        if self.secret is not None:
            if record.swarm_tag is None:
                raise NotInSwarm(f"record of {record.peer_id} has no swarm tag (not a member of this private swarm)")
            if not hmac.compare_digest(record_tag(self.secret, record), record.swarm_tag):
                raise NotInSwarm(f"record of {record.peer_id} has a wrong swarm tag")
        if self.difficulty_bits > 0:
            if record.geo_proof is None:
                raise InvalidProofOfWork(f"record of {record.peer_id} has no geo-challenge proof")
            try:
                proof = decode_proof(record.geo_proof)
            except ValueError as exc:
                raise InvalidProofOfWork(f"record of {record.peer_id} has a malformed proof: {exc}") from None
            verify(proof, record.peer_id, self.difficulty_bits, claimed_region=record.region, now=now)

    def _proof(self, peer_id: str, at: float) -> GeoProof:
        window = window_of(at)
        with self._lock:
            proof = self._proofs.get((peer_id, window))
            if proof is None:  # one solve per 10-minute window (about 2**bits hashes)
                proof = solve(peer_id, self.region, self.difficulty_bits, now=at)
                self._proofs = {(peer_id, window): proof}
            return proof
