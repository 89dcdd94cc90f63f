"""The event loop on scripted scenarios (numbers worked out by hand) and on seeded random swarms."""

from __future__ import annotations

import pytest

from openhydra.sim.engine import Simulation
from tests.sim.conftest import make_peer, tiny_config


def scripted(cfg, peers):
    sim = Simulation(cfg, seed=0)
    for p in peers:
        sim.swarm.add(p)
    return sim


def test_one_request_on_a_single_path_takes_prefill_plus_decode(cfg):
    sim = scripted(cfg, [make_peer("a", (0, 4), 1.0), make_peer("b", (4, 8), 1.0)])
    sim.schedule_request(0.0, "big", prompt=64, new_tokens=100)
    m = sim.run(arrivals=False)
    assert (m.requests, m.succeeded, m.failovers) == (1, 1, 0)
    assert m.token_ms == [pytest.approx(8.0)]  # 4 + 4 ms compute, no latency
    assert m.ttft_ms == [pytest.approx(16.0)]  # prefill of 64 tokens = (1 + 64/64) decode steps
    assert m.paired_ratio == [pytest.approx(1.0)]
    assert sim.swarm.peers["a"].busy_ms == pytest.approx(100 * 4.0)  # 100 tokens x 4 layers x 1 ms


def test_crash_mid_request_is_banned_replaced_and_replayed(cfg):
    a, b, backup = make_peer("a", (0, 4), 1.0), make_peer("b", (4, 8), 1.0), make_peer("b2", (4, 8), 2.0)
    sim = scripted(cfg, [a, b, backup])
    sim.schedule_request(0.0, "big", prompt=64, new_tokens=100)
    sim.schedule_leave(0.5, b, graceful=False)
    m = sim.run(arrivals=False)
    assert (m.succeeded, m.failovers, m.sessions_hit) == (1, 1, 1)
    # At 0.5 s the client has 1 + floor((500 - 16) / 8) = 61 tokens. The crash is noticed after
    # crash_detect_s = 2 s; b2 replaces [4, 8) and the replay prefills 64 + 61 tokens through a (4 ms)
    # and b2 (8 ms): 12 * (1 + 125/64) ms. Recovery = 2000 + 35.4375 ms.
    assert m.recovery_ms == [pytest.approx(2035.4375)]
    assert m.banned == ["b"]
    assert backup.busy_ms == pytest.approx((100 - 61) * 4 * 2.0)


def test_graceful_leave_recovers_without_the_crash_deadline(cfg):
    a, b, backup = make_peer("a", (0, 4), 1.0), make_peer("b", (4, 8), 1.0), make_peer("b2", (4, 8), 2.0)
    sim = scripted(cfg, [a, b, backup])
    sim.schedule_request(0.0, "big", prompt=64, new_tokens=100)
    sim.schedule_leave(0.5, b, graceful=True)
    m = sim.run(arrivals=False)
    assert m.recovery_ms == [pytest.approx(35.4375)]


def test_stale_record_of_a_crashed_peer_costs_one_deadline_then_routes_around(cfg):
    fast, slow = make_peer("fast", (0, 8), 0.5), make_peer("slow", (0, 8), 1.0)
    sim = scripted(cfg, [fast, slow])
    sim.schedule_leave(0.1, fast, graceful=False)  # its record stays in the DHT until ttl_s
    sim.schedule_request(1.0, "big", prompt=64, new_tokens=10)
    m = sim.run(arrivals=False)
    assert (m.succeeded, m.dead_on_route, m.failovers) == (1, 1, 1)
    assert m.ttft_ms == [pytest.approx(2000.0 + 16.0)]  # one crash deadline, then prefill on "slow"


def test_coverage_hole_degrades_to_the_nearest_smaller_covered_model(cfg):
    peers = [make_peer("a", (0, 4), 1.0), make_peer("c", (5, 8), 1.0),
             make_peer("s", (0, 4), 1.0, model="small", total=4)]
    sim = scripted(cfg, peers)
    sim.schedule_request(0.0, "big", prompt=8, new_tokens=4)
    m = sim.run(arrivals=False)
    assert (m.succeeded, m.degraded) == (1, 1)


def test_coverage_hole_without_a_fallback_fails_after_the_route_wait(cfg):
    sim = scripted(cfg, [make_peer("a", (0, 4), 1.0), make_peer("c", (5, 8), 1.0)])
    sim.schedule_request(0.0, "big", prompt=8, new_tokens=4)
    m = sim.run(arrivals=False)
    assert m.succeeded == 0 and m.failed == {"no_route": 1}
    assert next(c.holes_layers for c in m.coverage if c.model == "big") == 1


def test_no_replacement_for_the_failed_span_fails_the_request(cfg):
    a, b = make_peer("a", (0, 4), 1.0), make_peer("b", (4, 8), 1.0)
    sim = scripted(cfg, [a, b])
    sim.schedule_request(0.0, "big", prompt=64, new_tokens=100)
    sim.schedule_leave(0.5, b, graceful=True)
    m = sim.run(arrivals=False)
    assert m.failed == {"no_route": 1} and m.recovery_ms == []


def random_cfg(peers=150, **kw):
    base = {"peers": peers, "horizon_s": 300.0, "churn_per_hour": 2.0, "request_rate_per_s": 1.0,
            "coordinators": 3, "prompt_tokens": [16, 64], "new_tokens": [16, 64],
            "measure": {"kill_busy_every_s": 20.0, "sample_s": 30.0},
            "models": {"big": {"layers": 16, "memory_gb": 4, "peers": 4, "weights_gb": 8},
                       "small": {"layers": 8, "memory_gb": 2, "peers": 1, "weights_gb": 1}},
            "hardware": {"slow": {"share": 0.5, "memory_gb": 5, "bandwidth_gbs": 50},
                         "fast": {"share": 0.3, "memory_gb": 9, "bandwidth_gbs": 500},
                         "tiny": {"share": 0.2, "memory_gb": 2, "bandwidth_gbs": 20}},
            "regions": {"names": ["a", "b"], "weights": [0.6, 0.4], "access_rtt_ms": [2.0, 20.0],
                        "rtt_ms": [[8, 120], [120, 8]]}}
    base.update(kw)
    return tiny_config(**base)


def strip_wall_clock(report):
    timing = ("choice_ms", "choice_cpu_ms", "build_ms", "build_cpu_ms")
    return {k: v for k, v in report.items() if not any(t in k for t in timing) and k != "wall_s"}


def test_same_seed_same_results_other_seed_other_results():
    cfg = random_cfg()
    runs = []
    for seed in (7, 7, 8):
        sim = Simulation(cfg, seed=seed)
        sim.run()
        runs.append(strip_wall_clock(sim.report()))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert runs[0]["requests"] > 200 and runs[0]["forced_leaves"] > 5


def test_churn_with_replacements_keeps_requests_succeeding():
    sim = Simulation(random_cfg(), seed=1)
    sim.run()
    r = sim.report()
    assert r["success_rate"] >= 0.99
    assert r["sessions_hit"] > 0 and r["recovery_ms_p50"] is not None
    assert r["recovery_ms_p50"] < 5000  # crash deadline 2 s + replay, or a graceful close
    assert r["left"] > 0 and r["joined"] > 150
    assert r["chosen_over_best_p50"] >= 1.0 - 1e-9  # the truth's best is a lower bound
    assert r["models"]["big"]["samples_with_hole"] == 0


def test_load_spreading_lowers_the_gini():
    plain = Simulation(random_cfg(request_rate_per_s=3.0, measure={"kill_busy_every_s": 0.0}), seed=2)
    plain.run()
    spread = Simulation(random_cfg(request_rate_per_s=3.0, measure={"kill_busy_every_s": 0.0},
                                   routing={"spread": 0.5}), seed=2)
    spread.run()
    assert spread.load_gini("big") < plain.load_gini("big")
