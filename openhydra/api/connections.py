"""Connection-level limits Sanic does not have: a deadline for the request body, and open connections per IP.

Sanic's ``REQUEST_TIMEOUT`` covers only the headers. Once they are in, the connection is in the handler
stage, where only ``RESPONSE_TIMEOUT`` applies (900 s here, and reset by every byte received), so a client
that promises ``Content-Length: 1000`` and sends 10 bytes holds a connection and its buffers for as long as it
likes. :class:`EdgeHttpProtocol` adds ``api.body_timeout_s``, counted from the end of the headers (Sanic's
``perft0``) to the end of the body, whatever trickles in meanwhile; past it the client gets a 408 with the
usual error body and the connection is closed (the rest of the body is not read).

Sanic's ``REQUEST_TIMEOUT`` is also an idle timeout: every byte received restarts it, so a client sending one header
byte every few seconds held its connection for ever (slowloris; a red team kept 640 open past it). Here the headers
of each request must be complete within ``api.request_timeout_s`` of the check that first saw them arriving (checks
run every half of the shortest timeout, so at most 1.5x that), whatever trickles in; past it, 408 and close.

It also counts open connections per peer address (``api.max_connections_per_ip``) in ``connection_made``,
before any byte is read: the connection over the cap gets one 429 response and is closed, without a task,
a parser or a buffer. Trusted reverse proxies (``api.trusted_proxies``) are not capped: every client behind
them shares their address. And it answers 400 to a request line whose URL Sanic's parser refuses, where
Sanic itself drops the connection (:class:`EdgeHttp`).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from sanic import Request
from sanic.exceptions import BadRequest, RequestTimeout
from sanic.http import Http, Stage
from sanic.server.protocols.http_protocol import HttpProtocol

from openhydra.api.errors import OLLAMA_PREFIX, APIError
from openhydra.api.ratelimit import TrustedProxies

REFUSAL_WAIT_S = 1.0
"""How long a refused connection may take to send its request line (whose path picks the error's shape)."""
MAX_PENDING_REFUSALS = 64
"""Refused connections waiting for their request line at once, all addresses together: past it a refusal is sent at
once in OpenAI's shape, so a flood of silent connections over the cap holds at most this many sockets."""


def _refusal(limit: int, path: str) -> bytes:
    """The 429 for a connection over the cap, in the shape of the API the request line names (OpenAI's, or
    Ollama's under ``/api/``)."""
    body = json.dumps(APIError(
        429, f"too many open connections from this address (at most {limit})",
        type="rate_limit_error", code="too_many_connections",
    ).body_for(path)).encode()
    head = ("HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    return head + body


def _request_path(first_bytes: bytes) -> str:
    """The path of ``GET /api/tags HTTP/1.1``, or '' when the bytes do not start with a request line."""
    line = first_bytes.split(b"\r\n", 1)[0].split(b" ")
    return line[1].decode("latin-1") if len(line) >= 2 else ""


class ConnectionGuard:
    """Per-app bookkeeping for :class:`EdgeHttpProtocol` (``app.ctx.connections``)."""

    def __init__(self, max_per_ip: int, body_timeout_s: float, trusted: TrustedProxies | None = None) -> None:
        if max_per_ip < 1 or body_timeout_s <= 0:
            raise ValueError(f"max_per_ip ({max_per_ip}) and body_timeout_s ({body_timeout_s}) must be positive")
        self.max_per_ip = max_per_ip
        self.body_timeout_s = body_timeout_s
        self.trusted = trusted or TrustedProxies()
        self.open: defaultdict[str, int] = defaultdict(int)
        self.refused_total = 0
        self.pending_refusals = 0  # refused connections waiting for their request line (MAX_PENDING_REFUSALS)
        self.body_timeouts_total = 0
        self.header_timeouts_total = 0
        self._refusals = {api: _refusal(max_per_ip, api) for api in ("/v1/", OLLAMA_PREFIX)}

    def refusal(self, path: str) -> bytes:
        return self._refusals[OLLAMA_PREFIX if path.startswith(OLLAMA_PREFIX) else "/v1/"]

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip``, or refuse it (then nothing is counted)."""
        if self.open[ip] >= self.max_per_ip and not self.trusted.trusts(ip):
            self.refused_total += 1
            if not self.open[ip]:
                del self.open[ip]
            return False
        self.open[ip] += 1
        return True

    def release(self, ip: str) -> None:
        left = self.open.get(ip, 0) - 1
        if left > 0:
            self.open[ip] = left
        else:
            self.open.pop(ip, None)

    def metrics_text(self) -> str:
        return (
            "# HELP openhydra_http_open_connections Open HTTP connections\n"
            "# TYPE openhydra_http_open_connections gauge\n"
            f"openhydra_http_open_connections {sum(self.open.values())}\n"
            "# HELP openhydra_http_connections_refused_total Connections refused: too many from one address\n"
            "# TYPE openhydra_http_connections_refused_total counter\n"
            f"openhydra_http_connections_refused_total {self.refused_total}\n"
            "# HELP openhydra_http_refusals_pending Refused connections waiting for their request line\n"
            "# TYPE openhydra_http_refusals_pending gauge\n"
            f"openhydra_http_refusals_pending {self.pending_refusals}\n"
            "# HELP openhydra_http_body_timeouts_total Requests answered 408: body not received in time\n"
            "# TYPE openhydra_http_body_timeouts_total counter\n"
            f"openhydra_http_body_timeouts_total {self.body_timeouts_total}\n"
            "# HELP openhydra_http_header_timeouts_total Requests answered 408: headers not complete in time\n"
            "# TYPE openhydra_http_header_timeouts_total counter\n"
            f"openhydra_http_header_timeouts_total {self.header_timeouts_total}\n"
        )


class EdgeHttp(Http):
    """Sanic's HTTP/1.1 state machine, answering (400) a request line whose URL its parser refuses.

    Sanic builds a stand-in request to answer a request it could not parse, from the same URL; when that URL
    is what failed (a NUL byte, ``CONNECT host:port``) the stand-in fails too and the connection is dropped
    without an answer. The stand-in gets Sanic's placeholder URL instead."""

    __slots__ = ()

    def create_empty_request(self) -> None:
        try:
            super().create_empty_request()
        except BadRequest:
            self.url = None
            super().create_empty_request()


class EdgeHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol plus the body deadline and the per-IP connection cap of ``app.ctx.connections``.

    An app without a :class:`ConnectionGuard` gets Sanic's behaviour unchanged."""

    # Sanic's metaclass gives protocols no __dict__
    __slots__ = ("_edge_handler", "_edge_headers_since", "_edge_ip", "_edge_refusal_timer", "_edge_refused",
                 "_edge_requests")
    HTTP_CLASS = EdgeHttp

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._edge_ip: str | None = None
        guard: ConnectionGuard | None = getattr(self.app.ctx, "connections", None)
        if guard is not None:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else "unix"
            if not guard.admit(ip):
                # Refused: no task, parser or buffer. The first bytes only pick the error's shape (their path);
                # a client that sends nothing gets the OpenAI shape after REFUSAL_WAIT_S. Past
                # MAX_PENDING_REFUSALS waiting at once, the refusal goes out at once.
                self._edge_refused = True
                self.transport = transport
                self._edge_refusal_timer = None
                if guard.pending_refusals >= MAX_PENDING_REFUSALS:
                    transport.write(guard.refusal(""))
                    transport.close()
                    return
                guard.pending_refusals += 1
                self._edge_refusal_timer = asyncio.get_running_loop().call_later(
                    REFUSAL_WAIT_S, self._refuse, guard, "")
                return
            self._edge_ip = ip
        self._edge_refused = False
        self._edge_requests = 0  # requests whose headers were complete
        self._edge_headers_since: tuple[float, int] | None = None  # (when a check first saw headers arriving, count)
        super().connection_made(transport)

    def check_timeouts(self) -> None:
        """Sanic's checks (idle-based), plus a deadline for each request's headers as a whole."""
        guard: ConnectionGuard | None = getattr(self.app.ctx, "connections", None)
        http = self._http
        if guard is not None and self._task is not None and http is not None and not self._edge_refused:
            if http.stage is not Stage.REQUEST:
                self._edge_headers_since = None
            else:
                now = self.loop.time()
                since = self._edge_headers_since
                if since is None or since[1] != self._edge_requests:  # a new request's headers are arriving
                    self._edge_headers_since = (now, self._edge_requests)
                elif now - since[0] > self.request_timeout:
                    guard.header_timeouts_total += 1
                    http.exception = RequestTimeout(
                        f"request headers not complete within {self.request_timeout:g} s")
                    http.keep_alive = False
                    self._task.cancel("request header timeout")
                    return
        super().check_timeouts()

    def _refuse(self, guard: ConnectionGuard, path: str) -> None:
        self._stop_waiting(guard)
        if not self.transport.is_closing():
            self.transport.write(guard.refusal(path))
            self.transport.close()

    def _stop_waiting(self, guard: ConnectionGuard) -> None:
        """The refused connection no longer waits for its request line (answered, or gone): once only."""
        if self._edge_refusal_timer is not None:
            self._edge_refusal_timer.cancel()
            self._edge_refusal_timer = None
            guard.pending_refusals -= 1

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_edge_refused", False):
            guard: ConnectionGuard = self.app.ctx.connections
            self._refuse(guard, _request_path(data[:8192]))
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_edge_refused", False):
            self._stop_waiting(self.app.ctx.connections)
            return  # never set up: no task, no conn_info
        guard: ConnectionGuard | None = getattr(self.app.ctx, "connections", None)
        if guard is not None and self._edge_ip is not None:
            guard.release(self._edge_ip)
            self._edge_ip = None
        super().connection_lost(exc)

    def _setup(self) -> None:
        super()._setup()
        self._edge_handler = self.request_handler
        self.request_handler = self._handle_with_body_deadline

    async def _handle_with_body_deadline(self, request: Request) -> None:
        guard: ConnectionGuard | None = getattr(self.app.ctx, "connections", None)
        http = self._http
        self._edge_requests += 1  # its headers are complete
        if guard is not None and http is not None and http.request_body and http.perft0 is not None:
            # not cancelled when the handler returns: a route that ignores its body (GET) leaves Sanic to drain it
            self.loop.call_later(guard.body_timeout_s, self._body_deadline, guard, http, http.perft0)
        await self._edge_handler(request)

    def _body_deadline(self, guard: ConnectionGuard, http: Http, perft0: float) -> None:
        """The body of the request that started at ``perft0`` is still incomplete: answer 408 and close."""
        if self._task is None or self._http is not http or http.perft0 != perft0 or not http.request_body:
            return  # the body arrived, or the connection has moved on or gone
        guard.body_timeouts_total += 1
        http.exception = RequestTimeout(f"request body not received within {guard.body_timeout_s:g} s of its headers")
        http.request_body = None  # nothing more is read from this connection: no drain after the 408
        http.keep_alive = False
        # Sanic's connection task turns the cancellation into an error response with http.exception (while the
        # handler is still reading the body) or just closes the connection (if a response was already sent)
        self._task.cancel("request body timeout")
