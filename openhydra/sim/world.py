"""The simulated world: regions with a latency matrix, hardware tiers, and the peers drawn from them.

Latency between two hosts is the inter-region RTT plus each host's own last-mile RTT; one-way
latency is half of it. A peer's decode compute per layer comes from memory bandwidth (DESIGN §4:
decode is bandwidth bound): bytes of one layer's weights / (bandwidth x efficiency).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from openhydra.discovery.records import PeerAnnouncement
from openhydra.sim.config import SimConfig

EPOCH = 1_800_000_000.0  # simulated time 0 as unix time (records carry unix timestamps)


@dataclass
class Host:
    region: int
    access_ms: float  # last-mile RTT, ms


@dataclass
class SimPeer:
    index: int
    peer_id: str
    tier: str
    host: Host
    model: str
    start: int
    end: int
    total_layers: int
    layer_ms: float  # true decode compute per layer at no load, ms
    announced_tps: float  # throughput it measured and announces, tok/s over its span
    max_sessions: int
    joined_at: float
    alive: bool = True
    left_at: float | None = None
    active: int = 0  # sessions routed through it now
    busy_ms: float = 0.0  # compute time it spent, ms (load spread)
    sessions: set[int] = field(default_factory=set)

    @property
    def load(self) -> float:
        return min(1.0, self.active / self.max_sessions)

    def record(self, t: float, ttl_s: float) -> PeerAnnouncement:
        return PeerAnnouncement(
            peer_id=self.peer_id,
            model_id=self.model,
            start=self.start,
            end=self.end,
            total_layers=self.total_layers,
            grpc_address=f"10.{self.index // 65536 % 256}.{self.index // 256 % 256}.{self.index % 256}:50051",
            throughput_tps=round(self.announced_tps, 6),
            load=round(self.load, 6),
            active_sessions=self.active,
            announced_at=EPOCH + t,
            ttl_s=ttl_s,
        )


class World:
    """Regions, latency, and how new hosts and peers are drawn (one seeded RNG stream)."""

    def __init__(self, cfg: SimConfig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng
        self.rtt = np.asarray(cfg.regions.rtt_ms, dtype=float)  # [R, R] ms
        self.region_names = list(cfg.regions.names)
        self._tiers = list(cfg.hardware.items())
        self._tier_weights = [h.share for _, h in self._tiers]

    def new_host(self) -> Host:
        r = self.rng.choices(range(len(self.region_names)), weights=self.cfg.regions.weights)[0]
        lo, hi = self.cfg.regions.access_rtt_ms
        return Host(r, self.rng.uniform(lo, hi))

    def one_way_ms(self, a: Host, b: Host) -> float:
        return (self.rtt[a.region, b.region] + a.access_ms + b.access_ms) / 2.0

    def rtt_ms(self, a: Host, b: Host) -> float:
        return self.rtt[a.region, b.region] + a.access_ms + b.access_ms

    def draw_tier(self) -> str:
        return self.rng.choices(self._tiers, weights=self._tier_weights)[0][0]

    def layer_ms(self, tier: str, model: str) -> float:
        hw, m = self.cfg.hardware[tier], self.cfg.models[model]
        return m.layer_weights_gb / (hw.bandwidth_gbs * self.cfg.compute.efficiency) * 1000.0

    def make_peer(self, index: int, tier: str, model: str, span: tuple[int, int], t: float, host: Host) -> SimPeer:
        layer_ms = self.layer_ms(tier, model)
        noise = self.cfg.compute.throughput_noise
        true_tps = 1000.0 / (layer_ms * (span[1] - span[0]))
        return SimPeer(
            index=index,
            peer_id=f"p{index}",
            tier=tier,
            host=host,
            model=model,
            start=span[0],
            end=span[1],
            total_layers=self.cfg.models[model].layers,
            layer_ms=layer_ms,
            announced_tps=true_tps * self.rng.uniform(1 - noise, 1 + noise),
            max_sessions=self.cfg.compute.max_sessions,
            joined_at=t,
        )
