"""Reputation: the spec's weights, decay with a stated half-life, the floor, persistence in SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from openhydra.verification.config import ReputationConfig
from openhydra.verification.reputation import WEIGHTS, ReputationStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_weights_are_the_spec() -> None:
    assert WEIGHTS == {"verification": 0.40, "uptime": 0.25, "latency": 0.20, "stake": 0.15}


def test_components_and_score(tmp_path: Path) -> None:
    clock = Clock()
    stakes = {"staked": 100_000_000}  # 100 HYDRA = stake_ref: factor 0.5
    store = ReputationStore(tmp_path / "r.db", ReputationConfig(), stake_of=lambda p: stakes.get(p, 0), clock=clock)
    assert store.components("new") == {"verification": 1.0, "uptime": 1.0, "latency": 0.0, "stake": 0.0}
    assert store.score("new") == pytest.approx(0.65)
    assert store.score("staked") == pytest.approx(0.65 + 0.15 * 0.5)
    store.record("liar", "fail")
    assert store.components("liar")["verification"] == pytest.approx(2 / 7)  # prior 2 passes, weight 5
    assert store.score("liar") < store.config.floor and store.routing_score("liar") == 0.0
    for _ in range(9):
        store.record("flaky", "ok")
    store.record("flaky", "down")
    assert store.components("flaky")["uptime"] == pytest.approx(10 / 11)
    for ms in (10.0, 10.0, 10.0):
        store.record("steady", "latency", value=ms)
    for ms in (1.0, 10.0, 30.0):
        store.record("jittery", "latency", value=ms)
    assert store.components("steady")["latency"] == pytest.approx(1.0)
    assert store.components("jittery")["latency"] < 0.6


def test_failures_decay_with_the_half_life_and_the_peer_recovers(tmp_path: Path) -> None:
    clock = Clock()
    config = ReputationConfig(verification_half_life_s=100.0)
    store = ReputationStore(None, config, clock=clock)
    store.record("liar", "fail")
    assert store.below_floor("liar")
    clock.now += 100.0  # one half-life: the failure weighs 0.5
    assert store.components("liar")["verification"] == pytest.approx(2 / (2 + 2.5))
    clock.now += 1000.0
    assert not store.below_floor("liar")  # recovered: routed to again (and audited again)


def test_scores_persist_across_restarts(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "reputation.db"
    store = ReputationStore(path, clock=clock)
    store.record("liar", "fail", detail="span [3, 5] tier 2")
    store.record("honest", "pass")
    for _ in range(50):
        store.record("honest", "ok")
    before = {p: store.components(p) for p in ("liar", "honest")}
    store.close()
    reopened = ReputationStore(path, clock=clock)
    for peer in ("liar", "honest"):
        assert reopened.components(peer) == pytest.approx(before[peer])
    assert reopened.counts("honest")["ok"] == 50
    assert reopened.below_floor("liar")
    status = reopened.status()
    assert status["peers"]["liar"]["routable"] is False
    assert set(status["peers"]["honest"]["components"]) == set(WEIGHTS)
    reopened.close()


def test_unknown_event_rejected() -> None:
    with pytest.raises(ValueError, match="unknown reputation event"):
        ReputationStore(None).record("p", "bribe")
