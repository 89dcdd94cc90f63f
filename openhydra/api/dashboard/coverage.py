"""Layer coverage of each model the node can serve, for the dashboard's map (one bar per peer over [0, L)).

The node's own model is read from its SwarmPipeline (the same peers and coverage the router uses); its
degradation fallbacks are looked up in discovery, at most once per ``LOOKUP_TTL_S`` so a dashboard
polling every 2 s does not double the DHT traffic. A node outside any swarm shows itself alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel

from openhydra.router.coverage import LayerCoverageMap

log = logging.getLogger(__name__)

LOOKUP_TTL_S = 5.0
LOOKUP_TIMEOUT_S = 5.0
_fallback_cache: dict[tuple[int, str], tuple[float, list[Any]]] = {}


class PeerBar(BaseModel):
    peer_id: str
    start: int
    end: int
    grpc_address: str | None = None
    api_address: str | None = None
    dtype: str | None = None
    backend: str | None = None
    """The arithmetic its span computes with (the record's ``backend``: "pytorch", "pytorch-int4-lowbit3", ...)."""
    load: float = 0.0
    active_sessions: int = 0
    throughput_tps: float = 0.0
    age_s: float | None = None
    banned: bool = False
    is_self: bool = False


class ModelCoverage(BaseModel):
    model_id: str
    role: str
    """served (this node's model), fallback (a degradation target) or local (no swarm)."""
    total_layers: int
    complete: bool
    holes: list[tuple[int, int]]
    counts: list[int]
    """Peers covering each layer."""
    peers: list[PeerBar]
    error: str | None = None


def _latest_live(records: list[Any], now: float) -> list[Any]:
    latest: dict[str, Any] = {}
    for r in records:
        if r.announced_at + r.ttl_s <= now:
            continue
        old = latest.get(r.peer_id)
        if old is None or r.announced_at > old.announced_at:
            latest[r.peer_id] = r
    return sorted(latest.values(), key=lambda r: (r.start, r.end, r.peer_id))


def _bars(records: list[Any], now: float, banned: frozenset[str], self_address: str | None) -> list[PeerBar]:
    return [
        PeerBar(peer_id=r.peer_id, start=r.start, end=r.end, grpc_address=r.grpc_address,
                api_address=r.api_address, dtype=r.dtype, backend=r.backend, load=r.load,
                active_sessions=r.active_sessions,
                throughput_tps=r.throughput_tps, age_s=round(now - r.announced_at, 1), banned=r.peer_id in banned,
                is_self=self_address is not None and r.grpc_address == self_address)
        for r in _latest_live(records, now)
    ]


def _entry(model_id: str, role: str, records: list[Any], banned: frozenset[str], self_address: str | None,
           total_layers: int | None = None) -> ModelCoverage:
    now = time.time()
    cmap = LayerCoverageMap(records, total_layers, model_id=model_id, now=now)
    report = cmap.coverage(exclude=banned)
    return ModelCoverage(model_id=model_id, role=role, total_layers=report.total_layers, complete=report.complete,
                         holes=[tuple(h) for h in report.holes], counts=report.counts,
                         peers=_bars([r for r in records if r.model_id == model_id], now, banned, self_address))


def _fallback_records(node: Any, model_id: str) -> list[Any]:
    key = (id(node), model_id)
    cached = _fallback_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < LOOKUP_TTL_S:
        return cached[1]
    records = node.background.run(node.discovery.lookup(model_id), timeout=LOOKUP_TIMEOUT_S)
    records = [r for r in records if r.model_id == model_id]
    _fallback_cache[key] = (time.monotonic(), records)
    return records


def model_coverage(state: Any, node: Any) -> list[ModelCoverage]:
    """Coverage of the node's model, then of each degradation fallback. Blocking (discovery lookups)."""
    model = state.model
    swarm = getattr(node, "swarm", None)
    if swarm is None:
        if model is None:
            return []
        n = model.num_layers
        me = PeerBar(peer_id="this node", start=model.span[0], end=model.span[1], dtype=model.dtype, is_self=True)
        return [ModelCoverage(model_id=model.id, role="local", total_layers=n, complete=model.span == (0, n),
                              holes=[] if model.span == (0, n) else [(model.span[1], n)], counts=[1] * n,
                              peers=[me])]
    self_address = getattr(node.peer_server, "address", None)
    out: list[ModelCoverage] = []
    try:
        out.append(_entry(swarm.model_id, "served", swarm.peers(), swarm.bans.banned(), self_address,
                          swarm.total_layers))
    except Exception as exc:  # discovery down: say so on the map instead of failing the summary
        log.warning("dashboard: coverage of %s failed: %s", swarm.model_id, exc)
        out.append(ModelCoverage(model_id=swarm.model_id, role="served", total_layers=swarm.total_layers,
                                 complete=False, holes=[(0, swarm.total_layers)], counts=[0] * swarm.total_layers,
                                 peers=[], error=f"{type(exc).__name__}: {exc}"))
    degrader = state.degrader
    for fallback_id in getattr(degrader, "fallbacks", None) or []:
        try:
            out.append(_entry(fallback_id, "fallback", _fallback_records(node, fallback_id), swarm.bans.banned(),
                              self_address))
        except Exception as exc:
            log.warning("dashboard: coverage of fallback %s failed: %s", fallback_id, exc)
            out.append(ModelCoverage(model_id=fallback_id, role="fallback", total_layers=0, complete=False,
                                     holes=[], counts=[], peers=[], error=f"{type(exc).__name__}: {exc}"))
    return out
