"""32 processes race for the same money: exactly one wins, the rest get a typed conflict, nothing leaks.

Runs on SQLite and (with OPENHYDRA_TEST_PG_URL) PostgreSQL. Each worker is a separate OS process with
its own engine and connections; a barrier releases them together. A database-busy error, a deadlock
or any untyped exception reaching a worker fails the test.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import sqlite3
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from openhydra.crypto.identity import Identity
from openhydra.economy.channels import sign_update
from openhydra.economy.errors import LedgerError, LedgerUnavailable
from openhydra.economy.ledger import Ledger
from openhydra.economy.policy import LedgerPolicy
from openhydra.economy.receipts import SettlementRequest, build_settlement
from openhydra.economy.units import MICRO

WORKERS = 32
NO_DECAY = LedgerPolicy(decay_per_day=0.0)
CTX = mp.get_context("fork")  # workers start in milliseconds; each builds its own engine after the fork
RETRIES = CTX.Value("i", 0)  # lock-contention retries summed over a race's workers


def _worker(
    url: str,
    policy: LedgerPolicy,
    op: Callable[[Ledger, int], object],
    n: int,
    barrier: Any,
    out: Any,
    kw: dict[str, Any],
) -> None:
    try:
        led = Ledger(url, policy, **kw)
        barrier.wait(timeout=60)
        try:
            op(led, n)
            out.put("ok")
        except LedgerError as exc:
            out.put(type(exc).__name__)
        with RETRIES.get_lock():
            RETRIES.value += led.store.retries
        led.close()
    except BaseException as exc:  # anything else is a leak: report it, the parent fails the test
        out.put(f"LEAK {type(exc).__module__}.{type(exc).__name__}: {exc}")


def race(url: str, policy: LedgerPolicy, op: Callable[[Ledger, int], object], **kw: object) -> Counter[str]:
    barrier, out = CTX.Barrier(WORKERS), CTX.Queue()
    RETRIES.value = 0
    procs = [
        CTX.Process(target=_worker, args=(url, policy, op, n, barrier, out, kw), daemon=True)
        for n in range(WORKERS)
    ]
    for p in procs:
        p.start()
    results: Counter[str] = Counter()
    for _ in procs:
        try:
            results[out.get(timeout=120)] += 1
        except queue.Empty:
            pytest.fail(f"workers died without reporting: exit codes {[p.exitcode for p in procs]}")
    for p in procs:
        p.join(timeout=30)
    assert not [r for r in results if r.startswith("LEAK")], results
    return results


@pytest.fixture
def payer() -> Identity:
    return Identity.generate()


def _fund(url: str, policy: LedgerPolicy, who: Identity, tokens: int) -> None:
    led = Ledger(url, policy)
    led.settle(build_settlement("fund", "m", tokens, [(who, 1)]))
    led.close()  # no pooled connection may cross the fork


def test_spend_the_same_credit(db_url: str, payer: Identity) -> None:
    _fund(db_url, NO_DECAY, payer, 1000)  # exactly 1 credit

    results = race(db_url, NO_DECAY, lambda led, n: led.spend_credits(payer.peer_id, 600_000, f"w{n}"))
    assert results == Counter({"ok": 1, "InsufficientFunds": WORKERS - 1})
    led = Ledger(db_url, NO_DECAY)
    assert led.balance(payer.peer_id).credits == 400_000
    assert led.audit().ok
    led.close()


_SHARED: dict[str, SettlementRequest] = {}


def test_apply_the_same_receipt(db_url: str, payer: Identity) -> None:
    other = Identity.generate()
    _SHARED["req"] = build_settlement("req-race", "m", 4000, [(payer, 1), (other, 3)])  # inherited by fork
    Ledger(db_url, NO_DECAY).close()

    results = race(db_url, NO_DECAY, lambda led, n: led.settle(_SHARED["req"]))
    assert results == Counter({"ok": 1, "ReceiptAlreadyApplied": WORKERS - 1})
    led = Ledger(db_url, NO_DECAY)
    assert led.balance(payer.peer_id).credits == MICRO
    assert led.balance(other.peer_id).credits == 3 * MICRO
    assert led.totals().settlements == 1
    assert led.audit().ok
    led.close()


def test_supply_cap_holds_under_concurrent_mints(db_url: str) -> None:
    policy = LedgerPolicy(decay_per_day=0.0, supply_cap=5 * MICRO)
    servers = [Identity.generate() for _ in range(WORKERS)]
    Ledger(db_url, policy).close()

    results = race(
        db_url, policy, lambda led, n: led.settle(build_settlement(f"r{n}", "m", 1000, [(servers[n], 1)]))
    )
    assert results == Counter({"ok": WORKERS})  # every request is paid in credits...
    led = Ledger(db_url, policy)
    t = led.totals()
    assert t.hydra_supply == 5 * MICRO  # ...but only 5 HYDRA could ever be minted
    assert t.credits_minted == WORKERS * MICRO
    assert sum(led.balance(s.peer_id).hydra for s in servers) == 5 * MICRO
    assert led.audit().ok
    led.close()


def test_close_the_same_channel(db_url: str, payer: Identity) -> None:
    payee = Identity.generate()
    _fund(db_url, NO_DECAY, payer, 10_000)
    led = Ledger(db_url, NO_DECAY)
    cid = led.open_channel(payer.peer_id, payer.public_key_bytes, payee.peer_id, 4 * MICRO).channel_id
    led.update_channel(sign_update(payer, cid, 1, 3 * MICRO))
    led.close()

    results = race(db_url, NO_DECAY, lambda led, n: led.close_channel(cid))
    assert results == Counter({"ok": 1, "ChannelClosed": WORKERS - 1})
    led = Ledger(db_url, NO_DECAY)
    assert led.balance(payee.peer_id).hydra == 3 * MICRO  # paid once
    assert led.balance(payer.peer_id).hydra == 7 * MICRO
    assert led.audit().ok
    led.close()


def test_busy_sqlite_is_retried_not_leaked(sqlite_db_url: str, payer: Identity) -> None:
    """A 1 ms busy timeout makes SQLITE_BUSY certain; the store's retry loop must absorb it."""
    _fund(sqlite_db_url, NO_DECAY, payer, 1000)
    results = race(
        sqlite_db_url,
        NO_DECAY,
        lambda led, n: led.spend_credits(payer.peer_id, 600_000),
        busy_timeout_s=0.001,
    )
    assert results == Counter({"ok": 1, "InsufficientFunds": WORKERS - 1})
    assert RETRIES.value > 0  # the busy path was really taken


def test_lock_held_too_long_is_a_typed_error(sqlite_db_url: str, payer: Identity) -> None:
    _fund(sqlite_db_url, NO_DECAY, payer, 1000)
    led = Ledger(sqlite_db_url, NO_DECAY, busy_timeout_s=0.01, retry_budget_s=0.3)
    blocker = sqlite3.connect(sqlite_db_url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerUnavailable):
            led.spend_credits(payer.peer_id, 1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    led.spend_credits(payer.peer_id, 1)  # and it works again once the lock is gone
    assert led.balance(payer.peer_id).credits == MICRO - 1
    led.close()


def test_32_processes_start_on_a_fresh_database(db_url: str) -> None:
    """Schema creation races too (WAL switch, CREATE TABLE, triggers): all start, all settle."""
    servers = [Identity.generate() for _ in range(WORKERS)]
    results = race(
        db_url, NO_DECAY, lambda led, n: led.settle(build_settlement(f"f{n}", "m", 1000, [(servers[n], 1)]))
    )
    assert results == Counter({"ok": WORKERS})
    led = Ledger(db_url, NO_DECAY)
    assert led.totals().settlements == WORKERS
    assert led.audit().ok
    led.close()
