"""What a simulation run measures, and the summary it reports (plain dicts, JSON-ready)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[k]


def gini(values: Sequence[float]) -> float:
    """Gini coefficient of non-negative values: 0 = perfectly even, ->1 = one holds everything."""
    xs = sorted(v for v in values if v >= 0)
    n = len(xs)
    total = sum(xs)
    if n == 0 or total <= 0:
        return 0.0
    weighted = sum((i + 1) * x for i, x in enumerate(xs))
    return (2.0 * weighted) / (n * total) - (n + 1.0) / n


@dataclass
class CoverageSample:
    t: float
    model: str
    live_peers: int
    holes_layers: int  # layers no live peer covers (the truth)
    dht_holes_layers: int  # layers no DHT record covers (what coordinators see; stale records hide holes)
    min_peers_per_layer: int


@dataclass
class Metrics:
    requests: int = 0
    succeeded: int = 0
    degraded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    token_ms: list[float] = field(default_factory=list)  # chosen route, per token
    best_token_ms: list[float] = field(default_factory=list)  # best possible, same requests (paired)
    paired_ratio: list[float] = field(default_factory=list)  # chosen / best
    ttft_ms: list[float] = field(default_factory=list)
    recovery_ms: list[float] = field(default_factory=list)  # peer left -> next token at the client
    failovers: int = 0
    banned: list[str] = field(default_factory=list)  # peers banned by a coordinator, in order
    sessions_hit: int = 0  # sessions that lost a peer mid-request
    forced_leaves: int = 0  # peers made to leave while serving (measure.kill_busy_every_s)
    dead_on_route: int = 0  # chains that named a peer already gone (stale record)
    route_choice_ms: list[float] = field(default_factory=list)  # chain/replacement choice, wall clock
    route_choice_cpu_ms: list[float] = field(default_factory=list)  # same, CPU time, on a map already used
    route_choice_first_cpu_ms: list[float] = field(default_factory=list)  # first choice on a fresh map
    coverage: list[CoverageSample] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        done = self.succeeded + sum(self.failed.values())
        return {
            "requests": self.requests,
            "finished": done,
            "succeeded": self.succeeded,
            "success_rate": self.succeeded / done if done else math.nan,
            "degraded": self.degraded,
            "failed": dict(self.failed),
            "token_ms_p50": percentile(self.token_ms, 50),
            "token_ms_p99": percentile(self.token_ms, 99),
            "best_token_ms_p50": percentile(self.best_token_ms, 50),
            "best_token_ms_p99": percentile(self.best_token_ms, 99),
            "chosen_over_best_p50": percentile(self.paired_ratio, 50),
            "chosen_over_best_p99": percentile(self.paired_ratio, 99),
            "ttft_ms_p50": percentile(self.ttft_ms, 50),
            "failovers": self.failovers,
            "sessions_hit": self.sessions_hit,
            "forced_leaves": self.forced_leaves,
            "dead_on_route": self.dead_on_route,
            "recovery_ms_p50": percentile(self.recovery_ms, 50),
            "recovery_ms_p99": percentile(self.recovery_ms, 99),
            "recovery_ms_max": max(self.recovery_ms) if self.recovery_ms else math.nan,
            "route_choice_ms_p50": percentile(self.route_choice_ms, 50),
            "route_choice_ms_p99": percentile(self.route_choice_ms, 99),
            "route_choice_ms_max": max(self.route_choice_ms) if self.route_choice_ms else math.nan,
            "route_choice_cpu_ms_p50": percentile(self.route_choice_cpu_ms, 50),
            "route_choice_cpu_ms_p99": percentile(self.route_choice_cpu_ms, 99),
            "first_route_choice_cpu_ms_p50": percentile(self.route_choice_first_cpu_ms, 50),
            "first_route_choice_cpu_ms_p99": percentile(self.route_choice_first_cpu_ms, 99),
        }
