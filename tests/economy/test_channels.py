"""State channels: signed, monotonic updates; 15-minute TTL; 8 per peer; close applies the latest once."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openhydra.crypto.identity import Identity
from openhydra.economy.channels import ChannelUpdate, sign_update
from openhydra.economy.errors import (
    ChannelClosed,
    ChannelLimitReached,
    InsufficientFunds,
    InvalidReceipt,
    InvalidSignature,
    StaleChannelUpdate,
    UnknownChannel,
)
from openhydra.economy.ledger import Ledger
from openhydra.economy.receipts import build_settlement
from openhydra.economy.units import MICRO

from .conftest import FakeClock


@pytest.fixture
def funded(db_url: str, clock: FakeClock, peers: list[Identity]) -> Ledger:
    led = Ledger(db_url, clock=clock)
    led.settle(build_settlement("fund", "m", 100_000, [(peers[0], 1)]))  # payer gets 100 HYDRA
    yield led
    led.close()


def _open(led: Ledger, payer: Identity, payee: Identity, deposit: int = 10 * MICRO) -> str:
    return led.open_channel(payer.peer_id, payer.public_key_bytes, payee.peer_id, deposit).channel_id


def test_pay_through_a_channel(funded: Ledger, peers: list[Identity]) -> None:
    a, b = peers[0], peers[1]
    cid = _open(funded, a, b)
    assert funded.balance(a.peer_id).hydra == 90 * MICRO
    assert funded.balance(a.peer_id).escrow == 10 * MICRO
    for n, amount in enumerate([MICRO, 2 * MICRO, 3 * MICRO], start=1):
        funded.update_channel(sign_update(a, cid, n, amount))
    closed = funded.close_channel(cid)
    assert (closed.status, closed.paid, closed.nonce) == ("closed", 3 * MICRO, 3)
    assert funded.balance(a.peer_id).hydra == 97 * MICRO
    assert funded.balance(b.peer_id).hydra == 3 * MICRO
    assert funded.audit().ok
    with pytest.raises(ChannelClosed):
        funded.close_channel(cid)  # settled once
    with pytest.raises(ChannelClosed):
        funded.update_channel(sign_update(a, cid, 4, 4 * MICRO))


def test_reordered_and_tampered_updates_are_rejected(funded: Ledger, peers: list[Identity]) -> None:
    a, b, c = peers[0], peers[1], peers[2]
    cid = _open(funded, a, b)
    u1, u2 = sign_update(a, cid, 1, MICRO), sign_update(a, cid, 2, 2 * MICRO)
    funded.update_channel(u2)
    with pytest.raises(StaleChannelUpdate):
        funded.update_channel(u1)  # reordered: older nonce after newer
    with pytest.raises(StaleChannelUpdate):
        funded.update_channel(u2)  # replayed
    with pytest.raises(StaleChannelUpdate):
        funded.update_channel(sign_update(a, cid, 3, MICRO))  # newer nonce, smaller amount
    tampered = ChannelUpdate.model_validate({**u2.model_dump(), "nonce": 5, "amount": 9 * MICRO})
    with pytest.raises(InvalidSignature):
        funded.update_channel(tampered)
    with pytest.raises(InvalidSignature):
        funded.update_channel(sign_update(c, cid, 6, 9 * MICRO))  # signed by someone else (payee or not)
    with pytest.raises(InvalidSignature):
        funded.update_channel(sign_update(b, cid, 6, 9 * MICRO))
    with pytest.raises(InvalidReceipt):
        funded.update_channel(sign_update(a, cid, 7, 11 * MICRO))  # more than the deposit
    assert funded.channel(cid).paid == 2 * MICRO  # type: ignore[union-attr]
    with pytest.raises(ValidationError):
        ChannelUpdate.model_validate({**u2.model_dump(), "signature": u2.signature[:-2]})  # truncated
    with pytest.raises(UnknownChannel):
        funded.update_channel(sign_update(a, "0" * 32, 1, 1))


def test_close_applies_only_the_latest_valid_update(funded: Ledger, peers: list[Identity]) -> None:
    a, b = peers[0], peers[1]
    cid = _open(funded, a, b)
    funded.update_channel(sign_update(a, cid, 2, 4 * MICRO))
    closed = funded.close_channel(cid, final=sign_update(a, cid, 1, 9 * MICRO))  # older final: ignored
    assert closed.paid == 4 * MICRO
    cid2 = _open(funded, a, b)
    funded.update_channel(sign_update(a, cid2, 1, MICRO))
    closed = funded.close_channel(cid2, final=sign_update(a, cid2, 2, 5 * MICRO))  # newer final: applied
    assert closed.paid == 5 * MICRO
    assert funded.balance(b.peer_id).hydra == 9 * MICRO
    assert funded.audit().ok


def test_ttl_expiry(funded: Ledger, clock: FakeClock, peers: list[Identity]) -> None:
    a, b = peers[0], peers[1]
    cid = _open(funded, a, b)
    funded.update_channel(sign_update(a, cid, 1, 2 * MICRO))
    clock.advance(899)
    funded.update_channel(sign_update(a, cid, 2, 3 * MICRO))
    clock.advance(1)  # 15 minutes
    with pytest.raises(ChannelClosed):
        funded.update_channel(sign_update(a, cid, 3, 4 * MICRO))
    _open(funded, a, b)  # opening another settles the expired one at its latest update
    assert funded.channel(cid).status == "closed"  # type: ignore[union-attr]
    assert funded.balance(b.peer_id).hydra == 3 * MICRO
    assert funded.audit().ok


def test_at_most_eight_open_channels_per_peer(funded: Ledger, peers: list[Identity]) -> None:
    a, b = peers[0], peers[1]
    ids = [_open(funded, a, b, MICRO) for _ in range(8)]
    with pytest.raises(ChannelLimitReached):
        _open(funded, a, b, MICRO)
    with pytest.raises(ChannelLimitReached):
        _open(funded, a, peers[2], MICRO)  # the payer is at its limit whoever the payee is
    funded.close_channel(ids[0])
    _open(funded, a, b, MICRO)
    assert funded.balance(a.peer_id).open_channels == 8
    assert funded.audit().ok


def test_deposit_needs_funds(funded: Ledger, peers: list[Identity]) -> None:
    with pytest.raises(InsufficientFunds):
        _open(funded, peers[1], peers[0], MICRO)  # peer 1 has no HYDRA
    assert funded.balance(peers[1].peer_id).open_channels == 0
