"""The web dashboard: a static page at ``/`` and the JSON summary it polls at ``/v1/dashboard/summary``.

The page (``openhydra/api/dashboard/``: index.html, app.js, chat.js, style.css) is shipped as package
data and needs no build step and nothing from the network. It is public, like a login page: it holds no data.
Everything it shows comes from ``GET /v1/dashboard/summary``, which sits behind the bearer token when
one is configured (the page asks for the token on a 401). One poll answers the whole page; the polls count
against the probes' budget (api/app.py ``PROBE_BUDGET_PATHS``), not the API's, so a page left open does not
rate-limit its user. The summary is built in a worker thread (discovery lookups, ledger reads) at most once per
:data:`SUMMARY_FRESH_S`: polls within that time, from any number of pages, share one build (:class:`SummaryCache`),
so the probes' larger budget cannot be turned into blocking work.

What the summary holds is described in ``openhydra/api/dashboard/summary.py``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json, raw

from openhydra.api.dashboard.summary import SUMMARY_SCHEMA, build_summary
from openhydra.api.errors import not_found

SUMMARY_PATH = "/v1/dashboard/summary"
SUMMARY_FRESH_S = 1.0
ASSET_PREFIX = "/dashboard/"
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PUBLIC_PATHS = frozenset({"/", *(ASSET_PREFIX + name for name in _ASSETS if name != "index.html")})
"""Paths that answer without a bearer token: the page and its static files, never the summary."""
__all__ = ["PUBLIC_PATHS", "SUMMARY_PATH", "SUMMARY_SCHEMA", "is_undocumented", "register"]


class SummaryCache:
    """``build()`` run in a worker thread at most once per ``fresh_s``: callers meanwhile share its answer, and
    callers during a build wait for that build instead of starting another."""

    def __init__(self, build: Callable[[], Any], fresh_s: float = SUMMARY_FRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.build, self.fresh_s, self.clock = build, fresh_s, clock
        self.builds = 0
        self._body: Any = None
        self._at = -math.inf
        self._task: asyncio.Future | None = None

    async def get(self) -> Any:
        if self._body is not None and self.clock() - self._at < self.fresh_s:
            return self._body
        if self._task is None:
            self._task = asyncio.ensure_future(self._rebuild())
        return await asyncio.shield(self._task)  # a caller that goes away does not cancel the others' build

    async def _rebuild(self) -> Any:
        try:
            self.builds += 1
            body = await asyncio.to_thread(self.build)
            self._body, self._at = body, self.clock()
            return body
        finally:
            self._task = None


def is_undocumented(path: str) -> bool:
    """The page and its static files: not JSON, left out of /openapi.json (nothing there for a fuzzer)."""
    return path == "/" or path.startswith(ASSET_PREFIX)


def _read_assets() -> dict[str, bytes]:
    folder = resources.files("openhydra.api.dashboard")
    return {name: (folder / name).read_bytes() for name in _ASSETS}


def register(app: Sanic) -> None:
    assets = _read_assets()  # a few KB, read once: a missing file fails at start, not on a click

    def asset_response(name: str) -> HTTPResponse:
        return raw(assets[name], content_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/", name="dashboard_index")
    async def dashboard_index(request: Request) -> HTTPResponse:
        return asset_response("index.html")

    @app.get(ASSET_PREFIX + "<name:str>", name="dashboard_asset")
    async def dashboard_asset(request: Request, name: str) -> HTTPResponse:
        if name not in assets or name == "index.html":
            raise not_found(f"no dashboard file named {name!r}", code="not_found")
        return asset_response(name)

    summaries = SummaryCache(lambda: build_summary(app).model_dump(mode="json"))
    app.ctx.dashboard_summaries = summaries

    @app.get(SUMMARY_PATH, name="dashboard_summary")
    async def dashboard_summary(request: Request) -> HTTPResponse:
        return json(await summaries.get())
