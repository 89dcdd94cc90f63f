"""Shared streaming plumbing: run a generation, write events, end cleanly on every path.

The first event is produced before the response starts, so a request that cannot start (no route,
bad state) gets a proper error status. A failure after that is written as an error event followed by
the protocol's end marker and the connection is closed, so a client never hangs waiting for a stream
that will not finish. A client that goes away cancels the handler; `aclosing` then closes the
generator, which frees the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TypeVar

from sanic import Request

from openhydra.api.errors import APIError, unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


def as_api_error(exc: Exception) -> APIError:
    """Errors from below the API (pipeline, peers) as the API reports them."""
    if isinstance(exc, APIError):
        return exc
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:  # ShuttingDown, Overloaded; router.swarm.PipelineUnavailable: no chain covers the model
        return unavailable(str(exc), retry_after_s=int(retry_after), code=getattr(exc, "api_code", "no_route"))
    return APIError(503, f"generation failed: {exc}", type="service_unavailable", code="generation_failed")


async def run_stream(
    request: Request,
    events: AsyncIterator[T],
    *,
    content_type: str,
    on_event: Callable[[T], str | None],
    on_error: Callable[[APIError], str],
    end_marker: str | None,
) -> None:
    app = request.app
    route = request.route.path if request.route else "unmatched"
    async with aclosing(events) as stream:
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        except (asyncio.CancelledError, APIError):
            raise
        except Exception as exc:  # nothing sent yet: answer with a real status code
            raise as_api_error(exc) from None
        request.ctx.streaming = True
        status = 200
        response = await request.respond(content_type=content_type, headers={"Cache-Control": "no-cache"})
        try:
            if first is not None:
                chunk = on_event(first)
                if chunk:
                    await response.send(chunk)
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
            log.warning("stream on %s failed: %s", route, exc)
            with contextlib.suppress(Exception):  # the client may be gone too
                await response.send(on_error(as_api_error(exc)))
        finally:
            if status != 499:
                with contextlib.suppress(Exception):
                    if end_marker:
                        await response.send(end_marker)
                    await response.eof()
            app.ctx.record(request, status)
