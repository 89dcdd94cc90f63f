"""One write transaction's bookkeeping: row locks, lazy decay, journal rows, supply counters.

Every balance change goes through :meth:`Book.credit` / :meth:`Book.debit`, which update the
materialized pocket *and* append the matching journal row, so the two can never disagree. Lock order
on PostgreSQL is: settlement key, channel rows, accounts (sorted by id), supply rows last.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel, select

from openhydra.economy.errors import InsufficientFunds, InvalidReceipt
from openhydra.economy.policy import LedgerPolicy
from openhydra.economy.tables import (
    POCKET_ASSET,
    POCKET_CREDITS,
    POCKET_ESCROW,
    Account,
    Channel,
    JournalEntry,
    Supply,
)
from openhydra.economy.units import decay_rebased, decay_step


class Book:
    def __init__(self, session: Session, policy: LedgerPolicy, now: float) -> None:
        self.s = session
        self.policy = policy
        self.now = now
        self.dialect = session.get_bind().dialect.name
        self._pending_burns: dict[str, int] = {}
        self._journal: list[dict[str, Any]] = []  # written in one executemany by finish()

    # -- rows --------------------------------------------------------------------------------------
    def insert_if_absent(self, table: type[SQLModel], values: dict[str, Any]) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING; True when this transaction inserted the row."""
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = insert(table).values(**values).on_conflict_do_nothing()  # type: ignore[arg-type]
        # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT through SQLAlchemy.
        pk = next(iter(table.__table__.primary_key.columns))  # type: ignore[attr-defined]
        return self.s.exec(stmt.returning(pk)).first() is not None  # type: ignore[call-overload]

    def account(self, peer_id: str, public_key: str | None = None) -> Account:
        """Lock (creating if needed) an account and bring its credits up to date with decay."""
        return self.accounts([peer_id], {peer_id: public_key} if public_key else None)[peer_id]

    def accounts(self, peer_ids: list[str], keys: dict[str, str] | None = None) -> dict[str, Account]:
        """Lock several accounts in one statement, in id order (the lock order), creating missing ones."""
        keys = keys or {}
        wanted = sorted(set(peer_ids))
        found = self._lock_rows(wanted)
        missing = [p for p in wanted if p not in found]
        if missing:
            for p in missing:
                self.insert_if_absent(
                    Account, {"peer_id": p, "public_key": keys.get(p), "credits_at": self.now}
                )
            found.update(self._lock_rows(missing))
        for p in wanted:
            acct = found[p]
            key = keys.get(p)
            if key is not None:
                if acct.public_key is None:
                    acct.public_key = key
                elif acct.public_key != key:
                    raise InvalidReceipt(f"{p} is already bound to a different public key")
            self._decay(acct)
        return {p: found[p] for p in wanted}

    def _lock_rows(self, peer_ids: list[str]) -> dict[str, Account]:
        rows = self.s.exec(
            select(Account)
            .where(Account.peer_id.in_(peer_ids))  # type: ignore[attr-defined]
            .order_by(Account.peer_id)
            .with_for_update()
        ).all()
        return {a.peer_id: a for a in rows}

    def peek_account(self, peer_id: str) -> Account | None:
        return self.s.get(Account, peer_id)

    def channel(self, channel_id: str) -> Channel | None:
        return self.s.exec(select(Channel).where(Channel.channel_id == channel_id).with_for_update()).first()

    def supply(self, asset: str) -> Supply:
        return self.s.exec(select(Supply).where(Supply.asset == asset).with_for_update()).one()

    # -- decay -------------------------------------------------------------------------------------
    def _decay(self, acct: Account) -> None:
        """Apply the decay since ``credits_at`` in whole units; the clock moves on only by the time those units
        account for (units.decay_step), so what is under a unit is carried, not lost."""
        if acct.credits == 0:
            acct.credits_at = self.now
            return
        left, applied_s = decay_step(acct.credits, self.policy.decay_per_day, self.now - acct.credits_at)
        if self.now > acct.credits_at:
            acct.credits_at = min(self.now, acct.credits_at + applied_s)
        if left < acct.credits:
            lost = acct.credits - left
            self._post("decay", acct.peer_id, POCKET_CREDITS, -lost, "")
            acct.credits = left
            self.burn(POCKET_ASSET[POCKET_CREDITS], lost)

    # -- moves -------------------------------------------------------------------------------------
    def _post(self, op: str, holder: str, pocket: str, delta: int, ref: str) -> None:
        self._journal.append(
            {"ts": self.now, "op": op, "holder": holder, "pocket": pocket, "delta": delta, "ref": ref}
        )

    def credit(self, acct: Account, pocket: str, amount: int, op: str, ref: str = "") -> None:
        if amount < 0:
            raise ValueError(f"credit of a negative amount {amount}")
        if amount == 0:
            return
        self._rebase(acct, pocket, getattr(acct, pocket) + amount)
        setattr(acct, pocket, getattr(acct, pocket) + amount)
        self._post(op, acct.peer_id, pocket, amount, ref)

    def debit(self, acct: Account, pocket: str, amount: int, op: str, ref: str = "") -> None:
        if amount < 0:
            raise ValueError(f"debit of a negative amount {amount}")
        have = getattr(acct, pocket)
        if amount > have:
            raise InsufficientFunds(acct.peer_id, pocket, have, amount)
        if amount == 0:
            return
        self._rebase(acct, pocket, have - amount)
        setattr(acct, pocket, have - amount)
        self._post(op, acct.peer_id, pocket, -amount, ref)

    def _rebase(self, acct: Account, pocket: str, new_balance: int) -> None:
        """Carry the credits' decay owed but under a unit over to their new balance (units.decay_rebased)."""
        if pocket != POCKET_CREDITS:
            return
        carried = decay_rebased(acct.credits, new_balance, self.policy.decay_per_day, self.now - acct.credits_at)
        acct.credits_at = self.now - carried

    def escrow(self, channel: Channel, delta: int, op: str) -> None:
        self._post(op, f"channel:{channel.channel_id}", POCKET_ESCROW, delta, channel.channel_id)

    # -- supply ------------------------------------------------------------------------------------
    def mint(self, asset: str, amount: int, cap: int | None = None) -> int:
        """Mint up to ``amount``; with a cap, only what fits under it. Returns what was minted."""
        if amount <= 0:
            return 0
        row = self.supply(asset)
        if cap is not None:
            amount = max(0, min(amount, cap - (row.minted - row.burned)))
        row.minted += amount
        return amount

    def burn(self, asset: str, amount: int) -> None:
        """Count a burn; the supply row is updated in :meth:`finish` so it is locked last."""
        if amount > 0:
            self._pending_burns[asset] = self._pending_burns.get(asset, 0) + amount

    def finish(self) -> None:
        """Write the journal rows and the burns; call once, last, inside the transaction."""
        for asset, amount in sorted(self._pending_burns.items()):
            self.supply(asset).burned += amount
        self._pending_burns.clear()
        if self._journal:
            self.s.execute(insert(JournalEntry), self._journal)  # type: ignore[call-overload]
            self._journal = []
