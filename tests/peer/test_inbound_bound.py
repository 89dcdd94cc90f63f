"""An onion stream's inbound pump reads at most INBOUND_AHEAD steps ahead of its hop.

Unbounded, a stranger whose reply address never read made one stream pile ~4 GiB of padded steps into a peer
in seconds (red team, 2026-12-07): the pump drained gRPC as fast as the stranger wrote, defeating its flow
control. Bounded, the pump waits and gRPC holds the sender back. What the hop reads is unchanged: every step in
order, then the end; a downstream failure still wakes a reader that waits for a step.
"""

from __future__ import annotations

import asyncio

from openhydra.peer.privacy import INBOUND_AHEAD, Inbound


class _Sender:
    """An endless stream of steps, counting what was taken from it."""

    def __init__(self, limit: int | None = None) -> None:
        self.taken = 0
        self.limit = limit

    def __aiter__(self) -> _Sender:
        return self

    async def __anext__(self) -> int:
        await asyncio.sleep(0)  # as a gRPC read does: other tasks run between steps
        if self.limit is not None and self.taken >= self.limit:
            raise StopAsyncIteration
        self.taken += 1
        return self.taken


async def _settle() -> None:
    for _ in range(50):  # let the pump run as far as it can
        await asyncio.sleep(0)


def test_the_pump_stops_reading_while_the_hop_does_not() -> None:
    async def scenario() -> None:
        sender = _Sender()
        inbound = Inbound(sender)
        inbound.watch()
        await _settle()
        assert sender.taken <= INBOUND_AHEAD + 1, sender.taken  # the queue's steps + the one waiting to go in
        assert [await inbound.next() for _ in range(10)] == list(range(1, 11))  # in order, none lost
        await _settle()
        assert sender.taken <= 10 + INBOUND_AHEAD + 1
        await inbound.close()

    asyncio.run(scenario())


def test_the_end_and_a_failure_still_reach_the_reader() -> None:
    async def scenario() -> None:
        ended = Inbound(_Sender(limit=5))
        ended.watch()
        await _settle()  # the sender ended while the queue was full
        assert [await ended.next() for _ in range(5)] == [1, 2, 3, 4, 5]
        assert await ended.next() is None

        waiting = Inbound(_Sender(limit=0))
        waiting.watch()
        empty = Inbound(_Stalled())
        empty.watch()
        reader = asyncio.ensure_future(empty.next())
        await _settle()
        assert not reader.done()  # waits for a step that does not come
        empty.report("downstream: hop 2 failed")
        assert await asyncio.wait_for(reader, 5) == "downstream: hop 2 failed"
        assert await waiting.next() is None
        await empty.close()

    asyncio.run(scenario())


class _Stalled:
    def __aiter__(self) -> _Stalled:
        return self

    async def __anext__(self) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")
