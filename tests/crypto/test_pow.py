"""Geo-challenge proof of work: honest proofs verify; stale, weak, re-bound or forged ones do not."""

from __future__ import annotations

import pytest

from openhydra.crypto.errors import InvalidProofOfWork
from openhydra.crypto.pow import GeoProof, leading_zero_bits, pow_digest, solve, verify, window_of

PEER = "12D3KooWHonestPeer"
NOW = 1_800_000_123.0
BITS = 12


@pytest.fixture(scope="module")
def proof() -> GeoProof:
    return solve(PEER, "eu-west", BITS, now=NOW)


def test_honest_proof_verifies(proof: GeoProof) -> None:
    assert proof.window == window_of(NOW) == 3_000_000
    assert leading_zero_bits(pow_digest(PEER, "eu-west", proof.window, proof.nonce)) >= BITS
    verify(proof, PEER, BITS, claimed_region="eu-west", now=NOW)
    verify(proof, PEER, BITS, now=NOW + 600)  # previous window still accepted
    assert GeoProof.model_validate_json(proof.model_dump_json()) == proof


def test_stale_and_future_proofs_rejected(proof: GeoProof) -> None:
    with pytest.raises(InvalidProofOfWork, match="window"):
        verify(proof, PEER, BITS, now=NOW + 1200)
    with pytest.raises(InvalidProofOfWork, match="window"):
        verify(proof, PEER, BITS, now=NOW - 600)


def test_proof_is_bound_to_peer_and_region(proof: GeoProof) -> None:
    with pytest.raises(InvalidProofOfWork, match="announced by"):
        verify(proof, "12D3KooWSybil", BITS, now=NOW)
    with pytest.raises(InvalidProofOfWork, match="region"):
        verify(proof, PEER, BITS, claimed_region="us-east", now=NOW)
    # relabelling the proof itself breaks the work (overwhelmingly likely at 12 bits; check the digest)
    relabelled = proof.model_copy(update={"region": "us-east"})
    zeros = leading_zero_bits(pow_digest(PEER, "us-east", proof.window, proof.nonce))
    if zeros < BITS:
        with pytest.raises(InvalidProofOfWork, match="leading zero bits"):
            verify(relabelled, PEER, BITS, now=NOW)
    stolen = proof.model_copy(update={"peer_id": "12D3KooWSybil"})
    if leading_zero_bits(pow_digest("12D3KooWSybil", "eu-west", proof.window, proof.nonce)) < BITS:
        with pytest.raises(InvalidProofOfWork):
            verify(stolen, "12D3KooWSybil", BITS, now=NOW)


def test_forged_and_too_weak_proofs_rejected(proof: GeoProof) -> None:
    # a nonce that fails the target: search for one deterministically
    bad_nonce = next(n for n in range(100) if leading_zero_bits(pow_digest(PEER, "eu-west", proof.window, n)) < BITS)
    with pytest.raises(InvalidProofOfWork, match="leading zero bits"):
        verify(proof.model_copy(update={"nonce": bad_nonce}), PEER, BITS, now=NOW)
    weak = solve(PEER, "eu-west", 4, now=NOW)
    if leading_zero_bits(pow_digest(PEER, "eu-west", weak.window, weak.nonce)) < 16:
        with pytest.raises(InvalidProofOfWork):
            verify(weak, PEER, 16, now=NOW)


def test_difficulty_scales_work() -> None:
    # expected 2**bits hashes: count nonces tried over several ids at 8 bits (mean 256)
    tries = [solve(f"peer-{i}", "ap-south", 8, now=NOW).nonce + 1 for i in range(60)]
    mean = sum(tries) / len(tries)
    assert 100 < mean < 600


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        solve(PEER, "Not A Region!", 4, now=NOW)
    with pytest.raises(ValueError):
        solve(PEER, "eu", 65, now=NOW)
    assert solve(PEER, "eu", 0, now=NOW).nonce == 0
