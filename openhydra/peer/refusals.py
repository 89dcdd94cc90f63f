"""gRPC servicers whose refused calls do not keep the refused request in memory.

``context.abort`` raises an exception that gRPC keeps in the call's state. Its traceback holds the handler's frames,
and they hold the context, which holds the call's state: a reference cycle that only a full garbage collection
frees, and until then every local of those frames stays, the request among them (up to 64 MiB: a red team's refused
63 MiB steps each left ~67 MiB behind, and two clients flooding refused steps took a node from 4.3 to 8.3 GB).
:func:`releasing` wraps each unary and client-streaming handler so that a refusal drops those frames (the
tracebacks of the refusal and of the errors it was raised from) and the wrapper's own reference to the request.
Other errors keep their tracebacks: they are bugs, and gRPC logs them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc


def _forget_frames(exc: BaseException) -> None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        todo += [current.__context__, current.__cause__]


def releasing_handler(handler: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    @functools.wraps(handler)
    async def rpc(request: Any, context: Any) -> Any:
        try:
            return await handler(request, context)
        except grpc.aio.AbortError as exc:
            _forget_frames(exc)
            raise
        finally:
            del request

    return rpc


class releasing:
    """``servicer`` as gRPC's ``add_*Servicer_to_server`` reads it, its coroutine RPC handlers wrapped by
    :func:`releasing_handler` (server-streaming ones, async generators, answer small requests and are left as
    they are)."""

    def __init__(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._servicer, name)
        if name[:1].isupper() and inspect.iscoroutinefunction(value):
            return releasing_handler(value)
        return value
