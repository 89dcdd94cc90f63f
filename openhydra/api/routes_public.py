"""Liveness, readiness, metrics, and the network status page."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json, raw

from openhydra.api.bodies import parse_query

log = logging.getLogger(__name__)

ROUTE_CHECK_TIMEOUT_S = 5.0
"""A readiness probe that waits longer on discovery than this answers 503: probes time out at a few seconds."""
NO_ROUTE_RETRY_AFTER_S = 5


class ReadyzQuery(BaseModel):
    """``GET /readyz``'s query: ``scope=route`` (the default): can a request be served now, this node's part loaded
    and a chain of peers covering the whole model; ``scope=node``: this node's own part is loaded (what a container's
    health check or a script starting a swarm node by node waits for)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    scope: Literal["route", "node"] = "route"


def register(app: Sanic) -> None:
    state = app.ctx.state

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return json({"status": "ok", "uptime_s": round(time.time() - state.started_at, 3)})

    @app.get("/readyz")
    async def readyz(request: Request) -> HTTPResponse:
        query = parse_query(request, ReadyzQuery)
        app.ctx.metrics.ready.set(1 if state.ready else 0)
        if not state.ready:
            body = {"status": "failed" if state.load_error else "loading", "stage": state.loading_stage}
            if state.load_error:
                body["error"] = state.load_error
            return json(body, status=503)
        model = state.model
        assert model is not None
        body = {"status": "ready", "model": model.id}
        check = state.route_check
        if query.scope == "node" or check is None:  # a node holding the whole model serves whatever the swarm does
            return json(body)

        def no_route(error: str, **more: object) -> HTTPResponse:
            return json({"status": "no_route", "model": model.id, **more, "error": error}, status=503,
                        headers={"Retry-After": str(NO_ROUTE_RETRY_AFTER_S)})

        try:
            route = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, check),
                                           ROUTE_CHECK_TIMEOUT_S)
        except Exception as exc:  # discovery hung or failed with nothing known: no route this node can vouch for
            error = (f"discovery did not answer within {ROUTE_CHECK_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError)
                     else f"discovery failed: {type(exc).__name__}: {exc}")
            log.warning("readiness: %s", error)
            return no_route(error)
        if route.covered:
            body["route"] = "covered"
            if route.served and route.served != model.id:  # degraded to a smaller covered model
                body["served_model"] = route.served
                body["degradation_reason"] = route.degradation_reason
            return json(body)
        return no_route(f"no chain of peers covers all {model.num_layers} layers of {model.id}"
                        + (f" (holes: {route.holes})" if route.holes
                           else " (the peers that cover them cannot form a compatible chain)"), holes=route.holes)

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        app.ctx.metrics.ready.set(1 if state.ready else 0)
        engine = state.engine
        app.ctx.metrics.active_sessions.set(len(engine.active_sessions) if engine else 0)
        app.ctx.metrics.queued_requests.set(engine.queued if engine else 0)
        text = app.ctx.metrics.exposition()
        guard = getattr(app.ctx, "connections", None)
        if guard is not None:
            text += guard.metrics_text().encode()
        for provider in state.extra.values():  # verification, peer crypto, ... add their own families
            if callable(getattr(provider, "metrics_text", None)):
                text += provider.metrics_text().encode()
        return raw(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/network/status")
    async def network_status(request: Request) -> HTTPResponse:
        model = state.model
        body: dict = {
            "ready": state.ready,
            "requested_model": state.requested_model,
            "model": None
            if model is None
            else {
                "id": model.id,
                "source": model.source,
                "span": list(model.span),
                "num_layers": model.num_layers,
                "dtype": model.dtype,
                "dtype_reason": model.dtype_reason,
                "kernel": model.kernel,
                "degradation_reason": model.degradation_reason,
            },
        }
        if model is not None and state.engine is not None:  # a node with a span (runtime/compute_lane.py)
            from openhydra.runtime import compute_lane

            body["compute"] = compute_lane.status()
        for name, provider in state.extra.items():
            if callable(getattr(provider, "network_status", None)):
                body[name] = provider.network_status()
        return json(body)
