"""Ban list: exponential backoff 1 -> 60 s, reset on success, clock injected."""

from __future__ import annotations

import pytest

from openhydra.router.bans import BanList, BanTunables


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_backoff_doubles_up_to_max():
    clock = Clock()
    bans = BanList(clock=clock)
    durations = []
    for _ in range(9):
        d = bans.ban("p")
        durations.append(d)
        assert bans.is_banned("p") and "p" in bans
        clock.t += d  # ban ends, next failure comes right after
        assert not bans.is_banned("p")
    assert durations == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_failures_during_a_ban_do_not_stack():
    clock = Clock()
    bans = BanList(clock=clock)
    assert bans.ban("p") == 1
    clock.t += 0.5
    assert bans.ban("p") == pytest.approx(0.5)
    clock.t += 0.5
    assert bans.ban("p") == 2


def test_success_and_quiet_period_forget_the_streak():
    clock = Clock()
    bans = BanList(BanTunables(initial_s=1, max_s=60, forget_after_s=100), clock=clock)
    bans.ban("p")
    clock.t += 1
    assert bans.ban("p") == 2
    bans.success("p")
    clock.t += 2
    assert bans.ban("p") == 1
    clock.t += 1 + 101
    assert bans.ban("p") == 1
    assert bans.banned() == {"p"} and len(bans) == 1
    assert bans.remaining_s("p") == pytest.approx(1) and bans.remaining_s("q") == 0


def test_bad_tunables_rejected():
    with pytest.raises(ValueError):
        BanTunables(initial_s=0)
    with pytest.raises(ValueError):
        BanTunables(initial_s=10, max_s=5)
    with pytest.raises(ValueError):
        BanTunables(multiplier=0.5)


def test_a_swarm_keeps_the_empty_ban_list_it_is_given():
    """An empty BanList has len 0 (falsy): ``bans or BanList()`` once swapped it for a default one, so the
    tunables and clock passed in were ignored and a fallback model's swarm did not share the node's bans."""
    from openhydra.router.swarm import SwarmPipeline
    from tests.router.scripted import ScriptedClient

    bans = BanList(BanTunables(initial_s=5, max_s=5), clock=Clock())
    assert len(bans) == 0
    swarm = SwarmPipeline("m", 4, lambda: [], ScriptedClient(), bans=bans)
    assert swarm.bans is bans


def test_a_lifted_ban_ends_now_but_the_next_failure_escalates():
    """A restarted peer (a new record instance) is routable at once; but the instance is the peer's own word, so a
    banned peer re-announcing under new instances must not keep its bans at 1 s: its streak goes only when it
    serves a step (success) or after forget_after_s."""
    clock = Clock()
    bans = BanList(clock=clock)
    durations = []
    for _ in range(4):
        durations.append(bans.ban("p"))
        bans.lift("p")  # a new instance, at once
        assert not bans.is_banned("p")
    assert durations == [1, 2, 4, 8]
    bans.success("p")
    assert bans.ban("p") == 1
    bans.lift("q")  # never banned: nothing to lift
    assert "q" not in bans


class _Probes:
    """Probation's probe and runner, by hand: probes queue up and run when the test says, answering ``alive``."""

    def __init__(self) -> None:
        self.alive = False
        self.queued: list = []
        self.asked: list[str] = []

    def probe(self, address: str) -> bool:
        self.asked.append(address)
        return self.alive

    def run(self, task) -> None:
        self.queued.append(task)

    def finish(self) -> None:
        tasks, self.queued = self.queued, []
        for task in tasks:
            task()


def _held_peer():
    """A ban list and probation holding peer "p" (banned 1 s, then held until a probe answers), on a hand clock."""
    from openhydra.router.bans import Probation

    clock, probes = Clock(), _Probes()
    bans = BanList(clock=clock)
    probation = Probation(bans, probes.probe, run=probes.run)
    bans.ban("p")
    probation.hold("p", "10.0.0.1:1")
    return clock, probes, bans, probation


def test_a_silent_peer_stays_out_until_a_probe_finds_it_answering():
    clock, probes, bans, probation = _held_peer()
    assert probation.held(bans.banned()) == {"p"} and probes.queued == []  # banned: no probe yet
    clock.t += 1.0  # the ban lapses: still held, and one probe starts (not one per route choice)
    assert probation.held(bans.banned()) == {"p"}
    assert probation.held(bans.banned()) == {"p"} and len(probes.queued) == 1
    probes.finish()  # no answer: banned again, longer
    assert probes.asked == ["10.0.0.1:1"] and bans.remaining_s("p") == 2.0
    clock.t += 2.0
    probation.held(bans.banned())
    probes.alive = True
    probes.finish()  # it answers: routable
    assert probation.held(bans.banned()) == frozenset() and probation.released == 1


def test_a_restarted_peer_is_released_without_waiting_for_its_probe():
    clock, probes, bans, probation = _held_peer()
    clock.t += 1.0
    probation.held(bans.banned())  # a probe of the old process is under way
    probation.release("p")  # a new process announced itself
    assert probation.held(bans.banned()) == frozenset()
    probes.finish()  # the old process's probe fails afterwards: it changes nothing
    assert not bans.is_banned("p") and probation.held(bans.banned()) == frozenset()
