"""Liveness, readiness, metrics, and the network status page."""

from __future__ import annotations

import time

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json, raw


def register(app: Sanic) -> None:
    state = app.ctx.state

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return json({"status": "ok", "uptime_s": round(time.time() - state.started_at, 3)})

    @app.get("/readyz")
    async def readyz(request: Request) -> HTTPResponse:
        app.ctx.metrics.ready.set(1 if state.ready else 0)
        if state.ready:
            return json({"status": "ready", "model": state.model.id})
        body = {"status": "failed" if state.load_error else "loading", "stage": state.loading_stage}
        if state.load_error:
            body["error"] = state.load_error
        return json(body, status=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        app.ctx.metrics.ready.set(1 if state.ready else 0)
        engine = state.engine
        app.ctx.metrics.active_sessions.set(len(engine.active_sessions) if engine else 0)
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
