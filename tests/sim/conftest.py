"""Hand-built worlds for the simulator tests: two regions 100 ms apart, no last-mile latency."""

from __future__ import annotations

import pytest

from openhydra.sim.config import SimConfig
from openhydra.sim.world import Host, SimPeer


def tiny_config(**overrides) -> SimConfig:
    data = {
        "peers": 0,
        "horizon_s": 60.0,
        "churn_per_hour": 0.0,
        "request_rate_per_s": 1.0,
        "coordinators": 1,
        "prompt_tokens": [64, 64],
        "new_tokens": [100, 100],
        "request_mix": {"big": 1.0},
        "models": {"big": {"layers": 8, "memory_gb": 8, "peers": 1, "weights_gb": 8},
                   "small": {"layers": 4, "memory_gb": 1, "peers": 1, "weights_gb": 1}},
        "hardware": {"box": {"share": 1.0, "memory_gb": 8, "bandwidth_gbs": 100}},
        "regions": {"names": ["here", "far"], "weights": [1.0, 0.0], "access_rtt_ms": [0.0, 0.0],
                    "rtt_ms": [[0, 100], [100, 0]]},
        "measure": {"kill_busy_every_s": 0.0},
    }
    for key, value in overrides.items():
        if key in ("measure", "routing", "discovery", "compute") and key in data:
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return SimConfig.model_validate(data)


def make_peer(name: str, span: tuple[int, int], layer_ms: float, region: int = 0, model: str = "big",
              total: int = 8) -> SimPeer:
    return SimPeer(index=0, peer_id=name, tier="box", host=Host(region, 0.0), model=model, start=span[0],
                   end=span[1], total_layers=total, layer_ms=layer_ms,
                   announced_tps=1000.0 / (layer_ms * (span[1] - span[0])), max_sessions=8, joined_at=0.0)


@pytest.fixture
def cfg() -> SimConfig:
    return tiny_config()
