"""Barter credits and HYDRA on a real ledger (SQLite, and PostgreSQL when OPENHYDRA_TEST_PG_URL is set)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from openhydra.crypto.identity import Identity
from openhydra.economy.errors import EconomyDisabled, InsufficientFunds, InvalidRequest
from openhydra.economy.ledger import Ledger
from openhydra.economy.policy import LedgerPolicy
from openhydra.economy.receipts import build_settlement
from openhydra.economy.units import MICRO

from .conftest import FakeClock

DAY = 86_400.0


def _settle(ledger: Ledger, rid: str, tokens: int, served: list[tuple[Identity, int]]) -> None:
    ledger.settle(build_settlement(rid, "smollm2-135m", tokens, served))


def test_settlement_splits_by_layers(db_url: str, peers: list[Identity], clock: FakeClock) -> None:
    led = Ledger(db_url, clock=clock)
    res = led.settle(build_settlement("r1", "m", 3000, [(peers[0], 8), (peers[1], 8), (peers[2], 16)]))
    assert [res.credits[p.peer_id] for p in peers[:3]] == [750_000, 750_000, 1_500_000]
    assert [led.balance(p.peer_id).credits for p in peers[:3]] == [750_000, 750_000, 1_500_000]
    assert [led.balance(p.peer_id).hydra for p in peers[:3]] == [750_000, 750_000, 1_500_000]
    t = led.totals()
    assert (t.credits_minted, t.hydra_minted, t.settlements) == (3 * MICRO, 3 * MICRO, 1)
    assert led.audit().ok
    led.close()


def test_credits_decay_five_percent_per_day(db_url: str, peers: list[Identity], clock: FakeClock) -> None:
    led = Ledger(db_url, clock=clock)
    _settle(led, "r1", 100_000, [(peers[0], 1)])  # 100 credits
    clock.advance(DAY)
    assert led.balance(peers[0].peer_id).credits == 95 * MICRO  # read view, nothing written
    assert led.totals().credits_burned == 0
    led.spend_credits(peers[0].peer_id, 5 * MICRO)  # touching the account applies the decay
    assert led.balance(peers[0].peer_id).credits == 90 * MICRO
    t = led.totals()
    assert t.credits_burned == 10 * MICRO  # 5 decayed + 5 spent, both burned
    assert led.audit().ok
    led.close()


@pytest.mark.parametrize("every_s", [2.0, 30.0, 600.0])
def test_an_account_touched_often_decays_as_one_left_alone(db_url: str, peers: list[Identity], clock: FakeClock,
                                                            every_s: float) -> None:
    """Every settlement touches its hops' accounts. Rounding each touch's decay to the nearest micro-credit dropped
    everything under half a unit, so a balance touched every 30 s under ~28,000 micro never decayed (an economy
    probe: 20,000 after a day, against 19,000 left alone). Touched by transfers in and out, and by earning every
    touch, an account ends 300 touches within a few micro-credits of the exact compound decay."""
    led = Ledger(db_url, LedgerPolicy(hydra_enabled=False), clock=clock)
    touched, alone, earner, float_ = peers[:4]
    _settle(led, "a", 20, [(touched, 1)])  # 20,000 micro each
    _settle(led, "b", 20, [(alone, 1)])
    _settle(led, "c", 20, [(earner, 1)])
    _settle(led, "f", 1_000, [(float_, 1)])
    keep, expected_earner, steps = 0.95, 20_000.0, 300
    for i in range(steps):
        clock.advance(every_s)
        led.transfer_credits(float_.peer_id, touched.peer_id, 1)
        led.transfer_credits(touched.peer_id, float_.peer_id, 1)
        _settle(led, f"e{i}", 1, [(earner, 1)])  # +1,000 micro
        expected_earner = expected_earner * keep ** (every_s / DAY) + 1_000
    left_alone = led.balance(alone.peer_id).credits
    assert abs(left_alone - 20_000 * keep ** (steps * every_s / DAY)) <= 1  # 7 micro over 600 s, 1,000 over a day
    assert left_alone < 20_000
    assert abs(led.balance(touched.peer_id).credits - left_alone) <= 2
    assert abs(led.balance(earner.peer_id).credits - expected_earner) <= 2 + expected_earner * 1e-9
    assert led.audit().ok
    led.close()


def test_overspend_is_refused_and_changes_nothing(
    db_url: str, peers: list[Identity], clock: FakeClock
) -> None:
    led = Ledger(db_url, clock=clock)
    _settle(led, "r1", 1000, [(peers[0], 1)])
    rows = led.journal_rows()
    with pytest.raises(InsufficientFunds) as err:
        led.spend_credits(peers[0].peer_id, MICRO + 1)
    assert (err.value.have, err.value.need) == (MICRO, MICRO + 1)
    assert str(err.value) == f"{peers[0].peer_id} has 1 credits, needs 1.000001"  # whole units, as the API speaks
    with pytest.raises(InsufficientFunds):
        led.transfer_credits(peers[0].peer_id, peers[1].peer_id, 2 * MICRO)
    with pytest.raises(InsufficientFunds):
        led.stake(peers[0].peer_id, 2 * MICRO)
    with pytest.raises(InsufficientFunds):
        led.burn_hydra(peers[1].peer_id, 1)
    with pytest.raises(InvalidRequest):
        led.spend_credits(peers[0].peer_id, 0)
    assert led.journal_rows() == rows
    assert led.balance(peers[0].peer_id).credits == MICRO
    assert led.balance(peers[1].peer_id).credits == 0
    assert led.audit().ok
    led.close()


def test_stake_unstake_slash_and_burn(db_url: str, peers: list[Identity], clock: FakeClock) -> None:
    led = Ledger(db_url, clock=clock)
    p = peers[0].peer_id
    _settle(led, "r1", 10_000, [(peers[0], 1)])  # 10 HYDRA minted
    assert led.stake(p, 6 * MICRO) == 6 * MICRO
    assert led.stake_of(p) == 6 * MICRO
    assert led.unstake(p, MICRO) == 5 * MICRO
    assert led.slash(p, 2 * MICRO, "audit failed: r1") == 2 * MICRO
    assert led.slash(p, 100 * MICRO, "audit failed: r2") == 3 * MICRO  # only what is staked
    assert led.stake_of(p) == 0
    led.burn_hydra(p, MICRO, "priority")
    view = led.balance(p)
    assert (view.hydra, view.stake) == (4 * MICRO, 0)
    t = led.totals()
    assert (t.hydra_minted, t.hydra_burned) == (10 * MICRO, 6 * MICRO)
    assert led.audit().ok
    led.close()


def test_supply_cap_is_never_exceeded(db_url: str, peers: list[Identity]) -> None:
    led = Ledger(db_url, LedgerPolicy(supply_cap=5 * MICRO))
    _settle(led, "r1", 4000, [(peers[0], 1)])
    res = led.settle(build_settlement("r2", "m", 4000, [(peers[1], 1)]))
    assert res.hydra[peers[1].peer_id] == MICRO  # only 1 HYDRA of room was left
    assert res.credits[peers[1].peer_id] == 4 * MICRO  # credits are not capped
    _settle(led, "r3", 4000, [(peers[2], 1)])
    assert led.totals().hydra_supply == 5 * MICRO
    led.burn_hydra(peers[0].peer_id, 2 * MICRO)  # burning makes room (burn-and-mint equilibrium)
    res = led.settle(build_settlement("r4", "m", 4000, [(peers[3], 1)]))
    assert res.hydra[peers[3].peer_id] == 2 * MICRO
    assert led.totals().hydra_supply == 5 * MICRO
    assert led.audit().ok
    led.close()


def test_barter_mode_has_no_hydra(db_url: str, peers: list[Identity]) -> None:
    led = Ledger(db_url, LedgerPolicy(hydra_enabled=False))
    _settle(led, "r1", 1000, [(peers[0], 1)])
    assert led.balance(peers[0].peer_id).hydra == 0
    with pytest.raises(EconomyDisabled):
        led.stake(peers[0].peer_id, 1)
    assert led.totals().hydra_minted == 0
    led.close()


def test_restart_keeps_everything(db_url: str, peers: list[Identity], clock: FakeClock) -> None:
    led = Ledger(db_url, clock=clock)  # a fixed clock: no decay between the two reads
    _settle(led, "r1", 5000, [(peers[0], 1), (peers[1], 4)])
    led.stake(peers[1].peer_id, MICRO)
    before = [led.balance(p.peer_id) for p in peers[:2]], led.totals()
    led.close()
    led = Ledger(db_url, clock=clock)
    assert ([led.balance(p.peer_id) for p in peers[:2]], led.totals()) == before
    assert led.audit().ok
    led.close()


def test_audit_catches_an_edited_balance(db_url: str, peers: list[Identity], clock: FakeClock) -> None:
    led = Ledger(db_url, clock=clock)
    _settle(led, "r1", 1000, [(peers[0], 1)])
    with led.store.engine.begin() as conn:
        conn.execute(text("UPDATE econ_account SET credits = credits + 1"))
    report = led.audit()
    assert not report.ok
    assert any("journal sums to" in p for p in report.problems)
    led.close()


def test_negative_balance_is_impossible_even_in_sql(
    db_url: str, peers: list[Identity], clock: FakeClock
) -> None:
    led = Ledger(db_url, clock=clock)
    _settle(led, "r1", 1000, [(peers[0], 1)])
    with pytest.raises(Exception, match=r"(?i)check"), led.store.engine.begin() as conn:
        conn.execute(text("UPDATE econ_account SET credits = -1"))
    assert led.audit().ok
    led.close()


def test_sqlite_pragmas(sqlite_db_url: str) -> None:
    led = Ledger(sqlite_db_url)
    with led.store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    assert led.integrity_check() == "ok"
    led.close()


@pytest.mark.parametrize(
    "sql", ["UPDATE econ_journal SET delta = delta + 1", "DELETE FROM econ_journal", "TRUNCATE econ_journal"]
)
def test_journal_is_append_only_in_the_database(
    db_url: str, peers: list[Identity], sql: str, clock: FakeClock
) -> None:
    led = Ledger(db_url, clock=clock)
    _settle(led, "r1", 1000, [(peers[0], 1)])
    rows = led.journal_rows()
    if sql.startswith("TRUNCATE") and led.backend == "sqlite":
        pytest.skip("SQLite has no TRUNCATE")
    with pytest.raises(Exception, match="append-only"), led.store.engine.begin() as conn:
        conn.execute(text(sql))
    assert led.journal_rows() == rows
    assert led.audit().ok
    led.close()
