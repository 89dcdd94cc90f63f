"""What the dashboard shows, gathered in one blocking call: the ``GET /v1/dashboard/summary`` answer.

Sections: node status and hardware, the served model and this node's span, load (sessions, steps the
peer server served), the API's own Prometheus counters, earnings (balance and economy section;
``economy=off`` reads as disabled, not as an error), the layer coverage of each model the node can
serve (its own and its degradation fallbacks: one bar per announced peer over [0, L)), and the same
provider sections as ``GET /v1/network/status`` (swarm, reputation, privacy, ...). Every section is
read defensively: one failing component shows its error and leaves the rest of the page alive.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import Any

from pydantic import BaseModel, Field
from sanic import Sanic

from openhydra import __version__
from openhydra.api.dashboard.coverage import ModelCoverage, model_coverage

log = logging.getLogger(__name__)


class ModelInfo(BaseModel):
    id: str
    source: str
    family: str
    dtype: str
    num_layers: int
    span: tuple[int, int]
    """This node's layers [start, end) of the model; (0, 0) for a coordinator that holds none."""
    parameter_count: int
    context_length: int
    degradation_reason: str | None = None


class NodeInfo(BaseModel):
    version: str
    ready: bool
    loading_stage: str
    load_error: str | None = None
    uptime_s: float
    requested_model: str | None = None
    model: ModelInfo | None = None
    peer_id: str | None = None
    grpc_address: str | None = None
    reachable: str | None = None
    """direct, relayed or unreachable, with the reason (peer/libp2p_transport.py Reachability)."""


class HardwareInfo(BaseModel):
    backend: str | None = None
    """The inference backend as the node describes it (device, dtype, threads, quantization)."""
    platform: str
    machine: str
    cpu_count: int
    memory_total_gb: float | None = None
    memory_available_gb: float | None = None
    torch_version: str | None = None
    torch_threads: int | None = None
    accelerators: list[str] = Field(default_factory=list)
    detected: str | None = None
    """The hardware profile's one-line summary, when the node registered one as ``state.extra["hardware"]``."""


class LoadInfo(BaseModel):
    active_sessions: int
    """Generations this node coordinates now."""
    peer_sessions: int | None = None
    """Sessions whose cache this node's peer server holds (its span, for any coordinator)."""
    steps_served: int | None = None
    steps_in_flight: int | None = None
    max_concurrent_sessions: int | None = None
    queued_requests: int = 0
    """Requests waiting for a generation slot (all api.max_concurrent_sessions taken)."""


class MetricsInfo(BaseModel):
    requests_total: float
    server_errors_total: float
    tokens_generated_total: float
    prompt_tokens_total: float
    ttft_avg_s: float | None = None
    stream_errors_total: float
    client_disconnects_total: float
    rate_limited_total: float


class EarningsInfo(BaseModel):
    enabled: bool
    mode: str
    balance: dict[str, Any] | None = None
    """This node's account in whole credits / HYDRA (as ``GET /v1/account/balance``)."""
    economy: dict[str, Any] | None = None
    """The economy section of ``GET /v1/network/status``."""
    error: str | None = None


class DashboardSummary(BaseModel):
    object: str = "dashboard.summary"
    generated_at: float
    node: NodeInfo
    hardware: HardwareInfo
    load: LoadInfo
    metrics: MetricsInfo
    earnings: EarningsInfo
    coverage: list[ModelCoverage]
    """One entry per model: the node's own first, then its degradation fallbacks."""
    network: dict[str, Any]
    """The provider sections of ``GET /v1/network/status`` by name (swarm, reputation, privacy, ...)."""


SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": sorted(name for name, f in DashboardSummary.model_fields.items() if f.is_required()),
    "properties": {name: {"type": "object"} for name in ("node", "hardware", "load", "metrics", "earnings",
                                                          "network")} | {"coverage": {"type": "array"}},
}
"""A flat response schema for /openapi.json (the nested pydantic $defs would dangle there)."""


def _swarm_node(state: Any) -> Any:
    """The Node object when it registered itself as the ``swarm`` provider (it does in a swarm)."""
    node = state.extra.get("swarm")
    return node if hasattr(node, "peer_server") else None


def _model_info(model: Any) -> ModelInfo | None:
    if model is None:
        return None
    return ModelInfo(id=model.id, source=model.source, family=model.family, dtype=model.dtype,
                     num_layers=model.num_layers, span=tuple(model.span), parameter_count=model.parameter_count,
                     context_length=model.context_length, degradation_reason=model.degradation_reason)


def _node_info(state: Any, node: Any) -> NodeInfo:
    info = NodeInfo(version=__version__, ready=state.ready, loading_stage=state.loading_stage,
                    load_error=state.load_error, uptime_s=round(time.time() - state.started_at, 1),
                    requested_model=state.requested_model, model=_model_info(state.model))
    if node is not None:
        configured = getattr(getattr(getattr(node, "cfg", None), "node", None), "peer_id", None)
        info.peer_id = configured or getattr(getattr(node, "identity", None), "peer_id", None)
        info.grpc_address = getattr(node.peer_server, "hop_address", None)
        reach = getattr(node, "reachability", None)
        if reach is not None:
            info.reachable = f"{reach.reachable} ({reach.transport}: {reach.reason})"
    return info


def _hardware_info(state: Any, node: Any) -> HardwareInfo:
    info = HardwareInfo(platform=f"{platform.system()} {platform.release()}", machine=platform.machine(),
                        cpu_count=os.cpu_count() or 1)
    profile_summary = getattr(state.extra.get("hardware"), "summary", None)
    if callable(profile_summary):
        info.detected = str(profile_summary())
    describe = getattr(getattr(node, "backend", None), "describe", None)
    if callable(describe):
        info.backend = describe()
    try:
        import psutil

        memory = psutil.virtual_memory()
        info.memory_total_gb = round(memory.total / 2**30, 2)
        info.memory_available_gb = round(memory.available / 2**30, 2)
    except (ImportError, OSError):
        pass
    try:
        import torch

        info.torch_version = torch.__version__
        info.torch_threads = torch.get_num_threads()
        if torch.cuda.is_available():
            info.accelerators = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            info.accelerators = ["Apple MPS"]
    except ImportError:
        pass
    return info


def _load_info(state: Any, node: Any, max_sessions: int) -> LoadInfo:
    engine = state.engine
    info = LoadInfo(active_sessions=len(engine.active_sessions) if engine is not None else 0,
                    max_concurrent_sessions=max_sessions, queued_requests=engine.queued if engine is not None else 0)
    service = getattr(getattr(node, "peer_server", None), "service", None)
    if service is not None:
        info.steps_served = int(getattr(service, "_served", 0))
        info.steps_in_flight = int(getattr(service, "_in_flight", 0))
        session_count = getattr(getattr(service, "runtime", None), "session_count", None)
        if callable(session_count):
            info.peer_sessions = int(session_count())
    return info


_READINESS_ROUTES = frozenset({"readyz", "/readyz"})  # its 503 while loading is an answer, not a failure


def _metric_sum(registry: Any, name: str, *, status_prefix: str | None = None) -> float:
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name != name:
                continue
            if status_prefix is not None and (not sample.labels.get("status", "").startswith(status_prefix)
                                              or sample.labels.get("route") in _READINESS_ROUTES):
                continue
            total += sample.value
    return total


def _metrics_info(metrics: Any) -> MetricsInfo:
    r = metrics.registry
    ttft_sum = _metric_sum(r, "openhydra_time_to_first_token_seconds_sum")
    ttft_count = _metric_sum(r, "openhydra_time_to_first_token_seconds_count")
    return MetricsInfo(
        requests_total=_metric_sum(r, "openhydra_http_requests_total"),
        server_errors_total=_metric_sum(r, "openhydra_http_requests_total", status_prefix="5"),
        tokens_generated_total=_metric_sum(r, "openhydra_tokens_generated_total"),
        prompt_tokens_total=_metric_sum(r, "openhydra_prompt_tokens_total"),
        ttft_avg_s=round(ttft_sum / ttft_count, 4) if ttft_count else None,
        stream_errors_total=_metric_sum(r, "openhydra_stream_errors_total"),
        client_disconnects_total=_metric_sum(r, "openhydra_client_disconnects_total"),
        rate_limited_total=_metric_sum(r, "openhydra_rate_limited_total"),
    )


def _earnings_info(state: Any) -> EarningsInfo:
    economy = getattr(state.extra.get("economy"), "economy", None)
    if economy is None or not getattr(economy, "enabled", False):
        return EarningsInfo(enabled=False, mode=getattr(economy, "mode", "off"))
    info = EarningsInfo(enabled=True, mode=str(economy.mode))
    try:
        info.balance = economy.balance(None).as_units()
        info.economy = economy.status()
    except Exception as exc:  # a busy or closed ledger: shown on the page, the rest still answers
        log.warning("dashboard: economy read failed: %s", exc)
        info.error = f"{type(exc).__name__}: {exc}"
    return info


def _network_sections(state: Any) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    for name, provider in list(state.extra.items()):
        if callable(getattr(provider, "network_status", None)):
            try:
                sections[name] = provider.network_status()
            except Exception as exc:  # one failing provider must not blank the whole page
                log.warning("dashboard: %s status failed: %s", name, exc)
                sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return sections


def build_summary(app: Sanic) -> DashboardSummary:
    """Blocking (discovery lookups, ledger reads): call it off the event loop."""
    state = app.ctx.state
    node = _swarm_node(state)
    return DashboardSummary(
        generated_at=time.time(), node=_node_info(state, node), hardware=_hardware_info(state, node),
        load=_load_info(state, node, app.ctx.api.max_concurrent_sessions), metrics=_metrics_info(app.ctx.metrics),
        earnings=_earnings_info(state), coverage=model_coverage(state, node),
        network=_network_sections(state),
    )
