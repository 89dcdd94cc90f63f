"""shard=auto span choice: newcomers fill the layers the swarm covers least, by throughput."""

from __future__ import annotations

import random

import pytest

from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.spans import best_start, choose_span, layer_throughput, rebalance_gain

NOW = 1_800_000_000.0


def rec(peer, start, end, tps=10.0, total=12, **kw):
    return PeerAnnouncement(
        peer_id=peer,
        model_id="m",
        start=start,
        end=end,
        total_layers=total,
        grpc_address="127.0.0.1:1",
        throughput_tps=tps,
        announced_at=kw.pop("announced_at", NOW),
        ttl_s=kw.pop("ttl_s", 60.0),
        **kw,
    )


def test_empty_swarm_starts_at_zero_and_full_capacity_takes_all():
    assert choose_span([], 12, 4, now=NOW) == (0, 4)
    assert choose_span([rec("a", 0, 4)], 12, 40, now=NOW) == (0, 12)


def test_fills_the_hole():
    swarm = [rec("a", 0, 4), rec("b", 8, 12)]
    assert choose_span(swarm, 12, 4, now=NOW) == (4, 8)
    # A bigger node covers the hole and extends to the weaker side.
    swarm = [rec("a", 0, 4, tps=100), rec("b", 8, 12, tps=5)]
    assert choose_span(swarm, 12, 6, now=NOW) == (4, 10)


def test_weights_by_throughput_not_peer_count():
    # Layers [0,6): three slow peers (3 tok/s total); [6,12): one fast peer (50 tok/s).
    swarm = [rec("a", 0, 6, tps=1), rec("b", 0, 6, tps=1), rec("c", 0, 6, tps=1), rec("d", 6, 12, tps=50)]
    assert choose_span(swarm, 12, 6, now=NOW) == (0, 6)
    assert layer_throughput(swarm, 12, now=NOW) == [3.0] * 6 + [50.0] * 6


def test_unmeasured_peers_count_as_default_and_expired_are_ignored():
    swarm = [rec("a", 0, 6, tps=0), rec("b", 6, 12, tps=0, announced_at=NOW - 100, ttl_s=10)]
    assert layer_throughput(swarm, 12, now=NOW) == [1.0] * 6 + [0.0] * 6
    assert choose_span(swarm, 12, 6, now=NOW) == (6, 12)


def test_own_record_left_out_when_rebalancing():
    swarm = [rec("me", 0, 6, tps=20), rec("x", 6, 12, tps=30)]
    assert choose_span(swarm, 12, 6, now=NOW) == (0, 6)  # counting me, [0,6) has 20 < 30
    assert choose_span(swarm, 12, 6, own_peer_id="me", now=NOW) == (0, 6)  # without me, [0,6) is empty
    # me2 on [6,12) next to x and y: bottleneck is [0,6) at 20 tok/s; moving there makes it min(50, 60).
    gain, span = rebalance_gain([*swarm, rec("y", 6, 12, tps=30)], rec("me2", 6, 12, tps=30), now=NOW)
    assert span == (0, 6) and gain == pytest.approx(2.5)


def test_rebalance_gain_is_one_when_already_best():
    swarm = [rec("a", 0, 6, tps=10), rec("b", 6, 12, tps=10)]
    me = rec("me", 0, 6, tps=10)
    gain, _span = rebalance_gain([*swarm, me], me, now=NOW)
    assert gain == pytest.approx(1.0)  # either side: the bottleneck stays 10 tok/s


def test_best_start_lexicographic_and_bad_window():
    assert best_start([5, 1, 1, 5, 0, 9], 2) == 3  # sorted windows: [0, 5] < [0, 9] < [1, 1] ...
    assert best_start([0, 0, 5, 0, 0], 2) == 0  # ties -> lowest start
    with pytest.raises(ValueError):
        best_start([1, 2], 3)


def test_newcomers_even_out_coverage():
    # 40 newcomers with random capacity join a 32-layer model one by one with shard=auto.
    rng = random.Random(7)
    swarm: list[PeerAnnouncement] = []
    for i in range(40):
        size = rng.randint(4, 12)
        a, b = choose_span(swarm, 32, size, now=NOW)
        swarm.append(rec(f"p{i}", a, b, tps=10.0, total=32))
    tp = layer_throughput(swarm, 32, now=NOW)
    assert min(tp) > 0
    assert max(tp) / min(tp) <= 2.0  # random spans would leave far worse imbalance
