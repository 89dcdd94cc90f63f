"""Geo-challenge: a SHA-256 proof of work bound to a peer id, its claimed region and a time window (FIPS 180-4).

Implements the "Sybil resistance" row of SPEC.md "Security and privacy". A proof is a nonce such that::

    SHA-256(b"openhydra-geo-pow:v1" || u8 len || peer_id || u8 len || region || window(u64 BE) || nonce(u64 BE))

starts with at least ``difficulty_bits`` zero bits, where ``window = floor(unix_time / 600)``.
Verification accepts the current and the previous window only, so a proof is good for 10 to 20
minutes and identities cannot be minted in advance and stockpiled: keeping N identities alive costs
N proofs every window, i.e. about ``N · 2**difficulty_bits`` hashes per 10 minutes.

What it does *not* do: prove where a peer is. The region is a claim the work is bound to (a proof
for "eu-west" cannot be re-labelled "us-east"); checking the claim needs latency probes from known
vantage points, which this module does not do. It also only prices identities: an attacker with
more CPU still mints more of them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from openhydra.crypto.errors import InvalidProofOfWork

DOMAIN = b"openhydra-geo-pow:v1"
WINDOW_S = 600
MAX_DIFFICULTY_BITS = 64


class GeoProof(BaseModel):
    """The proof a peer puts in its announcement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=255)
    region: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    window: int = Field(ge=0, lt=2**64)
    nonce: int = Field(ge=0, lt=2**64)


def window_of(unix_time: float) -> int:
    return int(unix_time // WINDOW_S)


def _prefix(peer_id: str, region: str, window: int) -> hashlib._Hash:
    pid, reg = peer_id.encode(), region.encode()
    h = hashlib.sha256(DOMAIN)
    h.update(bytes([len(pid)]) + pid + bytes([len(reg)]) + reg + window.to_bytes(8, "big"))
    return h


def pow_digest(peer_id: str, region: str, window: int, nonce: int) -> bytes:
    h = _prefix(peer_id, region, window)
    h.update(nonce.to_bytes(8, "big"))
    return h.digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def _check_difficulty(bits: int) -> None:
    if not 0 <= bits <= MAX_DIFFICULTY_BITS:
        raise ValueError(f"difficulty_bits must be in [0, {MAX_DIFFICULTY_BITS}], got {bits}")


def _search(prefix: hashlib._Hash, difficulty_bits: int, start: int, count: int) -> int | None:
    """The first nonce in ``[start, start + count)`` whose digest has ``difficulty_bits`` leading zero bits."""
    shift = 256 - difficulty_bits
    for nonce in range(start, min(start + count, 2**64)):
        h = prefix.copy()
        h.update(nonce.to_bytes(8, "big"))
        if int.from_bytes(h.digest(), "big") >> shift == 0:
            return nonce
    return None


def solve(peer_id: str, region: str, difficulty_bits: int, now: float | None = None, start_nonce: int = 0,
          keep_going: Callable[[], bool] | None = None) -> GeoProof:
    """Find a proof for the window containing ``now`` (expected ``2**difficulty_bits`` hashes).

    ``keep_going`` is asked every 65,536 hashes; when it answers False the search stops with
    :class:`InvalidProofOfWork` (a solver child whose node has gone away)."""
    _check_difficulty(difficulty_bits)
    window = window_of(time.time() if now is None else now)
    GeoProof(peer_id=peer_id, region=region, window=window, nonce=0)  # validate inputs before working
    prefix = _prefix(peer_id, region, window)
    nonce = start_nonce
    while nonce < 2**64:
        found = _search(prefix, difficulty_bits, nonce, 1 << 16)
        if found is not None:
            return GeoProof(peer_id=peer_id, region=region, window=window, nonce=found)
        nonce += 1 << 16
        if keep_going is not None and not keep_going():
            raise InvalidProofOfWork("search abandoned")
    raise InvalidProofOfWork("nonce space exhausted")  # unreachable at sane difficulty


def verify(
    proof: GeoProof,
    expected_peer_id: str,
    difficulty_bits: int,
    claimed_region: str | None = None,
    now: float | None = None,
) -> None:
    """Raise :class:`InvalidProofOfWork` (saying why) unless ``proof`` is a fresh proof of the
    required difficulty for ``expected_peer_id`` (and ``claimed_region`` if given)."""
    _check_difficulty(difficulty_bits)
    if proof.peer_id != expected_peer_id:
        raise InvalidProofOfWork(f"proof is for peer {proof.peer_id}, announced by {expected_peer_id}")
    if claimed_region is not None and proof.region != claimed_region:
        raise InvalidProofOfWork(f"proof is for region {proof.region!r}, peer claims {claimed_region!r}")
    current = window_of(time.time() if now is None else now)
    if proof.window not in (current, current - 1):
        raise InvalidProofOfWork(f"proof window {proof.window} is not current ({current}) or previous")
    zeros = leading_zero_bits(pow_digest(proof.peer_id, proof.region, proof.window, proof.nonce))
    if zeros < difficulty_bits:
        raise InvalidProofOfWork(f"proof has {zeros} leading zero bits, {difficulty_bits} required")


def is_valid(proof: GeoProof, expected_peer_id: str, difficulty_bits: int, now: float | None = None) -> bool:
    try:
        verify(proof, expected_peer_id, difficulty_bits, now=now)
    except InvalidProofOfWork:
        return False
    return True


def _solve_main(argv: list[str]) -> int:
    """``python -m openhydra.crypto.pow PEER_ID REGION BITS UNIX_TIME``: print the proof as JSON.

    What membership.py runs in a child process, so a node's serving threads never wait on the GIL
    behind the hashing loop. The child lowers its own priority and gives up if its parent dies."""
    peer_id, region, bits, at = argv[0], argv[1], int(argv[2]), float(argv[3])
    os.nice(10)
    parent = os.getppid()
    proof = solve(peer_id, region, bits, now=at, keep_going=lambda: os.getppid() == parent)
    print(proof.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_solve_main(sys.argv[1:]))
