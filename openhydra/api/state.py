"""What the HTTP layer needs to know about the node: the served model, the engine, readiness."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from openhydra.api.errors import APIError, not_found, unavailable
from openhydra.router.engine import Engine


@dataclass
class ServedModel:
    id: str
    """The API name this node serves, e.g. openhydra-smollm2-135m."""
    aliases: list[str]
    """Other names that resolve to it (the requested catalog model when this one is its fallback)."""
    source: str
    family: str
    parameter_count: int
    """The whole model's parameters, as its checkpoint stores them (not this node's span, not packed int4)."""
    dtype: str
    context_length: int
    num_layers: int
    span: tuple[int, int]
    degradation_reason: str | None = None
    dtype_reason: str | None = None
    """Why this dtype (hardware/dtype.py: set by hand, native bf16, or measured bf16 vs fp32)."""
    kernel: str | None = None
    """What multiplies the CPU int8/int4 weights (runtime/quant_cpu.py kernel_summary); None when unquantized."""
    weights_format: str = "safetensors"
    """How the weights were stored at their source: 'gguf' or 'safetensors' (runtime/source_format.py)."""
    quantization: str | None = None
    """The source's quantization or dtype, e.g. 'Q4_1' for a Q4_1 GGUF served as bf16; None if unknown."""
    served_quantization: str | None = None
    """How this node quantized its span's weights at load ('int4', 'int8', 'nf4'); None: served in ``dtype``."""
    weight_bytes: int = 0
    """Bytes of weights this node holds for its span, as loaded (int4/int8 packed where quantized)."""
    created: int = field(default_factory=lambda: int(time.time()))

    def answers_to(self, name: str) -> bool:
        base = name.removesuffix(":latest")
        return base == self.id or base in self.aliases


@dataclass(frozen=True)
class RouteReadiness:
    """Whether a request to a node in a swarm would find a chain of peers now (``GET /readyz``)."""

    covered: bool
    served: str | None = None
    """The model a request gets now: the node's own, or the fallback it degrades to (None when not covered)."""
    degradation_reason: str | None = None
    holes: list[list[int]] = field(default_factory=list)
    """[start, end) layer ranges of the node's model that no usable peer serves (when not covered)."""


@dataclass
class NodeState:
    started_at: float = field(default_factory=time.time)
    model: ServedModel | None = None
    engine: Engine | None = None
    load_error: str | None = None
    loading_stage: str = "starting"
    requested_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Components added by later layers (network status, economy, ...), keyed by name."""
    degrader: Any = None
    """router.degrade.ModelDegrader over (ServedModel, Engine) options, when the node is in a swarm."""
    route_check: Callable[[], RouteReadiness] | None = None
    """For a node that routes requests through peers: whether a chain covers its model now (blocking: discovery).
    None when the node holds the whole model itself."""

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.model is not None

    def resolve(self, name: str, ctx: Any = None) -> tuple[ServedModel, Engine]:
        """The model and engine for a request's ``model`` field, or a typed 404/503.

        With a degrader, a request for this node's model may be served by a smaller covered model; the
        choice is made once per request (``ctx``: the request's ctx, which also carries it to the
        degradation header)."""
        chosen = getattr(ctx, "served", None) if ctx is not None else None
        if chosen is not None:
            return chosen
        served, engine = self._resolve_primary(name)
        if self.degrader is not None:
            pick = self.degrader.choose()
            if pick.reason is not None:
                model, engine = pick.option
                served = replace(model, aliases=[*model.aliases, served.id], degradation_reason=pick.reason)
        if ctx is not None:
            ctx.served = (served, engine)
        return served, engine

    def _resolve_primary(self, name: str) -> tuple[ServedModel, Engine]:
        if not self.ready:
            if self.load_error:
                raise APIError(503, f"model failed to load: {self.load_error}", type="service_unavailable",
                               code="model_load_failed")
            raise unavailable(f"model is still loading ({self.loading_stage})", code="model_loading")
        assert self.model is not None and self.engine is not None
        if not self.model.answers_to(name):
            served = ", ".join([self.model.id, *self.model.aliases])
            raise not_found(f"model '{name}' is not served here; available: {served}", param="model",
                            code="model_not_found")
        return self.model, self.engine
