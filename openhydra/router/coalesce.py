"""Request coalescing: identical greedy requests in flight at the same time are computed once.

Greedy decoding is a pure function of (prompt token ids, max_tokens, stop strings, ignore_eos), so
two such requests arriving together would run the same pipeline steps twice. The first becomes the
leader: its generation runs once, and every event it yields (text deltas, then ``Finished``) is
recorded and fanned out to all subscribers, including ones that join late (they replay the
recorded events first). Sampled requests (temperature > 0) are never coalesced: each must draw its
own sample. A subscriber that disconnects only unsubscribes; when the last one leaves, the shared
generation is cancelled, which closes its session on the pipeline as for any cancelled request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

_DONE = object()


def coalesce_key(request: Any) -> Hashable | None:
    """The identity of a greedy request (a GenerationRequest), or None when it must not be coalesced."""
    if request.sampling.temperature > 0:
        return None
    return (tuple(request.prompt_ids), request.max_tokens, tuple(request.stop), bool(request.ignore_eos))


class _Broadcast:
    """One running generation and the events it has produced so far."""

    def __init__(self, source: AsyncIterator[Any], on_done: Callable[[], None]) -> None:
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.done = False
        self.subscribers = 0
        self._changed = asyncio.Condition()
        self._source = source
        self._on_done = on_done
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            async for event in self._source:
                async with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        except asyncio.CancelledError:
            self.error = asyncio.CancelledError()
            raise
        except BaseException as exc:  # every subscriber re-raises it
            self.error = exc
        finally:
            self.done = True
            self._on_done()
            await self._source.aclose()
            async with self._changed:
                self._changed.notify_all()

    async def subscribe(self) -> AsyncIterator[Any]:
        self.subscribers += 1
        index = 0
        try:
            while True:
                async with self._changed:
                    while index >= len(self.events) and not self.done:
                        await self._changed.wait()
                    pending = self.events[index:]
                    index = len(self.events)
                    finished = self.done
                for event in pending:
                    yield event
                if finished and index >= len(self.events):
                    if self.error is not None:
                        raise self.error
                    return
        finally:
            self.subscribers -= 1
            if self.subscribers == 0 and not self.done:
                self._on_done()  # nobody is listening: later identical requests start afresh
                self._task.cancel()


class Coalescer:
    """Fans one generation out to every identical greedy request in flight (hooked in Engine.stream)."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, _Broadcast] = {}
        self.runs = 0
        """Generations actually computed."""
        self.coalesced = 0
        """Requests served by another request's generation."""

    async def stream(self, request: Any, produce: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
        key = coalesce_key(request)
        if key is None:
            self.runs += 1
            async for event in produce():
                yield event
            return
        started = time.perf_counter()
        broadcast = self._inflight.get(key)
        if broadcast is None:
            self.runs += 1
            broadcast = _Broadcast(produce(), lambda: self._forget(key, broadcast))
            self._inflight[key] = broadcast
        else:
            self.coalesced += 1
        first_at: float | None = None
        async for event in broadcast.subscribe():
            if dataclasses.is_dataclass(event) and hasattr(event, "started_at"):
                # Finished: this request's own timings (it may have joined after the leader started).
                if first_at is None and event.first_token_at is not None:
                    first_at = max(event.first_token_at, started)
                event = dataclasses.replace(event, started_at=started, first_token_at=first_at)
            elif first_at is None:
                first_at = time.perf_counter()
            yield event

    def _forget(self, key: Hashable, broadcast: _Broadcast | None) -> None:
        if self._inflight.get(key) is broadcast:
            del self._inflight[key]

    @property
    def in_flight(self) -> int:
        return len(self._inflight)
