"""LayerCoverageMap: chain assembly, validity, coverage holes, replacement and degradation."""

from __future__ import annotations

import itertools
import random

import pytest

from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import (
    Chain,
    Hop,
    LayerCoverageMap,
    RouteTunables,
    chain_problems,
    is_valid_chain,
    nearest_covered_model,
)

NOW = 1_800_000_000.0
L = 8


def rec(peer: str, start: int, end: int, tps: float = 10.0, total: int = L, model: str = "m", **kw) -> PeerAnnouncement:
    data = dict(
        peer_id=peer,
        model_id=model,
        start=start,
        end=end,
        total_layers=total,
        grpc_address="127.0.0.1:50051",
        throughput_tps=tps,
        announced_at=NOW - 1,
        ttl_s=180.0,
    )
    data.update(kw)
    return PeerAnnouncement.model_validate(data)


def cmap(records, **kw) -> LayerCoverageMap:
    kw.setdefault("now", NOW)
    kw.setdefault("rtt_ms", lambda _p: 0.0)
    return LayerCoverageMap(records, **kw)


def test_single_path_in_order():
    # Shuffled input: the chain must come out in layer order (DESIGN §6).
    records = [rec("c", 6, 8), rec("a", 0, 3), rec("b", 3, 6)]
    chain = cmap(records).chain()
    assert chain is not None
    assert chain.peer_ids == ["a", "b", "c"]
    assert chain.spans == [(0, 3), (3, 6), (6, 8)]
    assert is_valid_chain(chain, L, "m")


def test_hole_gives_no_chain_and_reports_it():
    m = cmap([rec("a", 0, 3), rec("c", 5, 8)])
    assert m.chain() is None
    report = m.coverage()
    assert report.holes == [(3, 5)]
    assert not report.complete
    assert report.counts == [1, 1, 1, 0, 0, 1, 1, 1]
    assert report.covered_fraction == 6 / 8


def test_overlapping_spans_exact_vs_partial():
    # a: [0,5) and b: [3,8) overlap; they do not tile exactly.
    records = [rec("a", 0, 5), rec("b", 3, 8)]
    assert cmap(records).chain() is None
    chain = cmap(records, allow_partial=True).chain()
    assert chain is not None and is_valid_chain(chain, L)
    assert chain.spans == [(0, 5), (5, 8)]
    assert chain.hops[1].partial and not chain.hops[0].partial


def test_overlap_exact_finds_the_tiling_subset():
    records = [rec("a", 0, 5), rec("b", 3, 8), rec("c", 0, 3)]
    chain = cmap(records).chain()
    assert chain is not None and chain.peer_ids == ["c", "b"]


def test_banned_peer_excluded_at_build_and_per_call():
    records = [rec("a", 0, 4, tps=100), rec("a2", 0, 4, tps=1), rec("b", 4, 8)]
    assert cmap(records).chain().peer_ids == ["a", "b"]
    assert cmap(records, banned={"a"}).chain().peer_ids == ["a2", "b"]
    m = cmap(records)
    assert m.chain(exclude={"a"}).peer_ids == ["a2", "b"]
    assert m.chain(exclude={"a", "a2"}) is None
    assert m.coverage(exclude={"a", "a2"}).holes == [(0, 4)]


def test_full_model_fallback_when_shards_have_a_hole():
    records = [rec("a", 0, 3, tps=1000), rec("c", 5, 8, tps=1000), rec("full", 0, 8, tps=1)]
    chain = cmap(records).chain()
    assert chain is not None and chain.peer_ids == ["full"]
    assert cmap(records).full_model_peers()[0].peer_id == "full"


def test_prefers_faster_and_lower_rtt_and_healthier():
    records = [rec("slow", 0, 8, tps=5), rec("fast", 0, 8, tps=50)]
    assert cmap(records).chain().peer_ids == ["fast"]
    rtt = {"slow": 1.0, "fast": 1000.0}  # 500 ms one-way outweighs 180 ms of compute difference
    assert cmap(records, rtt_ms=rtt).chain().peer_ids == ["slow"]
    score = {"slow": 1.0, "fast": 0.01}.__getitem__  # a bad reputation makes "fast" 100x costlier
    assert cmap(records, score=score).chain().peer_ids == ["slow"]
    assert cmap(records, score={"slow": 1.0, "fast": 0.0}.__getitem__).peers.keys() == {"slow"}


def test_expired_and_other_models_ignored_and_freshest_kept():
    records = [
        rec("a", 0, 8, announced_at=NOW - 200, ttl_s=100),  # expired
        rec("b", 0, 8, model="other"),
        rec("c", 0, 4, announced_at=NOW - 50),
        rec("c", 4, 8, announced_at=NOW - 5),  # c moved; the newer record wins
    ]
    m = cmap(records, model_id="m")
    assert set(m.peers) == {"c"} and m.peers["c"].span == (4, 8)
    assert m.chain() is None


def test_best_route_by_hand_on_ten_peers():
    # 16 layers, RTT 0: a hop costs 1000 / tps ms (its whole span at its measured tok/s).
    # p0 [0,16) 250 | p1 [0,4) 100 | p2 [0,8) 200 | p3 [4,8) 50 | p4 [4,12) 250
    # p5 [8,12) 25  | p6 [8,16) 100 | p7 [12,16) 40 | p8 [8,16) 125 | p9 [0,8) 125
    # By hand: p1+p3+p5+p7 = 215, p9+p6 = 225, p0 = 250, p9+p5+p7 = 190 <- best.
    spans = [
        (0, 16, 4),
        (0, 4, 10),
        (0, 8, 5),
        (4, 8, 20),
        (4, 12, 4),
        (8, 12, 40),
        (8, 16, 10),
        (12, 16, 25),
        (8, 16, 8),
        (0, 8, 8),
    ]
    records = [rec(f"p{i}", a, b, tps=t, total=16) for i, (a, b, t) in enumerate(spans)]
    chain = cmap(records).chain()
    assert chain.peer_ids == ["p9", "p5", "p7"]
    assert chain.cost_ms == pytest.approx(190.0)
    # Brute force over all subsets of peers confirms 190 ms is optimal.
    best = min(
        sum(1000 / (r.throughput_tps) for r in combo)
        for k in range(1, 5)
        for combo in itertools.permutations(records, k)
        if is_valid_chain([Hop(r, r.start, r.end) for r in combo], 16)
    )
    assert best == pytest.approx(190.0)
    # With one-way latency 30 ms per hop, fewer hops win: p0 alone 250+30 vs p9,p5,p7 190+90.
    slow = cmap(records, rtt_ms=lambda _p: 60.0).chain()
    assert slow.peer_ids == ["p0"] and slow.cost_ms == pytest.approx(280.0)


def test_replacement_covers_exactly_the_failed_span():
    records = [rec("a", 0, 4), rec("b", 4, 8), rec("b1", 4, 6), rec("b2", 6, 8), rec("x", 2, 6)]
    m = cmap(records)
    rep = m.replacement_for((4, 8), exclude={"b"})
    assert rep.peer_ids == ["b1", "b2"] and rep.spans == [(4, 6), (6, 8)]
    assert m.replacement_for((4, 8), exclude={"b", "b1"}) is None  # x holds [2,6): not exact
    partial = cmap(records, allow_partial=True).replacement_for((4, 8), exclude={"b", "b1"})
    assert partial.spans == [(4, 6), (6, 8)] and partial.peer_ids == ["x", "b2"]
    with pytest.raises(ValueError):
        m.replacement_for((6, 9))


def test_chain_problems_name_what_is_wrong():
    a, b, c = rec("a", 0, 4), rec("b", 4, 8), rec("c", 0, 4, total=16)
    assert chain_problems([Hop(a, 0, 4), Hop(b, 4, 8)], L) == []
    assert "starts at layer 4, expected 0" in chain_problems([Hop(b, 4, 8), Hop(a, 0, 4)], L)[0]
    assert any("ends at layer 4" in p for p in chain_problems([Hop(a, 0, 4)], L))
    assert any("outside a's span" in p for p in chain_problems([Hop(a, 0, 5), Hop(b, 5, 8)], L))
    assert any("16-layer model" in p for p in chain_problems([Hop(c, 0, 4), Hop(b, 4, 8)], L))
    assert any("appears twice" in p for p in chain_problems([Hop(a, 0, 2), Hop(a, 2, 4), Hop(b, 4, 8)], L))
    assert any("serves m" in p for p in chain_problems([Hop(a, 0, 4), Hop(b, 4, 8)], L, model_id="n"))
    assert not is_valid_chain(Chain(()), L)


def test_degradation_to_nearest_smaller_covered_model():
    big = cmap([rec("b0", 0, 4, total=8, model="big")], model_id="big", total_layers=8)
    mid = cmap([rec("m0", 0, 2, total=4, model="mid")], model_id="mid", total_layers=4)
    small = cmap([rec("s0", 0, 2, total=2, model="small")], model_id="small", total_layers=2)
    tiny = cmap([rec("t0", 0, 1, total=1, model="tiny")], model_id="tiny", total_layers=1)
    order = ["huge", "big", "mid", "small", "tiny"]
    maps = {"big": big, "mid": mid, "small": small, "tiny": tiny}
    choice = nearest_covered_model("big", order, maps)
    assert choice.model_id == "small"
    assert "big has no peer for layers [4, 8)" in choice.reason and "serving small" in choice.reason
    assert nearest_covered_model("small", order, maps).reason is None
    assert nearest_covered_model("huge", order, maps).reason.startswith("huge has no peers")
    # Never degrades upward, and a model outside the catalog has nothing to fall back to.
    assert nearest_covered_model("tiny", order, maps, exclude={"t0"}) is None
    assert nearest_covered_model("unknown", order, maps) is None


def test_spread_picks_among_near_equal_peers():
    records = [rec(f"p{i}", 0, 8, tps=10.0 + i * 0.01) for i in range(5)] + [rec("slow", 0, 8, tps=1)]
    m = LayerCoverageMap(records, now=NOW, rtt_ms={}, tunables=RouteTunables(spread=0.05))
    rng = random.Random(0)
    picked = {m.chain(rng=rng).peer_ids[0] for _ in range(200)}
    assert picked == {f"p{i}" for i in range(5)}
    assert m.chain().peer_ids == ["p4"]  # no rng: deterministic best


def test_ban_list_plugs_in_as_exclude_and_expires():
    from openhydra.router.bans import BanList

    clock = [0.0]
    bans = BanList(clock=lambda: clock[0])
    m = cmap([rec("a", 0, 8, tps=100), rec("a2", 0, 8, tps=1)])
    bans.ban("a")
    assert m.chain(exclude=bans).peer_ids == ["a2"]
    clock[0] += 1.01  # first ban lasts 1 s
    assert m.chain(exclude=bans).peer_ids == ["a"]


def test_coverage_report_for_network_status():
    report = cmap([rec("a", 0, 4, tps=3), rec("b", 2, 6, tps=4)]).coverage()
    d = report.to_dict()
    assert d["counts"] == [1, 1, 2, 2, 1, 1, 0, 0] and d["holes"] == [[6, 8]] and d["complete"] is False
    assert d["throughput_tps"] == [3, 3, 7, 7, 4, 4, 0, 0] and d["peers"] == 2


def test_partial_path_never_revisits_a_peer():
    # With free hops, X [0,8) slow and Y [2,6) fast: X[0,2) Y[2,6) X[6,8) is "cheapest" but reuses X.
    records = [rec("x", 0, 8, tps=1), rec("y", 2, 6, tps=100)]
    chain = cmap(records, allow_partial=True).chain()
    assert chain.peer_ids == ["x"] and chain.spans == [(0, 8)] and is_valid_chain(chain, L)
    assert chain.cost_ms == pytest.approx(1000.0)


def test_peer_table_lists_every_peer_with_its_span():
    rows = cmap([rec("b", 4, 8, tps=2), rec("a", 0, 4, tps=4)]).peer_table(exclude={"b"})
    assert [(r["peer_id"], r["start"], r["end"], r["excluded"]) for r in rows] == [
        ("a", 0, 4, False),
        ("b", 4, 8, True),
    ]
    assert rows[0]["est_span_ms"] == pytest.approx(250.0) and rows[1]["grpc_address"] == "127.0.0.1:50051"
