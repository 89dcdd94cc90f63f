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

Solving happens off the serving path: :meth:`Membership.prepare` starts this window's proof in a child process
(``python -m openhydra.crypto.pow``, niced, so the hashing loop never holds the node's GIL) while the node loads
its model, and the first :meth:`Membership.stamp` waits for it. When a new window starts, ``stamp`` keeps
using the previous window's proof (verifiers accept it for one more window) and solves the new one in the
background; it blocks only when it holds no valid proof at all (the first start, or after a long stall).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

from openhydra.crypto.announce import canonical_json
from openhydra.crypto.errors import CryptoError, InvalidProofOfWork
from openhydra.crypto.pow import WINDOW_S, GeoProof, solve, verify, window_of

log = logging.getLogger(__name__)
CHILD_MIN_BITS = 16
"""Below this a proof takes under ~65 ms on average (2**16 hashes at ~1 M/s): solved on a thread here, without
starting a child interpreter (test nodes ask for 8 bits and start by the hundred)."""

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

    def __init__(self, difficulty_bits: int = 0, region: str = "unspecified", secret: str | None = None,
                 solve_in_child: bool = True) -> None:
        self.difficulty_bits = difficulty_bits
        self.region = region
        self.secret = secret
        self.solve_in_child = solve_in_child  # False: solve on a thread of this process (holds the GIL)
        self.solved = 0  # proofs this node has solved
        self.last_solve_s: float | None = None  # wall seconds the latest one took
        self._proofs: dict[tuple[str, int], GeoProof] = {}
        self._solving: dict[tuple[str, int], Future[GeoProof]] = {}
        self._children: set[subprocess.Popen] = set()
        self._closed = False
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.difficulty_bits > 0 or self.secret is not None

    @property
    def token(self) -> str | None:
        """The RPC credential, or None in an open swarm."""
        return rpc_token(self.secret) if self.secret is not None else None

    def prepare(self, peer_id: str, at: float | None = None) -> None:
        """Start solving ``peer_id``'s proof for the window of ``at`` (now) in the background, so that the
        first announcement finds it ready; a no-op when no proof of work is required."""
        if self.difficulty_bits > 0:
            with self._lock:
                self._start(peer_id, window_of(time.time() if at is None else at))

    def wait(self, peer_id: str, at: float | None = None) -> GeoProof | None:
        """Block until ``peer_id`` holds a proof valid at ``at`` (now); None when none is required. Call it
        before the first announcement from a thread that may wait (not the discovery event loop)."""
        if self.difficulty_bits == 0:
            return None
        return self._proof(peer_id, time.time() if at is None else at)

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

    def close(self) -> None:
        """Stop any solver child (a node shutting down); later proofs are solved in this process."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        for child in children:
            child.kill()

    def _proof(self, peer_id: str, at: float) -> GeoProof:
        window = window_of(at)
        with self._lock:
            proof = self._proofs.get((peer_id, window))
            if proof is not None:
                return proof
            pending = self._start(peer_id, window)
            previous = self._proofs.get((peer_id, window - 1))
        if previous is not None and not pending.done():
            return previous  # still valid this window; the new one is being solved in the background
        return pending.result()  # nothing valid to announce meanwhile: wait for the work

    def _start(self, peer_id: str, window: int) -> Future[GeoProof]:
        """The (possibly already running) background solve of ``(peer_id, window)``; call under the lock."""
        key = (peer_id, window)
        future = self._solving.get(key)
        if future is None:
            future = Future()
            self._solving[key] = future
            threading.Thread(target=self._solve_into, args=(key, future), name="openhydra-pow", daemon=True).start()
        return future

    def _solve_into(self, key: tuple[str, int], future: Future[GeoProof]) -> None:
        peer_id, window = key
        at = window * WINDOW_S + WINDOW_S / 2
        started = time.perf_counter()
        try:
            in_child = self.solve_in_child and self.difficulty_bits >= CHILD_MIN_BITS
            proof = self._solve_child(peer_id, at) if in_child else None
            if proof is None:
                if self._closed:
                    raise InvalidProofOfWork("the node is shutting down")
                proof = solve(peer_id, self.region, self.difficulty_bits, now=at)
        except Exception as exc:  # e.g. an invalid region: the announcement that waits on it fails loudly
            with self._lock:
                self._solving.pop(key, None)
            future.set_exception(exc)
            return
        with self._lock:  # keep this window's and the previous one's proofs, forget older ones
            self._proofs = {k: v for k, v in self._proofs.items() if k[1] >= window - 1} | {key: proof}
            self._solving.pop(key, None)
            self.solved += 1
            self.last_solve_s = time.perf_counter() - started
        future.set_result(proof)

    def _solve_child(self, peer_id: str, at: float) -> GeoProof | None:
        """Solve in ``python -m openhydra.crypto.pow``; None (solve here instead) if the child fails."""
        if self._closed:
            return None
        argv = [sys.executable, "-m", "openhydra.crypto.pow", peer_id, self.region, str(self.difficulty_bits),
                repr(at)]
        try:
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.warning("cannot start the proof-of-work solver (%s); solving in this process", exc)
            return None
        with self._lock:
            self._children.add(child)
        try:
            out, err = child.communicate()
        finally:
            with self._lock:
                self._children.discard(child)
        try:
            if child.returncode != 0:
                raise ValueError(f"exit {child.returncode}: {err.decode(errors='replace')[-300:]}")
            proof = GeoProof.model_validate_json(out)
            verify(proof, peer_id, self.difficulty_bits, claimed_region=self.region, now=at)
            return proof
        except (ValueError, CryptoError) as exc:
            if not self._closed:
                log.warning("proof-of-work solver failed (%s); solving in this process", exc)
            return None
