"""The ledger's tables (sqlmodel), identical on SQLite and PostgreSQL.

``econ_journal`` is the append-only record: every change to any balance is one row there, and
:meth:`Ledger.audit` recomputes every balance from it. The other tables are materialized views of the
journal kept in the same transaction (fast reads, and CHECK constraints that make a negative balance
impossible even if the code had a bug) plus the at-most-once keys for receipts.

Amounts are BIGINT micro-units (see units.py). Timestamps are float seconds since the epoch.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Index
from sqlmodel import Field, SQLModel

ASSET_CREDIT = "credit"
ASSET_HYDRA = "hydra"

# Pockets a holder can have; each belongs to one asset.
POCKET_CREDITS = "credits"
POCKET_HYDRA = "hydra"
POCKET_STAKE = "stake"
POCKET_ESCROW = "escrow"  # HYDRA locked in a state channel; the holder is "channel:<id>"
POCKET_ASSET = {
    POCKET_CREDITS: ASSET_CREDIT,
    POCKET_HYDRA: ASSET_HYDRA,
    POCKET_STAKE: ASSET_HYDRA,
    POCKET_ESCROW: ASSET_HYDRA,
}


class Account(SQLModel, table=True):
    __tablename__ = "econ_account"
    __table_args__ = (
        CheckConstraint("credits >= 0", name="ck_account_credits"),
        CheckConstraint("hydra >= 0", name="ck_account_hydra"),
        CheckConstraint("stake >= 0", name="ck_account_stake"),
    )

    peer_id: str = Field(primary_key=True, max_length=128)
    public_key: str | None = Field(default=None, max_length=64)
    credits: int = Field(default=0, sa_type=BigInteger)
    credits_at: float = Field(default=0.0, description="when decay was last applied to credits")
    hydra: int = Field(default=0, sa_type=BigInteger)
    stake: int = Field(default=0, sa_type=BigInteger)


class Supply(SQLModel, table=True):
    __tablename__ = "econ_supply"
    __table_args__ = (CheckConstraint("burned <= minted", name="ck_supply_nonnegative"),)

    asset: str = Field(primary_key=True, max_length=16)
    minted: int = Field(default=0, sa_type=BigInteger)
    burned: int = Field(default=0, sa_type=BigInteger)


class JournalEntry(SQLModel, table=True):
    __tablename__ = "econ_journal"
    __table_args__ = (Index("ix_journal_holder", "holder", "pocket"),)

    id: int | None = Field(default=None, primary_key=True)
    ts: float
    op: str = Field(max_length=32)
    holder: str = Field(max_length=160)
    pocket: str = Field(max_length=16)
    delta: int = Field(sa_type=BigInteger)
    ref: str = Field(default="", max_length=256)


class Settlement(SQLModel, table=True):
    """One applied settlement. Both keys are unique: a request is paid once, a receipt used once."""

    __tablename__ = "econ_settlement"

    request_id: str = Field(primary_key=True, max_length=128)
    receipt_id: str = Field(unique=True, max_length=64)
    model_id: str = Field(max_length=128)
    tokens_served: int = Field(sa_type=BigInteger)
    credits: int = Field(sa_type=BigInteger)
    hydra: int = Field(sa_type=BigInteger)
    ts: float


class ReceiptShare(SQLModel, table=True):
    """Each peer's signed share of a settlement, kept so the payout can be re-verified later."""

    __tablename__ = "econ_receipt_share"

    request_id: str = Field(primary_key=True, max_length=128)
    peer_id: str = Field(primary_key=True, max_length=128)
    layers_served: int
    credits: int = Field(sa_type=BigInteger)
    hydra: int = Field(sa_type=BigInteger)
    signature: str = Field(max_length=128)


class Channel(SQLModel, table=True):
    __tablename__ = "econ_channel"
    __table_args__ = (
        CheckConstraint("paid >= 0 AND paid <= deposit", name="ck_channel_paid"),
        Index("ix_channel_payer", "payer", "status"),
        Index("ix_channel_payee", "payee", "status"),
    )

    channel_id: str = Field(primary_key=True, max_length=64)
    payer: str = Field(max_length=128)
    payee: str = Field(max_length=128)
    payer_key: str = Field(max_length=64)
    deposit: int = Field(sa_type=BigInteger)
    nonce: int = Field(default=0, sa_type=BigInteger)
    paid: int = Field(default=0, sa_type=BigInteger)
    signature: str = Field(default="", max_length=128)
    opened_at: float
    expires_at: float
    status: str = Field(default="open", max_length=16)
    closed_at: float | None = None


def all_tables() -> list[type[SQLModel]]:
    return [Account, Supply, JournalEntry, Settlement, ReceiptShare, Channel]
