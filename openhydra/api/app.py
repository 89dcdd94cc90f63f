"""The node's HTTP API: one Sanic app, one error schema, metrics on every route.

Routes live in routes_*.py by family; this module wires limits, middleware and error handling.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import RequestCancelled, SanicException
from sanic.response import HTTPResponse, json

from openhydra.api.auth import BearerAuth
from openhydra.api.connections import ConnectionGuard, EdgeHttpProtocol
from openhydra.api.cors import Cors
from openhydra.api.errors import APIError, bad_request
from openhydra.api.hosts import HostCheck
from openhydra.api.metrics import ApiMetrics
from openhydra.api.ratelimit import SlidingWindowLimiter, TrustedProxies
from openhydra.api.routes_dashboard import PUBLIC_PATHS as DASHBOARD_PAGE_PATHS
from openhydra.api.routes_dashboard import SUMMARY_PATH as DASHBOARD_SUMMARY_PATH
from openhydra.api.state import NodeState
from openhydra.api.streaming import as_api_error
from openhydra.config.schema import ApiConfig
from openhydra.router.admission import CLIENT
from openhydra.router.engine import Overloaded, PromptTooLong, ShuttingDown
from openhydra.router.pipeline import SessionEvicted
from openhydra.router.swarm import PipelineUnavailable

log = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    431: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}


CLIENT_CLOSED_REQUEST = 499
"""What a request counts as in /metrics when its client went away first (nginx's code; never sent)."""

# Probes and scrapes answer without a bearer token (they reveal no prompts), and are counted against their own
# per-client limit (api.probe_rate_limit_requests) so a busy client cannot make its own node look dead.
PROBE_PATHS = frozenset({"/health", "/readyz", "/metrics"})
PUBLIC_PATHS = PROBE_PATHS | DASHBOARD_PAGE_PATHS  # the page holds no data
# The dashboard's poll (every 2 s: 30 of the API's 120 requests a minute) comes out of the probes' budget too, so a
# page left open does not rate-limit its user's own API calls; it still needs the bearer token (it holds data).
PROBE_BUDGET_PATHS = PROBE_PATHS | {DASHBOARD_SUMMARY_PATH}


class OpenHydraSanic(Sanic):
    """A Sanic app whose servers use :class:`EdgeHttpProtocol` (body deadline, connections per IP) unless the
    caller names another protocol: ``app.run(...)`` and ``app.create_server(...)`` need no extra argument."""

    def prepare(self, *args: Any, protocol: type[asyncio.Protocol] | None = None, **kwargs: Any) -> None:
        super().prepare(*args, protocol=protocol or EdgeHttpProtocol, **kwargs)

    async def create_server(self, *args: Any, protocol: type[asyncio.Protocol] | None = None,
                            **kwargs: Any) -> Any:
        return await super().create_server(*args, protocol=protocol or EdgeHttpProtocol, **kwargs)

    def get(self, uri: str, *args: Any, **kwargs: Any) -> Any:
        """Every GET route answers HEAD too (RFC 9110 9.3.2; Sanic sends the headers without the body): Ollama's
        client checks that a server is up with ``HEAD /``."""
        if args:
            raise TypeError("OpenHydraSanic.get takes its options by keyword")
        kwargs.setdefault("ignore_body", True)  # as Sanic's own get: a GET's body is not waited for
        return self.route(uri, methods=frozenset({"GET", "HEAD"}), **kwargs)


def _ascii_header(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii").replace("\n", " ")[:500]


def create_app(state: NodeState, api: ApiConfig, *, name: str | None = None) -> Sanic:
    app = OpenHydraSanic(name or f"openhydra_{uuid.uuid4().hex[:8]}")
    app.config.REQUEST_MAX_SIZE = api.max_body_bytes
    app.config.REQUEST_MAX_HEADER_SIZE = api.max_header_bytes
    app.config.REQUEST_TIMEOUT = api.request_timeout_s
    app.config.RESPONSE_TIMEOUT = api.response_timeout_s
    app.config.KEEP_ALIVE_TIMEOUT = api.keep_alive_timeout_s
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.NOISY_EXCEPTIONS = False
    app.ctx.state = state
    app.ctx.api = api
    app.ctx.metrics = ApiMetrics()
    app.ctx.limiter = SlidingWindowLimiter(api.rate_limit_requests, api.rate_limit_window_s)
    app.ctx.probe_limiter = SlidingWindowLimiter(api.probe_rate_limit_requests, api.rate_limit_window_s)
    trusted = TrustedProxies(api.trusted_proxies)
    app.ctx.trusted_proxies = trusted
    app.ctx.connections = ConnectionGuard(api.max_connections_per_ip, api.body_timeout_s, trusted)
    auth = BearerAuth(api.bearer_token, public_paths=PUBLIC_PATHS)
    cors = Cors(api.cors_origins)
    hosts = HostCheck(api.allowed_hosts, api.host, auth.enabled, PUBLIC_PATHS)

    def client_of(request: Request) -> str:
        peer = request.conn_info.client_ip if request.conn_info is not None else ""
        return trusted.client_ip(peer, request.headers.getall("x-forwarded-for", []) if trusted else ())

    @app.on_request
    async def _before(request: Request) -> HTTPResponse | None:
        request.ctx.started = time.perf_counter()
        request.ctx.streaming = False
        if request.method == "NONE" and not request.headers:
            # Sanic's stand-in for a request that could not be parsed (bad request line or headers, header
            # too large): it has no path or credentials to check; let its 400/413 through instead of a 401
            return None
        hosts.refuse_unknown_host(request)  # a page that rebound its own name to this node (api/hosts.py)
        if cors.is_preflight(request):  # a browser's question before a cross-origin call: no token, no quota
            return cors.preflight(request)
        cors.refuse_cross_origin_writes(request)  # a page elsewhere sending a "simple" POST (api/cors.py)
        limiter = app.ctx.probe_limiter if request.path in PROBE_BUDGET_PATHS else app.ctx.limiter
        client = client_of(request)
        CLIENT.set(client)  # generation slots are shared fairly between clients (router/admission.py)
        decision = limiter.hit(client)
        request.ctx.rate = decision
        if not decision.allowed:
            app.ctx.metrics.rate_limited.inc()
            raise APIError(
                429, f"rate limit of {decision.limit} requests per {api.rate_limit_window_s:g} s exceeded",
                type="rate_limit_error", code="rate_limited", headers=decision.headers(),
            )
        auth.require(request.headers.get("authorization"), request.path)
        return None

    @app.on_response
    async def _after(request: Request, response: HTTPResponse) -> None:
        decorate(request, response)
        if not getattr(request.ctx, "streaming", False):
            record(request, response.status)

    def decorate(request: Request, response: HTTPResponse) -> None:
        decision = getattr(request.ctx, "rate", None)
        if decision is not None:
            response.headers.update(decision.headers())
        cors.decorate(request, response)
        chosen = getattr(request.ctx, "served", None)
        model = chosen[0] if chosen is not None else state.model
        if model is not None and model.degradation_reason:
            response.headers["X-OpenHydra-Degradation-Reason"] = _ascii_header(model.degradation_reason)

    def record(request: Request, status: int) -> None:
        route = request.route.path if request.route else "unmatched"
        app.ctx.metrics.requests.labels(route, str(status)).inc()
        started = getattr(request.ctx, "started", None)
        if started is not None:
            app.ctx.metrics.latency.labels(route).observe(time.perf_counter() - started)

    app.ctx.record = record

    @app.exception(APIError)
    async def _api_error(request: Request, exc: APIError) -> HTTPResponse:
        return json(exc.body_for(request.path), status=exc.status, headers=exc.headers)

    @app.exception(PipelineUnavailable, ShuttingDown, Overloaded, SessionEvicted)  # not streaming: 503, its code
    async def _no_route(request: Request, exc: PipelineUnavailable | ShuttingDown | Overloaded | SessionEvicted,
                        ) -> HTTPResponse:
        return await _api_error(request, as_api_error(exc))

    @app.exception(PromptTooLong)  # refused before tokenizing: its bytes alone prove it longer than the context
    async def _prompt_too_long(request: Request, exc: PromptTooLong) -> HTTPResponse:
        return await _api_error(request, bad_request(str(exc), code="context_length_exceeded"))

    @app.exception(RequestCancelled)
    async def _client_gone(request: Request, exc: RequestCancelled) -> HTTPResponse:
        # The client closed its connection before the answer started (a stream counts its own, api/streaming.py).
        # Nobody reads this response; it makes the request count as 499, as nginx logs it, not as the node's 500.
        route = request.route.path if request.route else "unmatched"
        app.ctx.metrics.client_disconnects.labels(route).inc()
        return HTTPResponse(status=CLIENT_CLOSED_REQUEST)

    @app.exception(SanicException)
    async def _sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
        status = getattr(exc, "status_code", 500) or 500
        message, code = str(exc) or "error", type(exc).__name__
        if status == 404:
            message = f"no route for {request.method} {request.path}"
        if status == 413 and request.method == "NONE" and not request.headers:  # the request line + headers
            status, code = 431, "RequestHeaderFieldsTooLarge"
            message = f"request line and headers exceed api.max_header_bytes ({api.max_header_bytes} bytes)"
        headers = dict(getattr(exc, "headers", None) or {})
        body = APIError(status, message, type=_STATUS_TYPES.get(status, "api_error"), code=code
                        ).body_for(request.path)
        return json(body, status=status, headers=headers)

    @app.exception(Exception)
    async def _unexpected(request: Request, exc: Exception) -> HTTPResponse:
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = APIError(500, "internal error; the node logged the details", type="api_error",
                        code="internal_error").body_for(request.path)
        return json(body, status=500)

    from openhydra.api import openapi, routes_dashboard, routes_ollama, routes_openai, routes_public

    routes_public.register(app)
    routes_openai.register(app)
    routes_ollama.register(app)
    routes_dashboard.register(app)
    openapi.register(app)
    return app
