"""HYDRA state channels: off-chain micro-payments settled on the ledger once.

A payer locks a deposit in escrow when it opens a channel to a payee. It then pays by handing the
payee signed :class:`ChannelUpdate` messages off-ledger: each carries a strictly larger nonce and a
cumulative amount that never goes down and never exceeds the deposit. The payee (or anyone holding
one) may lodge an update with the ledger at any time; the ledger keeps only the newest valid one.
Closing pays the payee the latest amount and refunds the rest of the deposit to the payer, once.

Limits: a channel lives ``channel_ttl_s`` (15 minutes) after opening; after that updates are refused
and the channel is settled at its latest update when it is closed or when either party opens another.
A peer may be party to at most ``max_channels_per_peer`` (8) open channels.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import Session, or_, select

from openhydra.economy.book import Book
from openhydra.economy.errors import (
    ChannelClosed,
    ChannelLimitReached,
    InvalidReceipt,
    InvalidRequest,
    InvalidSignature,
    StaleChannelUpdate,
    UnknownChannel,
)
from openhydra.economy.signing import CHANNEL_DOMAIN, SigningIdentity, canonical, signature_ok
from openhydra.economy.tables import POCKET_HYDRA, Channel

ChannelId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
HexSignature = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]

STATUS_OPEN = "open"
STATUS_CLOSED = "closed"


class ChannelUpdate(BaseModel):
    """A payer's signed promise: "of channel ``channel_id``, ``amount`` micro-HYDRA is now yours"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel_id: ChannelId
    nonce: int = Field(ge=1, le=2**62)
    amount: int = Field(ge=0, le=2**62, description="cumulative micro-HYDRA paid to the payee")
    signature: HexSignature

    def body(self) -> bytes:
        return update_body(self.channel_id, self.nonce, self.amount)


class ChannelView(BaseModel):
    channel_id: str
    payer: str
    payee: str
    deposit: int
    nonce: int
    paid: int
    opened_at: float
    expires_at: float
    status: str

    @classmethod
    def of(cls, ch: Channel) -> ChannelView:
        return cls.model_validate(ch, from_attributes=True)


def update_body(channel_id: str, nonce: int, amount: int) -> bytes:
    return canonical(CHANNEL_DOMAIN, {"channel_id": channel_id, "nonce": nonce, "amount": amount})


def sign_update(payer: SigningIdentity, channel_id: str, nonce: int, amount: int) -> ChannelUpdate:
    signature = payer.sign(update_body(channel_id, nonce, amount)).hex()
    return ChannelUpdate(channel_id=channel_id, nonce=nonce, amount=amount, signature=signature)


# -- ledger operations (inside one Book transaction) -------------------------------------------------
def open_channel(
    book: Book, channel_id: str, payer: str, payer_key: str, payee: str, deposit: int
) -> Channel:
    if payer == payee:
        raise InvalidRequest("a channel needs two different peers")
    if deposit <= 0:
        raise InvalidRequest(f"channel deposit must be positive, got {deposit}")
    settle_expired(book, [payer, payee])
    accounts = book.accounts([payer, payee], {payer: payer_key})
    limit = book.policy.max_channels_per_peer
    for peer in (payer, payee):
        if count_open(book.s, peer) >= limit:
            raise ChannelLimitReached(f"{peer} already has {limit} open channels")
    ch = Channel(
        channel_id=channel_id,
        payer=payer,
        payee=payee,
        payer_key=payer_key,
        deposit=deposit,
        opened_at=book.now,
        expires_at=book.now + book.policy.channel_ttl_s,
    )
    book.debit(accounts[payer], POCKET_HYDRA, deposit, "channel_open", channel_id)
    book.s.add(ch)
    book.escrow(ch, deposit, "channel_open")
    return ch


def count_open(session: Session, peer: str) -> int:
    rows = session.exec(
        select(Channel.channel_id).where(
            Channel.status == STATUS_OPEN, or_(Channel.payer == peer, Channel.payee == peer)
        )
    ).all()
    return len(rows)


def _locked_open(book: Book, channel_id: str) -> Channel:
    ch = book.channel(channel_id)
    if ch is None:
        raise UnknownChannel(f"no channel {channel_id}")
    if ch.status != STATUS_OPEN:
        raise ChannelClosed(f"channel {channel_id} is {ch.status}")
    return ch


def _check(ch: Channel, update: ChannelUpdate) -> None:
    if not signature_ok(bytes.fromhex(ch.payer_key), bytes.fromhex(update.signature), update.body()):
        raise InvalidSignature(f"channel update for {ch.channel_id} is not signed by the payer")
    if update.amount > ch.deposit:
        raise InvalidReceipt(f"update pays {update.amount}, more than the deposit {ch.deposit}")
    if update.nonce <= ch.nonce or update.amount < ch.paid:
        raise StaleChannelUpdate(
            f"update nonce {update.nonce} / amount {update.amount} does not advance "
            f"nonce {ch.nonce} / amount {ch.paid}"
        )


def apply_update(book: Book, update: ChannelUpdate) -> Channel:
    ch = _locked_open(book, update.channel_id)
    if book.now >= ch.expires_at:
        raise ChannelClosed(f"channel {ch.channel_id} expired; close it to settle")
    _check(ch, update)
    ch.nonce, ch.paid, ch.signature = update.nonce, update.amount, update.signature
    return ch


def close_channel(book: Book, channel_id: str, final: ChannelUpdate | None = None) -> Channel:
    """Settle at the newest valid update: ``final`` if it advances the stored one, else the stored one."""
    ch = _locked_open(book, channel_id)
    if final is not None:
        if final.channel_id != channel_id:
            raise InvalidReceipt("the final update belongs to another channel")
        if final.nonce > ch.nonce:
            _check(ch, final)
            ch.nonce, ch.paid, ch.signature = final.nonce, final.amount, final.signature
        elif not signature_ok(bytes.fromhex(ch.payer_key), bytes.fromhex(final.signature), final.body()):
            raise InvalidSignature(f"channel update for {channel_id} is not signed by the payer")
    _settle(book, ch)
    return ch


def _settle(book: Book, ch: Channel) -> None:
    accounts = book.accounts([ch.payer, ch.payee])
    book.escrow(ch, -ch.deposit, "channel_close")
    book.credit(accounts[ch.payee], POCKET_HYDRA, ch.paid, "channel_pay", ch.channel_id)
    book.credit(accounts[ch.payer], POCKET_HYDRA, ch.deposit - ch.paid, "channel_refund", ch.channel_id)
    ch.status, ch.closed_at = STATUS_CLOSED, book.now


def settle_expired(book: Book, peers: list[str]) -> int:
    """Close every expired open channel that any of ``peers`` is party to; returns how many."""
    ids = book.s.exec(
        select(Channel.channel_id)
        .where(
            Channel.status == STATUS_OPEN,
            Channel.expires_at <= book.now,
            or_(Channel.payer.in_(peers), Channel.payee.in_(peers)),  # type: ignore[attr-defined]
        )
        .order_by(Channel.channel_id)
    ).all()
    for channel_id in ids:
        _settle(book, _locked_open(book, channel_id))
    return len(ids)
