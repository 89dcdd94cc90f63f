"""Shared streaming plumbing: run a generation, write events, end cleanly on every path.

A mid-stream failure is written as an error event followed by the protocol's end marker and the
connection is closed, so a client never hangs waiting for a stream that will not finish. A client
that goes away cancels the handler; `aclosing` then closes the generator, which frees the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TypeVar

from sanic import Request

from openhydra.api.errors import APIError

T = TypeVar("T")

log = logging.getLogger(__name__)


async def run_stream(
    request: Request,
    events: AsyncIterator[T],
    *,
    content_type: str,
    on_event: Callable[[T], str | None],
    on_error: Callable[[APIError], str],
    end_marker: str | None,
    response=None,
):
    """Stream ``events`` to the client. Returns the response object for follow-up writes."""
    app = request.app
    route = request.route.path if request.route else "unmatched"
    request.ctx.streaming = True
    status = 200
    if response is None:
        response = await request.respond(content_type=content_type, headers={"Cache-Control": "no-cache"})
    try:
        async with aclosing(events) as stream:
            async for event in stream:
                chunk = on_event(event)
                if chunk:
                    await response.send(chunk)
    except asyncio.CancelledError:
        app.ctx.metrics.client_disconnects.labels(route).inc()
        status = 499
        raise
    except Exception as exc:  # end the stream cleanly whatever broke
        status = 500
        app.ctx.metrics.stream_errors.labels(route).inc()
        error = exc if isinstance(exc, APIError) else APIError(
            503, f"generation failed mid-stream: {exc}", type="service_unavailable", code="stream_failed"
        )
        if not isinstance(exc, APIError):
            log.warning("stream on %s failed: %s", route, exc)
        with contextlib.suppress(Exception):  # the client may be gone too
            await response.send(on_error(error))
    finally:
        if status != 499:
            try:
                if end_marker:
                    await response.send(end_marker)
                await response.eof()
            except Exception:
                pass
        app.ctx.record(request, status)
    return response
