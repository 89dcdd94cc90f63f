"""Generation slots, handed out fairly between clients.

A node runs at most ``api.max_concurrent_sessions`` generations; up to ``api.max_queued_requests`` more wait. Before,
they waited in one first-come line: a client that queued 60 requests made everyone who came after wait for all 60
(a red team's finding, docs/security.md "Resource exhaustion"). Here each client (its address, as the rate limiter
sees it: ``CLIENT``) has its own line, and a freed slot goes to the next client in turn, so a request waits for at
most one request of each other waiting client, however many those have queued. When the waiting room is full, a
newcomer takes the place of the newest request of the client with the most waiting (that one gets the 503), unless
the newcomer's client already has the most.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from contextvars import ContextVar

CLIENT: ContextVar[str] = ContextVar("openhydra_client", default="")
"""The client a request comes from (the API sets it for the request's task; "" outside the API)."""


class Refused(Exception):
    """No slot: the waiting room is full (and this client has the most waiting), or this request gave its place to
    another client's."""


class FairSlots:
    """``capacity`` slots for the event loop's tasks; waiting requests are served round-robin by client."""

    def __init__(self, capacity: int, max_waiting: int) -> None:
        if capacity < 1 or max_waiting < 0:
            raise ValueError(f"capacity ({capacity}) must be >= 1 and max_waiting ({max_waiting}) >= 0")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.running = 0
        self._lines: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()  # in turn order
        self.waiting = 0

    async def acquire(self, client: str, timeout_s: float) -> None:
        """A slot for ``client``: at once when one is free and nobody waits, else in its client's line.
        :class:`Refused` when it cannot wait (a full room) or gave its place up; TimeoutError after ``timeout_s``."""
        if self.running < self.capacity and not self.waiting:
            self.running += 1
            return
        if self.waiting >= self.max_waiting and not self._make_room(client):
            raise Refused("full")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lines.setdefault(client, deque()).append(future)
        self.waiting += 1
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except Refused:
            raise  # another client's request took its place (_make_room): already out of the line
        except BaseException:  # the wait ran out (TimeoutError), or the request was cancelled
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()  # handed a slot just as the wait ended: pass it on
            elif not future.done():
                self._withdraw(client, future)
            raise

    def release(self) -> None:
        """A slot is free: the next client in turn gets it (then goes to the back of the turn order)."""
        while self._lines:
            client, line = next(iter(self._lines.items()))
            future = line.popleft()
            self.waiting -= 1
            if line:
                self._lines.move_to_end(client)
            else:
                del self._lines[client]
            if not future.done():
                future.set_result(None)  # the slot passes to it: running stays the same
                return
        self.running -= 1

    def _make_room(self, client: str) -> bool:
        """The room is full: refuse the newest request of the client with the most waiting, if that is not
        ``client`` (or a client with as many); True if a place was freed."""
        most = max(self._lines, key=lambda c: len(self._lines[c]))
        if len(self._lines.get(client, ())) + 1 >= len(self._lines[most]):
            return False
        line = self._lines[most]
        future = line.pop()
        self.waiting -= 1
        if not line:
            del self._lines[most]
        future.set_exception(Refused("gave its place"))
        return True

    def _withdraw(self, client: str, future: asyncio.Future[None]) -> None:
        line = self._lines.get(client)
        if line is not None and future in line:
            line.remove(future)
            self.waiting -= 1
            if not line:
                del self._lines[client]
        future.cancel()
