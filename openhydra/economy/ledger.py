"""The ledger: barter credits and the HYDRA token on one append-only journal (SQLite or PostgreSQL).

Every public method is one database transaction: it either happens completely or not at all, and a
raised :class:`~openhydra.economy.errors.LedgerError` means nothing changed. See docs/economy.md.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import func, update
from sqlmodel import Session, or_, select

from openhydra.economy import channels as ch_ops
from openhydra.economy.book import Book
from openhydra.economy.channels import ChannelUpdate, ChannelView
from openhydra.economy.errors import EconomyDisabled, InvalidReceipt, InvalidRequest, ReceiptAlreadyApplied
from openhydra.economy.policy import LedgerPolicy
from openhydra.economy.receipts import SettlementRequest
from openhydra.economy.store import Store
from openhydra.economy.tables import (
    ASSET_CREDIT,
    ASSET_HYDRA,
    POCKET_CREDITS,
    POCKET_HYDRA,
    POCKET_STAKE,
    Account,
    Channel,
    JournalEntry,
    ReceiptShare,
    Settlement,
    Supply,
)
from openhydra.economy.units import credits_for_tokens, decayed, split_by_weight
from openhydra.economy.views import AccountView, AuditReport, SettlementResult, SupplyView

T = TypeVar("T")


class Ledger:
    def __init__(
        self,
        db_url: str,
        policy: LedgerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sqlite_synchronous: str = "FULL",
        busy_timeout_s: float = 5.0,
        retry_budget_s: float = 60.0,
    ) -> None:
        self.policy = policy or LedgerPolicy()
        self.clock = clock
        self.store = Store(
            db_url,
            sqlite_synchronous=sqlite_synchronous,
            busy_timeout_s=busy_timeout_s,
            retry_budget_s=retry_budget_s,
        )

    @property
    def backend(self) -> str:
        return self.store.backend

    def _write(self, fn: Callable[[Book], T]) -> T:
        now = self.clock()

        def tx(session: Session) -> T:
            book = Book(session, self.policy, now)
            result = fn(book)
            book.finish()
            return result

        return self.store.run(tx)

    def _read(self, fn: Callable[[Session], T]) -> T:
        return self.store.run(fn, write=False)

    def _need_hydra(self) -> None:
        if not self.policy.hydra_enabled:
            raise EconomyDisabled("the HYDRA token is off in this economy (economy=barter)")

    # -- barter credits ----------------------------------------------------------------------------
    def settle(self, req: SettlementRequest, only: str | None = None) -> SettlementResult:
        """Verify a signed settlement and pay every serving peer, at most once per request/receipt.

        ``only``: pay that peer's share alone (a hop applying the receipt of a session it served: it saw its own
        work, not the other hops'; crediting them here let a stranger's coordinator name made-up peers in a receipt
        and have this ledger mint them credits and HYDRA, which this node's coordinator then honoured as stake)."""
        req.verify()
        receipt_id = req.receipt_id
        weights = [s.layers_served for s in req.shares]
        credit_total = credits_for_tokens(req.tokens_served, self.policy.tokens_per_credit)
        if req.model_layers is not None:  # a part-pipeline receipt (privacy=onion): its layers' share only
            credit_total = credit_total * min(sum(weights), req.model_layers) // req.model_layers
        credit_parts = split_by_weight(credit_total, weights)
        paid = [i for i, s in enumerate(req.shares) if only is None or s.peer_id == only]  # the shares paid here
        if not paid:
            raise InvalidReceipt(f"receipt {receipt_id} has no share of {only}")
        credits_paid = sum(credit_parts[i] for i in paid)

        def tx(book: Book) -> SettlementResult:
            inserted = book.insert_if_absent(
                Settlement,
                {
                    "request_id": req.request_id,
                    "receipt_id": receipt_id,
                    "model_id": req.model_id,
                    "tokens_served": req.tokens_served,
                    "credits": credits_paid,
                    "hydra": 0,
                    "ts": book.now,
                },
            )
            if not inserted:
                raise ReceiptAlreadyApplied(
                    f"request {req.request_id} (receipt {receipt_id}) already settled"
                )
            keys = {req.shares[i].peer_id: req.shares[i].public_key for i in paid}
            accounts = book.accounts(list(keys), keys)
            hydra = dict.fromkeys(paid, 0)
            if self.policy.hydra_enabled:
                want = split_by_weight(int(credit_total * self.policy.hydra_per_credit), weights)
                minted = book.mint(ASSET_HYDRA, sum(want[i] for i in paid), cap=self.policy.supply_cap)
                hydra = dict(zip(paid, split_by_weight(minted, [weights[i] for i in paid]), strict=True))
            book.mint(ASSET_CREDIT, credits_paid)
            for i in paid:
                share = req.shares[i]
                acct = accounts[share.peer_id]
                book.credit(acct, POCKET_CREDITS, credit_parts[i], "earn", req.request_id)
                book.credit(acct, POCKET_HYDRA, hydra[i], "mint", req.request_id)
                book.s.add(
                    ReceiptShare(
                        request_id=req.request_id,
                        peer_id=share.peer_id,
                        layers_served=share.layers_served,
                        credits=credit_parts[i],
                        hydra=hydra[i],
                        signature=share.signature,
                    )
                )
            book.s.exec(
                update(Settlement)
                .where(Settlement.request_id == req.request_id)  # type: ignore[arg-type]
                .values(hydra=sum(hydra.values()))
            )
            return SettlementResult(
                request_id=req.request_id,
                receipt_id=receipt_id,
                credits={req.shares[i].peer_id: credit_parts[i] for i in paid},
                hydra={req.shares[i].peer_id: hydra[i] for i in paid},
            )

        return self._write(tx)

    def spend_credits(self, peer_id: str, amount: int, ref: str = "") -> None:
        """Use credits (priority for this peer's own requests): they are burned."""
        _positive(amount)

        def tx(book: Book) -> None:
            book.debit(book.account(peer_id), POCKET_CREDITS, amount, "spend", ref)
            book.burn(ASSET_CREDIT, amount)

        self._write(tx)

    def transfer_credits(self, src: str, dst: str, amount: int, ref: str = "") -> None:
        self._transfer(POCKET_CREDITS, src, dst, amount, ref)

    def _transfer(self, pocket: str, src: str, dst: str, amount: int, ref: str) -> None:
        _positive(amount)
        if src == dst:
            raise InvalidRequest("transfer to the same account")

        def tx(book: Book) -> None:
            accounts = book.accounts([src, dst])
            book.debit(accounts[src], pocket, amount, "transfer", ref or dst)
            book.credit(accounts[dst], pocket, amount, "transfer", ref or src)

        self._write(tx)

    # -- HYDRA -------------------------------------------------------------------------------------
    def transfer_hydra(self, src: str, dst: str, amount: int, ref: str = "") -> None:
        self._need_hydra()
        self._transfer(POCKET_HYDRA, src, dst, amount, ref)

    def burn_hydra(self, peer_id: str, amount: int, reason: str = "priority") -> None:
        """Burn on use (priority access): the tokens leave the supply, making room for new mints."""
        self._need_hydra()
        _positive(amount)

        def tx(book: Book) -> None:
            book.debit(book.account(peer_id), POCKET_HYDRA, amount, "burn", reason)
            book.burn(ASSET_HYDRA, amount)

        self._write(tx)

    def stake(self, peer_id: str, amount: int) -> int:
        return self._move(peer_id, POCKET_HYDRA, POCKET_STAKE, amount, "stake")

    def unstake(self, peer_id: str, amount: int) -> int:
        return self._move(peer_id, POCKET_STAKE, POCKET_HYDRA, amount, "unstake")

    def _move(self, peer_id: str, src: str, dst: str, amount: int, op: str) -> int:
        self._need_hydra()
        _positive(amount)

        def tx(book: Book) -> int:
            acct = book.account(peer_id)
            book.debit(acct, src, amount, op)
            book.credit(acct, dst, amount, op)
            return acct.stake

        return self._write(tx)

    def slash(self, peer_id: str, amount: int, reason: str) -> int:
        """Burn up to ``amount`` of a peer's stake (a failed audit); returns what was slashed."""
        self._need_hydra()
        _positive(amount)

        def tx(book: Book) -> int:
            acct = book.account(peer_id)
            taken = min(amount, acct.stake)
            book.debit(acct, POCKET_STAKE, taken, "slash", reason[:256])
            book.burn(ASSET_HYDRA, taken)
            return taken

        return self._write(tx)

    def stake_of(self, peer_id: str) -> int:
        acct = self._read(lambda s: s.get(Account, peer_id))
        return acct.stake if acct else 0

    def hold_stake(self, peer_id: str, public_key_hex: str, target: int, may_release: bool) -> int | None:
        """Hold ``min(target, its HYDRA + stake here)`` of another peer's HYDRA in this ledger as its stake (what
        it announced: economy/remote_stake.py); lower only if ``may_release``. Returns its stake here, or None
        when this ledger has no account of that peer under that key (it earned nothing here: nothing to hold)."""
        self._need_hydra()

        def plan(acct: Account | None) -> int | None:
            """How much stake moves (+ held, - released), None: not this peer's key; 0: nothing to do."""
            if acct is None or acct.public_key != public_key_hex:
                return None
            want = min(max(target, 0), acct.hydra + acct.stake)
            if want < acct.stake and not may_release:
                return 0
            return want - acct.stake

        peek = self._read(lambda s: s.get(Account, peer_id))
        move = plan(peek)
        if move is None:
            return None
        if move == 0:
            return peek.stake  # the common case (every refresh): no write

        def tx(book: Book) -> int | None:
            acct = book.account(peer_id)
            change = plan(acct)
            if change is None:
                return None
            if change > 0:
                book.debit(acct, POCKET_HYDRA, change, "stake", "announced")
                book.credit(acct, POCKET_STAKE, change, "stake", "announced")
            elif change < 0:
                book.debit(acct, POCKET_STAKE, -change, "unstake", "announced")
                book.credit(acct, POCKET_HYDRA, -change, "unstake", "announced")
            return acct.stake

        return self._write(tx)

    # -- state channels ----------------------------------------------------------------------------
    def open_channel(self, payer: str, payer_key: bytes, payee: str, deposit: int) -> ChannelView:
        self._need_hydra()
        channel_id = secrets.token_hex(16)
        return self._write(
            lambda b: ChannelView.of(
                ch_ops.open_channel(b, channel_id, payer, payer_key.hex(), payee, deposit)
            )
        )

    def update_channel(self, update: ChannelUpdate) -> ChannelView:
        self._need_hydra()
        return self._write(lambda b: ChannelView.of(ch_ops.apply_update(b, update)))

    def close_channel(self, channel_id: str, final: ChannelUpdate | None = None) -> ChannelView:
        self._need_hydra()
        return self._write(lambda b: ChannelView.of(ch_ops.close_channel(b, channel_id, final)))

    def settle_expired_channels(self, peer_ids: list[str]) -> int:
        return self._write(lambda b: ch_ops.settle_expired(b, peer_ids))

    def channel(self, channel_id: str) -> ChannelView | None:
        row = self._read(lambda s: s.get(Channel, channel_id))
        return ChannelView.of(row) if row else None

    # -- reads -------------------------------------------------------------------------------------
    def balance(self, peer_id: str) -> AccountView:
        now = self.clock()

        def read(s: Session) -> AccountView:
            acct = s.get(Account, peer_id)
            open_rows = s.exec(
                select(Channel.payer, Channel.deposit).where(
                    Channel.status == ch_ops.STATUS_OPEN,
                    or_(Channel.payer == peer_id, Channel.payee == peer_id),
                )
            ).all()
            n_open = len(open_rows)
            escrow = sum(deposit for payer, deposit in open_rows if payer == peer_id)
            if acct is None:
                return AccountView(
                    peer_id=peer_id, credits=0, hydra=0, stake=0, escrow=escrow, open_channels=n_open
                )
            credits = decayed(acct.credits, self.policy.decay_per_day, now - acct.credits_at)
            return AccountView(
                peer_id=peer_id,
                credits=credits,
                hydra=acct.hydra,
                stake=acct.stake,
                escrow=escrow,
                open_channels=n_open,
            )

        return self._read(read)

    def totals(self) -> SupplyView:
        def read(s: Session) -> SupplyView:
            credit, hydra = s.get(Supply, ASSET_CREDIT), s.get(Supply, ASSET_HYDRA)
            assert credit is not None and hydra is not None  # created with the schema
            staked = s.exec(select(func.coalesce(func.sum(Account.stake), 0))).one()
            n = s.exec(select(func.count()).select_from(Settlement)).one()
            return SupplyView(
                credits_minted=credit.minted,
                credits_burned=credit.burned,
                hydra_minted=hydra.minted,
                hydra_burned=hydra.burned,
                hydra_cap=self.policy.supply_cap,
                hydra_staked=int(staked),
                settlements=int(n),
            )

        return self._read(read)

    def audit(self) -> AuditReport:
        from openhydra.economy.audit import audit_session

        return self._read(lambda s: audit_session(s, self.policy.supply_cap))

    def integrity_check(self) -> str:
        return self.store.integrity_check()

    def journal_rows(self) -> int:
        return int(self._read(lambda s: s.exec(select(func.count()).select_from(JournalEntry)).one()))

    def close(self) -> None:
        self.store.dispose()


def _positive(amount: int) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise InvalidRequest(f"amount must be a positive integer of micro-units, got {amount!r}")
