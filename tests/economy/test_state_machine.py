"""Random operation sequences against a model: the ledger's invariants hold after every step.

Rules: earn (settle a signed receipt), replay a receipt, spend / transfer credits, burn / transfer HYDRA,
stake, unstake, slash, open / update / close a channel (including stale and tampered updates), let time
pass (decay, channel expiry), and restart the process (close and reopen the database).
After every step: the audit passes (each balance equals its journal, no balance below zero, sum of
balances == minted - burned per asset, HYDRA supply <= cap), HYDRA balances, stakes and channels equal
the model's exactly, and no receipt has been applied twice.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from openhydra.crypto.identity import Identity
from openhydra.economy.channels import ChannelUpdate, sign_update
from openhydra.economy.errors import (
    ChannelClosed,
    InsufficientFunds,
    InvalidSignature,
    ReceiptAlreadyApplied,
    StaleChannelUpdate,
)
from openhydra.economy.ledger import Ledger
from openhydra.economy.policy import LedgerPolicy
from openhydra.economy.receipts import SettlementRequest, build_settlement
from openhydra.economy.units import MICRO, credits_for_tokens, split_by_weight

from .conftest import FakeClock, new_pg_schema, pg_base_url

PEERS = [Identity.generate() for _ in range(4)]
CAP = 60 * MICRO
POLICY = LedgerPolicy(supply_cap=CAP, max_channels_per_peer=3)
peer_ix = st.integers(0, len(PEERS) - 1)
amounts = st.one_of(st.integers(1, MICRO), st.integers(1, 8 * MICRO))


@dataclass
class ModelChannel:
    payer: int
    payee: int
    deposit: int
    nonce: int
    paid: int
    expires_at: float


class LedgerMachine(RuleBasedStateMachine):
    backend = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self._drop = None
        if self.backend == "sqlite":
            self._dir = tempfile.TemporaryDirectory()
            self.url = f"sqlite:///{Path(self._dir.name) / 'ledger.db'}"
        else:
            base = pg_base_url()
            assert base is not None
            self.url, self._drop = new_pg_schema(base)
        self.ledger = self._open()
        self.hydra = [0] * len(PEERS)
        self.stake = [0] * len(PEERS)
        self.channels: dict[str, ModelChannel] = {}
        self.applied: list[SettlementRequest] = []
        self.hydra_supply = 0

    def teardown(self) -> None:
        self.ledger.close()
        if self._drop:
            self._drop()
        else:
            self._dir.cleanup()

    def pid(self, i: int) -> str:
        return PEERS[i].peer_id

    # -- rules -------------------------------------------------------------------------------------
    @rule(
        tokens=st.integers(1, 30_000),
        served=st.lists(
            st.tuples(peer_ix, st.integers(1, 32)), min_size=1, max_size=4, unique_by=lambda t: t[0]
        ),
    )
    def earn(self, tokens: int, served: list[tuple[int, int]]) -> None:
        req = build_settlement(uuid.uuid4().hex, "m", tokens, [(PEERS[i], layers) for i, layers in served])
        res = self.ledger.settle(req)
        weights = [layers for _, layers in served]
        credits = split_by_weight(credits_for_tokens(tokens, POLICY.tokens_per_credit), weights)
        minted = min(sum(credits), CAP - self.hydra_supply)
        hydra = split_by_weight(minted, weights)
        assert [res.credits[self.pid(i)] for i, _ in served] == credits
        assert [res.hydra[self.pid(i)] for i, _ in served] == hydra
        for (i, _), h in zip(served, hydra, strict=True):
            self.hydra[i] += h
        self.hydra_supply += minted
        self.applied.append(req)

    @precondition(lambda self: self.applied)
    @rule(data=st.data())
    def replay_receipt(self, data: st.DataObject) -> None:
        req = data.draw(st.sampled_from(self.applied))
        with pytest.raises(ReceiptAlreadyApplied):
            self.ledger.settle(req)

    @rule(i=peer_ix, amount=amounts)
    def spend_credits(self, i: int, amount: int) -> None:
        have = self.ledger.balance(self.pid(i)).credits
        if amount > have:
            with pytest.raises(InsufficientFunds):
                self.ledger.spend_credits(self.pid(i), amount)
            assert self.ledger.balance(self.pid(i)).credits == have
        else:
            self.ledger.spend_credits(self.pid(i), amount)
            assert self.ledger.balance(self.pid(i)).credits == have - amount

    @rule(i=peer_ix, j=peer_ix, amount=amounts)
    def transfer_credits(self, i: int, j: int, amount: int) -> None:
        if i == j:
            return
        have_i, have_j = self.ledger.balance(self.pid(i)).credits, self.ledger.balance(self.pid(j)).credits
        if amount > have_i:
            with pytest.raises(InsufficientFunds):
                self.ledger.transfer_credits(self.pid(i), self.pid(j), amount)
            amount = 0
        else:
            self.ledger.transfer_credits(self.pid(i), self.pid(j), amount)
        assert self.ledger.balance(self.pid(i)).credits == have_i - amount
        assert self.ledger.balance(self.pid(j)).credits == have_j + amount

    def _pocket_op(self, fn, have: int, amount: int) -> bool:  # type: ignore[no-untyped-def]
        if amount > have:
            with pytest.raises(InsufficientFunds):
                fn()
            return False
        fn()
        return True

    @rule(i=peer_ix, j=peer_ix, amount=amounts)
    def transfer_hydra(self, i: int, j: int, amount: int) -> None:
        if i != j and self._pocket_op(
            lambda: self.ledger.transfer_hydra(self.pid(i), self.pid(j), amount), self.hydra[i], amount
        ):
            self.hydra[i] -= amount
            self.hydra[j] += amount

    @rule(i=peer_ix, amount=amounts)
    def burn_hydra(self, i: int, amount: int) -> None:
        if self._pocket_op(lambda: self.ledger.burn_hydra(self.pid(i), amount), self.hydra[i], amount):
            self.hydra[i] -= amount
            self.hydra_supply -= amount

    @rule(i=peer_ix, amount=amounts)
    def stake_hydra(self, i: int, amount: int) -> None:
        if self._pocket_op(lambda: self.ledger.stake(self.pid(i), amount), self.hydra[i], amount):
            self.hydra[i] -= amount
            self.stake[i] += amount

    @rule(i=peer_ix, amount=amounts)
    def unstake_hydra(self, i: int, amount: int) -> None:
        if self._pocket_op(lambda: self.ledger.unstake(self.pid(i), amount), self.stake[i], amount):
            self.stake[i] -= amount
            self.hydra[i] += amount

    @rule(i=peer_ix, amount=amounts)
    def slash(self, i: int, amount: int) -> None:
        taken = self.ledger.slash(self.pid(i), amount, "failed audit")
        event("slash", "hit" if taken else "nothing staked")
        assert taken == min(amount, self.stake[i])
        self.stake[i] -= taken
        self.hydra_supply -= taken

    def _settle_model(self, cid: str) -> None:
        ch = self.channels.pop(cid)
        self.hydra[ch.payee] += ch.paid
        self.hydra[ch.payer] += ch.deposit - ch.paid

    @rule(i=peer_ix, j=peer_ix, deposit=amounts)
    def open_channel(self, i: int, j: int, deposit: int) -> None:
        if i == j:
            return
        # Opening settles the parties' expired channels first, in the same transaction (so not on failure).
        expired = [
            cid
            for cid, ch in self.channels.items()
            if ch.expires_at <= self.clock.now and {ch.payer, ch.payee} & {i, j}
        ]
        live = [c for cid, c in self.channels.items() if cid not in expired]
        busy = [sum(1 for c in live if p in (c.payer, c.payee)) for p in (i, j)]
        refund = sum(
            self.channels[c].deposit - self.channels[c].paid for c in expired if self.channels[c].payer == i
        )
        refund += sum(self.channels[c].paid for c in expired if self.channels[c].payee == i)
        try:
            view = self.ledger.open_channel(self.pid(i), PEERS[i].public_key_bytes, self.pid(j), deposit)
        except InsufficientFunds:
            assert deposit > self.hydra[i] + refund
            return
        except Exception as exc:  # the only other refusal allowed is the per-peer limit
            assert type(exc).__name__ == "ChannelLimitReached" and max(busy) >= POLICY.max_channels_per_peer
            return
        assert deposit <= self.hydra[i] + refund and max(busy) < POLICY.max_channels_per_peer
        for cid in expired:
            self._settle_model(cid)
        self.hydra[i] -= deposit
        self.channels[view.channel_id] = ModelChannel(i, j, deposit, 0, 0, view.expires_at)

    @precondition(lambda self: self.channels)
    @rule(data=st.data(), step=st.integers(-2, 3), pay=st.integers(-MICRO, 2 * MICRO), tamper=st.booleans())
    def update_channel(self, data: st.DataObject, step: int, pay: int, tamper: bool) -> None:
        cid = data.draw(st.sampled_from(sorted(self.channels)))
        ch = self.channels[cid]
        nonce, amount = max(1, ch.nonce + step), max(0, ch.paid + pay)
        update = sign_update(PEERS[ch.payer], cid, nonce, amount)
        if tamper:
            update = ChannelUpdate.model_validate({**update.model_dump(), "amount": amount + 1})
        try:
            self.ledger.update_channel(update)
        except ChannelClosed:
            assert self.clock.now >= ch.expires_at
            return
        except InvalidSignature:
            assert tamper
            return
        except StaleChannelUpdate:
            assert nonce <= ch.nonce or amount < ch.paid
            return
        except Exception as exc:
            assert type(exc).__name__ == "InvalidReceipt" and amount > ch.deposit
            return
        assert not tamper and nonce > ch.nonce and ch.paid <= amount <= ch.deposit
        assert self.clock.now < ch.expires_at
        ch.nonce, ch.paid = nonce, amount
        event("channel update", "applied")

    @precondition(lambda self: self.channels)
    @rule(data=st.data())
    def close_channel(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.channels)))
        view = self.ledger.close_channel(cid)
        assert view.paid == self.channels[cid].paid
        self._settle_model(cid)

    @rule(seconds=st.sampled_from([1.0, 300.0, 901.0, 3_600.0, 86_400.0, 3 * 86_400.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def restart(self) -> None:
        self.ledger.close()
        self.ledger = self._open()

    def _open(self) -> Ledger:
        # synchronous=NORMAL: these checks are about logic; durability has its own SIGKILL test.
        return Ledger(self.url, POLICY, clock=self.clock, sqlite_synchronous="NORMAL")

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def books_balance(self) -> None:
        report = self.ledger.audit()
        assert report.ok, report.problems
        t = self.ledger.totals()
        assert t.hydra_supply == self.hydra_supply <= CAP
        assert t.settlements == len(self.applied)  # each receipt applied exactly once

    @invariant()
    def hydra_matches_model(self) -> None:
        for i in range(len(PEERS)):
            view = self.ledger.balance(self.pid(i))
            assert (view.hydra, view.stake) == (self.hydra[i], self.stake[i])
            assert view.credits >= 0
        for cid, ch in self.channels.items():
            row = self.ledger.channel(cid)
            assert row is not None and row.status == "open" and (row.nonce, row.paid) == (ch.nonce, ch.paid)


# CI size (~20 s on SQLite); a deeper run: OPENHYDRA_LEDGER_EXAMPLES=500 pytest tests/economy/test_state_machine.py
EXAMPLES = int(os.environ.get("OPENHYDRA_LEDGER_EXAMPLES", "12"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestLedgerSQLite = LedgerMachine.TestCase
TestLedgerSQLite.settings = SETTINGS


class PostgresLedgerMachine(LedgerMachine):
    backend = "postgres"


TestLedgerPostgres = pytest.mark.skipif(pg_base_url() is None, reason="OPENHYDRA_TEST_PG_URL not set")(
    PostgresLedgerMachine.TestCase
)
TestLedgerPostgres.settings = settings(SETTINGS, max_examples=max(4, EXAMPLES // 2))
