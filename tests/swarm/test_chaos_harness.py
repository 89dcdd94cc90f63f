"""The chaos harness's own rules, without processes: the killer never leaves a span with no live replica and runs
every kind of fault; spans and stalls are computed as documented."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from openhydra.testing.chaos import equal_spans
from openhydra.testing.chaos_faults import ChaosPeer, Killer, PeerState, span_key
from openhydra.testing.chaos_load import RequestResult, stall_of


class DryKiller(Killer):
    """Signals go nowhere (no processes); a restart leaves the peer STARTING until the test marks it ready."""

    def _bring_up(self, peer: ChaosPeer, graceful: bool) -> None:
        self._record("start", peer)


def _peers(spans: list[tuple[int, int]], replicas: int) -> list[ChaosPeer]:
    peers = [ChaosPeer(f"s{s}r{r}", span, Path("/nonexistent"), "http://127.0.0.1:1", Path("/nonexistent"),
                       Path("/nonexistent"), "float32") for s, span in enumerate(spans) for r in range(replicas)]
    for peer in peers:
        peer.state = PeerState.LIVE
    return peers


@pytest.mark.parametrize("seed", range(5))
def test_killer_never_empties_a_span_and_runs_every_fault(seed):
    peers = _peers([(0, 3), (3, 5), (5, 8)], replicas=2)
    killer = DryKiller(peers, every_s=1.0, seed=seed)
    world = random.Random(seed + 100)
    for _ in range(300):
        killer.tick()
        for helper in killer._helpers:
            helper.join()
        assert all(n >= 1 for n in killer.live_counts().values()), killer.live_counts()
        for peer in peers:  # the world moves on: stopped peers are continued, restarts finish, at random
            if peer.state is PeerState.STOPPED and world.random() < 0.5:
                killer.cont(peer)
            elif peer.state is PeerState.STARTING and world.random() < 0.3:
                peer.state = PeerState.LIVE
    kinds = {e.kind for e in killer.events}
    assert {"kill", "stop", "cont", "start"} <= kinds
    assert "term" in kinds  # a restart with nobody down is a graceful one
    assert all(n >= 1 for n in killer.min_live.values()) and set(killer.min_live) == {"0-3", "3-5", "5-8"}
    for event in killer.events:
        assert all(n >= 1 for n in event.live.values()), event


def test_first_round_has_each_fault_kind_once():
    peers = _peers([(0, 4), (4, 8)], replicas=2)
    killer = DryKiller(peers, every_s=1.0, seed=2)
    for _ in range(3):
        killer.tick()
        for helper in killer._helpers:
            helper.join()
        for peer in peers:  # keep every kind feasible
            if peer.state is PeerState.STOPPED:
                killer.cont(peer)
    faults = [e.kind for e in killer.events if e.kind in ("kill", "stop", "start")]
    assert sorted(faults) == ["kill", "start", "stop"]


def test_with_one_live_replica_left_nothing_is_taken_down():
    peers = _peers([(0, 8)], replicas=2)
    peers[0].state = PeerState.DOWN
    killer = DryKiller(peers, every_s=1.0, seed=0)
    for _ in range(20):
        killer.tick()
        for helper in killer._helpers:
            helper.join()
        assert peers[1].state is PeerState.LIVE  # only ever the down peer is restarted
    assert {e.kind for e in killer.events} == {"start"}
    assert killer.live_counts() == {span_key((0, 8)): 1}


def test_equal_spans_tile_the_model_past_layer_one():
    assert equal_spans(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert equal_spans(8, 3) == [(0, 3), (3, 5), (5, 8)]
    with pytest.raises(ValueError):
        equal_spans(2, 2)  # the first span would end at layer 1, where the coordinator's span ends


def test_stall_is_the_largest_gap_including_first_token_and_end():
    result = RequestResult(stream=0, prompt=0, started_s=10.0, chunk_times_s=[10.5, 10.6, 14.6, 14.7])
    assert stall_of(result, 14.8) == pytest.approx(4.0)
    assert stall_of(RequestResult(stream=0, prompt=0, started_s=1.0), 8.0) == pytest.approx(7.0)
