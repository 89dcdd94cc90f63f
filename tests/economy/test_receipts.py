"""Tampered, reordered, truncated or replayed receipts are rejected and change nothing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openhydra.crypto.identity import Identity
from openhydra.economy.errors import InvalidReceipt, InvalidSignature, ReceiptAlreadyApplied
from openhydra.economy.ledger import Ledger
from openhydra.economy.receipts import ServedShare, SettlementRequest, build_settlement

from .conftest import FakeClock


@pytest.fixture
def ledger(db_url: str, clock: FakeClock) -> Ledger:
    led = Ledger(db_url, clock=clock)  # a fixed clock: balances compared across calls do not decay
    yield led
    led.close()


def _good(peers: list[Identity], request_id: str = "req-1") -> SettlementRequest:
    return build_settlement(request_id, "smollm2-135m", 2000, [(peers[0], 10), (peers[1], 20)])


def _edit(req: SettlementRequest, **changes: object) -> SettlementRequest:
    return SettlementRequest.model_validate({**req.model_dump(), **changes})


def _edit_share(req: SettlementRequest, i: int, **changes: object) -> SettlementRequest:
    shares = [s.model_dump() for s in req.shares]
    shares[i].update(changes)
    return _edit(req, shares=shares)


def _unchanged(ledger: Ledger) -> None:
    t = ledger.totals()
    assert (t.settlements, t.credits_minted, t.hydra_minted) == (0, 0, 0)
    assert ledger.journal_rows() == 0


def test_good_receipt_verifies(peers: list[Identity]) -> None:
    req = _good(peers)
    req.verify()
    assert req.receipt_id == _good(peers).receipt_id  # deterministic id
    assert len(req.receipt_id) == 64


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: _edit(r, tokens_served=r.tokens_served + 1),
        lambda r: _edit(r, model_id="other-model"),
        lambda r: _edit(r, request_id="req-other"),
        lambda r: _edit_share(r, 0, layers_served=11),
        lambda r: _edit(r, shares=list(reversed([s.model_dump() for s in r.shares]))),  # reordered
        lambda r: _edit(r, shares=[r.shares[0].model_dump()]),  # truncated pipeline
    ],
    ids=["tokens", "model", "request", "layers", "reordered", "truncated"],
)
def test_tampered_receipt_is_rejected(ledger: Ledger, peers: list[Identity], tamper) -> None:  # type: ignore[no-untyped-def]
    bad = tamper(_good(peers))
    with pytest.raises(InvalidSignature):
        ledger.settle(bad)
    _unchanged(ledger)


def test_padded_pipeline_is_rejected(ledger: Ledger, peers: list[Identity]) -> None:
    good = _good(peers)
    extra = build_settlement("req-1", "smollm2-135m", 2000, [(peers[2], 5)]).shares[0]
    with pytest.raises(InvalidSignature):
        ledger.settle(_edit(good, shares=[*[s.model_dump() for s in good.shares], extra.model_dump()]))
    _unchanged(ledger)


def test_key_that_is_not_the_peers_is_rejected(ledger: Ledger, peers: list[Identity]) -> None:
    # peer 2 signs the whole thing itself but claims peer 0's id: the key does not derive that id.
    forged = build_settlement("req-1", "m", 2000, [(peers[2], 10), (peers[1], 20)])
    shares = [s.model_dump() for s in forged.shares]
    shares[0]["peer_id"] = peers[0].peer_id
    with pytest.raises(InvalidReceipt):
        ledger.settle(_edit(forged, shares=shares))
    _unchanged(ledger)


def test_signature_swapped_between_peers_is_rejected(ledger: Ledger, peers: list[Identity]) -> None:
    good = _good(peers)
    swapped = _edit_share(
        _edit_share(good, 0, signature=good.shares[1].signature), 1, signature=good.shares[0].signature
    )
    with pytest.raises(InvalidSignature):
        ledger.settle(swapped)
    _unchanged(ledger)


@pytest.mark.parametrize(
    "field,value", [("signature", "ab" * 63), ("public_key", "cd" * 31), ("signature", "")]
)
def test_truncated_fields_fail_validation(peers: list[Identity], field: str, value: str) -> None:
    share = _good(peers).shares[0].model_dump()
    share[field] = value
    with pytest.raises(ValidationError):
        ServedShare.model_validate(share)


def test_replay_is_applied_once(ledger: Ledger, peers: list[Identity]) -> None:
    req = _good(peers)
    first = ledger.settle(req)
    assert sum(first.credits.values()) == 2_000_000
    before = ledger.balance(peers[0].peer_id)
    with pytest.raises(ReceiptAlreadyApplied):
        ledger.settle(req)
    # Same request id, freshly signed for more tokens: still the same request, still refused.
    with pytest.raises(ReceiptAlreadyApplied):
        ledger.settle(build_settlement("req-1", "smollm2-135m", 9000, [(peers[0], 10), (peers[1], 20)]))
    assert ledger.balance(peers[0].peer_id) == before
    assert ledger.totals().settlements == 1
    assert ledger.audit().ok


def test_duplicate_peer_in_pipeline_is_invalid(peers: list[Identity]) -> None:
    with pytest.raises(ValidationError):
        build_settlement("r", "m", 10, [(peers[0], 1), (peers[0], 2)])
