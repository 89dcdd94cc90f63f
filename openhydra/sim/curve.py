"""Coverage as ``shard=auto`` newcomers join: the real ``choose_span``, one peer at a time.

Newcomers of the hardware tiers promoted to one model join an empty swarm in turn; each picks its
span with ``choose_span`` over the records announced so far (Petals' rule: lift the weakest layers
first). For comparison the same newcomers (same hardware, same order) pick a uniformly random
start instead. After each join we record the per-layer summed throughput: the pipeline's ceiling is
its weakest layer, so ``min / mean`` near 1 means coverage evened out, and uncovered layers are holes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from openhydra.router.spans import choose_span, layer_throughput
from openhydra.sim.config import SimConfig
from openhydra.sim.world import EPOCH, World


@dataclass
class CurvePoint:
    joined: int
    holes: int  # uncovered layers
    min_tps: float  # weakest layer's summed throughput, tok/s
    mean_tps: float

    @property
    def evenness(self) -> float:
        return self.min_tps / self.mean_tps if self.mean_tps > 0 else 0.0


@dataclass
class Curve:
    model: str
    total_layers: int
    auto: list[CurvePoint]
    random: list[CurvePoint]
    profiles: dict[int, list[float]]  # joined -> per-layer throughput (shard=auto), at checkpoints

    def to_dict(self) -> dict[str, object]:
        def rows(points: list[CurvePoint]) -> list[list[float]]:
            return [[p.joined, p.holes, round(p.min_tps, 3), round(p.mean_tps, 3)] for p in points]

        return {"model": self.model, "total_layers": self.total_layers, "columns": ["joined", "holes", "min", "mean"],
                "auto": rows(self.auto), "random": rows(self.random),
                "profiles": {str(k): [round(v, 3) for v in p] for k, p in self.profiles.items()}}


def coverage_curve(cfg: SimConfig, newcomers: int, seed: int = 0, model: str | None = None,
                   checkpoints: tuple[int, ...] = (5, 20, 100, 1000)) -> Curve:
    model = model or cfg.catalog_order[0]
    total = cfg.models[model].layers
    tiers = [name for name, hw in cfg.hardware.items() if cfg.promote(hw) == model]
    if not tiers:
        raise ValueError(f"no hardware tier is promoted to {model}")
    weights = [cfg.hardware[t].share for t in tiers]
    rng = random.Random(seed)
    world = World(cfg, rng)
    auto_records: list = []
    random_records: list = []
    auto_pts, random_pts, profiles = [], [], {}
    for i in range(newcomers):
        tier = rng.choices(tiers, weights=weights)[0]
        size = cfg.max_layers(cfg.hardware[tier], model)
        host = world.new_host()
        span = choose_span(auto_records, total, size, model_id=model, now=EPOCH)
        peer = world.make_peer(i, tier, model, span, 0.0, host)
        auto_records.append(peer.record(0.0, 1e6 / 100))
        start = rng.randint(0, total - size)
        other = world.make_peer(i, tier, model, (start, start + size), 0.0, host)
        other.announced_tps = peer.announced_tps
        random_records.append(other.record(0.0, 1e6 / 100))
        auto_tp = layer_throughput(auto_records, total, model_id=model, now=EPOCH)
        auto_pts.append(_point(i + 1, auto_tp))
        random_pts.append(_point(i + 1, layer_throughput(random_records, total, model_id=model, now=EPOCH)))
        if i + 1 in checkpoints:
            profiles[i + 1] = auto_tp
    return Curve(model, total, auto_pts, random_pts, profiles)


def _point(joined: int, tp: list[float]) -> CurvePoint:
    return CurvePoint(joined, sum(1 for t in tp if t <= 0), min(tp), sum(tp) / len(tp))
