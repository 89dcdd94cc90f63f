"""Cross-origin calls from browsers (``api.cors_origins``): a web page on another origin calling the node's API.

Off by default (an empty list): browsers then refuse cross-origin reads, which is what a node on loopback wants.
Listed origins (``["http://localhost:3000"]``, or ``["*"]`` for any) get what the Fetch standard asks of a server:

- a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered 204 with the methods
  and headers it may use, before the rate limit (a 429 there reaches the page only as an unreadable CORS failure)
  and the bearer-token check (a browser sends no credentials with it); an origin not listed gets 403;
- every other answer to a listed origin carries ``Access-Control-Allow-Origin`` (and ``Vary: Origin``) and exposes
  the headers a client reads (rate limits, the degradation reason, ``Retry-After``).

The token is still required on the real call; CORS only decides which pages' scripts may read the answers.

CORS alone does not stop a page from *sending*: a form or a ``fetch`` with ``Content-Type: text/plain`` is a "simple"
request that browsers send cross-origin without asking first, and the node parses any body as JSON. A web page the
operator visits could then stake HYDRA, open channels or spend the node's credits and free tier on chats (an
economy probe did all three). So a request that may change state (any method but GET, HEAD and OPTIONS) that carries
an ``Origin`` (browsers always send one on such requests; SDKs, curl and proxies do not) is refused with 403 unless
the origin is listed or is the node's own (its dashboard), as Ollama does with ``OLLAMA_ORIGINS``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from sanic import Request
from sanic.response import HTTPResponse

from openhydra.api.errors import APIError

ALLOWED_METHODS = "GET, HEAD, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Accept, X-Requested-With"
EXPOSED_HEADERS = ("X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After, "
                   "X-OpenHydra-Degradation-Reason")
MAX_AGE_S = 600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Cors:
    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/").lower() for o in origins if o != "*")  # scheme and host: no case

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.origins)

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin.rstrip("/").lower() in self.origins)

    def refuse_cross_origin_writes(self, request: Request) -> None:
        """403 for a request that may change state sent by a page of another origin that is not listed."""
        origin = request.headers.get("origin")
        if origin is None or request.method in SAFE_METHODS or self.allowed(origin):
            return
        host = (request.headers.get("host") or "").lower()
        try:
            same = bool(host) and urlsplit(origin.strip()).netloc.lower() == host
        except ValueError:
            same = False
        if not same:
            raise APIError(403, f"a page of origin {origin[:100]} may not call this API (add it to api.cors_origins "
                                "to allow it)", type="permission_error", code="origin_not_allowed")

    def is_preflight(self, request: Request) -> bool:
        return (self.enabled and request.method == "OPTIONS" and "origin" in request.headers
                and "access-control-request-method" in request.headers)

    def preflight(self, request: Request) -> HTTPResponse:
        origin = request.headers.get("origin")
        if not self.allowed(origin):
            raise APIError(403, f"origin {origin} is not in api.cors_origins", type="permission_error",
                           code="origin_not_allowed")
        asked = request.headers.get("access-control-request-headers")
        return HTTPResponse(status=204, headers={
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": asked or ALLOWED_HEADERS,
            "Access-Control-Max-Age": str(MAX_AGE_S),
            "Vary": "Origin, Access-Control-Request-Headers",
        })

    def decorate(self, request: Request, response: HTTPResponse) -> None:
        if not self.enabled:
            return
        origin = request.headers.get("origin")
        response.headers.setdefault("Vary", "Origin")
        if self.allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
