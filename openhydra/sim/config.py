"""The ``sim`` config group (conf/sim/*.yaml): one strict schema for every simulated world.

Units are in the names (``_s`` seconds, ``_ms`` milliseconds, ``_gb`` gigabytes, ``_gbs`` GB/s).
Unknown keys are errors, so a typo in an override names the key instead of being ignored.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class DiscoverySim(_Strict):
    announce_interval_s: float = Field(60.0, gt=0)
    ttl_s: float = Field(180.0, gt=0)
    lookup_ttl_s: float = Field(10.0, ge=0)


class RoutingSim(_Strict):
    allow_partial: bool = True
    spread: float = Field(0.0, ge=0)
    load_penalty: float = Field(1.0, ge=0)
    max_failovers_per_step: int = Field(4, ge=0)
    route_wait_s: float = Field(6.0, ge=0)
    retry_every_s: float = Field(1.0, gt=0)
    crash_detect_s: float = Field(2.0, ge=0)
    ban_initial_s: float = Field(1.0, gt=0)
    ban_max_s: float = Field(60.0, gt=0)


class ComputeSim(_Strict):
    efficiency: float = Field(0.6, gt=0, le=1)
    prefill_parallel: float = Field(64.0, gt=0)
    max_sessions: int = Field(8, ge=1)
    throughput_noise: float = Field(0.1, ge=0, lt=1)


class MeasureSim(_Strict):
    sample_s: float = Field(30.0, gt=0)
    best_route_fraction: float = Field(1.0, ge=0, le=1)
    kill_busy_every_s: float = Field(0.0, ge=0)  # 0 = off; else a peer serving a session leaves this often


class ModelSim(_Strict):
    layers: int = Field(ge=1)
    memory_gb: float = Field(gt=0)  # per peer, as the spec's catalog says
    peers: int = Field(1, ge=1)  # peers the catalog splits it over
    weights_gb: float = Field(gt=0)  # bytes a decode step reads (all layers)

    @property
    def layer_memory_gb(self) -> float:
        return self.memory_gb * self.peers / self.layers

    @property
    def layer_weights_gb(self) -> float:
        return self.weights_gb / self.layers


class HardwareSim(_Strict):
    share: float = Field(ge=0)
    memory_gb: float = Field(gt=0)  # memory a node gives to model weights
    bandwidth_gbs: float = Field(gt=0)


class RegionsSim(_Strict):
    names: list[str] = Field(min_length=1)
    weights: list[float]
    access_rtt_ms: tuple[float, float] = (2.0, 20.0)
    rtt_ms: list[list[float]]

    @model_validator(mode="after")
    def _square(self) -> RegionsSim:
        n = len(self.names)
        if len(self.weights) != n:
            raise ValueError(f"regions.weights has {len(self.weights)} entries, expected {n}")
        if len(self.rtt_ms) != n or any(len(row) != n for row in self.rtt_ms):
            raise ValueError(f"regions.rtt_ms must be a {n}x{n} matrix")
        for i in range(n):
            for j in range(n):
                if self.rtt_ms[i][j] != self.rtt_ms[j][i] or self.rtt_ms[i][j] < 0:
                    raise ValueError(f"regions.rtt_ms must be symmetric and >= 0 (at [{i}][{j}])")
        return self


class SimConfig(_Strict):
    peers: int = Field(ge=0, le=1_000_000)  # initial swarm (0: scripted scenarios)
    horizon_s: float = Field(gt=0)
    churn_per_hour: float = Field(ge=0)
    graceful_fraction: float = Field(0.5, ge=0, le=1)
    request_rate_per_s: float = Field(gt=0)
    coordinators: int = Field(8, ge=1)
    prompt_tokens: tuple[int, int] = (64, 512)
    new_tokens: tuple[int, int] = (32, 256)
    request_mix: dict[str, float]
    discovery: DiscoverySim = DiscoverySim()
    routing: RoutingSim = RoutingSim()
    compute: ComputeSim = ComputeSim()
    measure: MeasureSim = MeasureSim()
    models: dict[str, ModelSim]  # catalog order: largest first
    hardware: dict[str, HardwareSim]
    regions: RegionsSim

    @model_validator(mode="after")
    def _consistent(self) -> SimConfig:
        for name in self.request_mix:
            if name not in self.models:
                raise ValueError(f"request_mix names {name!r}; models are {sorted(self.models)}")
        if not math.isclose(sum(h.share for h in self.hardware.values()), 1.0, abs_tol=1e-6):
            raise ValueError("hardware shares must sum to 1")
        for lo, hi, key in ((*self.prompt_tokens, "prompt_tokens"), (*self.new_tokens, "new_tokens")):
            if not 1 <= lo <= hi:
                raise ValueError(f"{key} must be [low, high] with 1 <= low <= high")
        return self

    @property
    def catalog_order(self) -> list[str]:
        return list(self.models)

    def promote(self, hw: HardwareSim) -> str | None:
        """Auto-promotion: the largest model whose per-peer memory fits this hardware."""
        for name, model in self.models.items():
            if model.memory_gb <= hw.memory_gb:
                return name
        return None

    def max_layers(self, hw: HardwareSim, model: str) -> int:
        m = self.models[model]
        return max(1, min(m.layers, int(hw.memory_gb / m.layer_memory_gb + 1e-9)))
