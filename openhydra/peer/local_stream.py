"""A coordinator's steps to the peer served by its own process, handed over on the event loop they share.

A node whose coordinator client works on its peer server's loop (``PeerChainClient(loop=...)``, what
``openhydra-node`` does) would otherwise send every step to its own span through gRPC on loopback: serialise, a
socket write, gRPC's I/O and poller threads waking, and the loop waking again to parse it. :class:`LocalStream` has
:class:`~openhydra.peer.outbound.OutboundStream`'s interface (``send``, ``close``, failures reported through
``on_broken``) and feeds the messages to the local ``PeerService.Forward`` as its request stream instead. Everything
a step goes through on the peer is unchanged: sealing and opening, validation, admission, the compute, the push to
the next hop. Only the transport to this process's own span is skipped; every other hop is gRPC as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from openhydra.peer.outbound import BrokenHandler

log = logging.getLogger(__name__)

LOCAL_PEER = "local"
"""What ``context.peer()`` answers for a local stream (session admission counts it as one source of its own)."""


class LocalAbort(Exception):
    """``context.abort`` on a local stream: ends the stream with this status, as gRPC would."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class LocalContext:
    """The part of ``grpc.aio.ServicerContext`` that ``PeerService.Forward`` uses."""

    def peer(self) -> str:
        return LOCAL_PEER

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise LocalAbort(code, details)


class LocalStream:
    """One session's steps to the ``Forward`` of a service on this loop; a stream that ends with an error is reported
    through ``on_broken`` with the last message's ``context``, and the next ``send`` opens a new one."""

    def __init__(self, service: Any, address: str, on_broken: BrokenHandler) -> None:
        self.address = address
        self._service = service
        self._on_broken = on_broken
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._last_context: Any = None
        self._closing = False

    async def send(self, message: Any, context: Any = None) -> None:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._closing = False
            self._task = asyncio.ensure_future(self._run(self._queue))
        self._last_context = context
        self._queue.put_nowait(message)

    @staticmethod
    async def _messages(queue: asyncio.Queue) -> AsyncIterator[Any]:
        while (message := await queue.get()) is not None:
            yield message

    async def _run(self, queue: asyncio.Queue) -> None:
        try:
            await self._service.Forward(self._messages(queue), LocalContext())
            return
        except LocalAbort as exc:
            code, details = exc.code, exc.details
        except asyncio.CancelledError:
            return
        except Exception as exc:  # what gRPC reports as UNKNOWN for a handler that raised
            log.exception("local stream to %s failed", self.address)
            code, details = grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
        if self._closing:
            return
        try:
            await self._on_broken(self.address, code, details, self._last_context)
        except Exception:  # as OutboundStream: the handler is best effort
            log.exception("on_broken handler failed for %s", self.address)

    async def close(self) -> None:
        task, queue, self._task = self._task, self._queue, None
        self._closing = True
        if task is None or task.done():
            return
        queue.put_nowait(None)  # the end of the request stream: Forward returns once it has handled the rest
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
        except TimeoutError:
            task.cancel()
