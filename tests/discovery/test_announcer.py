"""Announcer: re-announces on its interval, keeps a record alive past its TTL, backs off, withdraws."""

from __future__ import annotations

import asyncio
import random
import time

from openhydra.discovery.announcer import Announcer
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.discovery.service import NullDiscovery
from openhydra.testing.wait import async_wait_until


def factory(peer: str = "me", **kw):
    def make(announced_at: float, ttl_s: float) -> PeerAnnouncement:
        return PeerAnnouncement(
            peer_id=peer,
            model_id="org/model",
            start=0,
            end=8,
            total_layers=8,
            grpc_address="127.0.0.1:50051",
            announced_at=announced_at,
            ttl_s=ttl_s,
            **kw,
        )

    return make


def test_record_stays_alive_past_ttl_while_announcing_then_withdrawn(dht_server):
    async def scenario():
        ttl_s = 2.0  # 8 announce intervals: a loaded machine may stall the loop for a while without a lapse
        d = HttpDiscovery([dht_server], announce_interval_s=0.25, ttl_s=ttl_s, timeout_s=5, allow_unsigned_names=True)
        reader = HttpDiscovery([dht_server], timeout_s=5, allow_unsigned_names=True)
        ann = Announcer(d, factory("alive"))
        ann.start()
        try:
            await async_wait_until(lambda: ann.announced >= 1, 30, 0.02, "the first announcement")
            first_arrived_by = time.time()  # the server started the first record's TTL before this
            await async_wait_until(
                lambda: ann.announced >= 3 and time.time() > first_arrived_by + ttl_s + 0.2,
                30,
                0.02,
                "3 announcements and the first record's TTL passed",
            )
            assert [r.peer_id for r in await reader.lookup("org/model")] == ["alive"]  # kept alive by refreshes
            assert ann.running and ann.failures == 0
            await ann.stop()
            assert not ann.running
            assert await reader.lookup("org/model") == []  # withdrawn at once, not after the TTL
        finally:
            await ann.stop(withdraw=False)
            await d.stop()
            await reader.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_dead_peer_disappears_after_ttl_when_announcer_stops_without_withdraw(dht_server):
    async def scenario():
        ttl_s = 2.0
        d = HttpDiscovery([dht_server], announce_interval_s=0.25, ttl_s=ttl_s, timeout_s=5, allow_unsigned_names=True)
        ann = Announcer(d, factory("dies"))
        ann.start()
        await async_wait_until(lambda: ann.announced >= 2, 30, 0.02, "two announcements")
        await ann.stop(withdraw=False)  # like a SIGKILL: nobody withdraws
        last = ann.last_record
        assert last is not None
        assert "dies" in {r.peer_id for r in await d.lookup("org/model")}

        async def gone():
            return "dies" not in {r.peer_id for r in await d.lookup("org/model")}

        await async_wait_until(gone, ttl_s + 30, 0.05, "the unrefreshed record to expire")
        # The server starts the TTL when the announce arrives, after the record was stamped.
        assert time.time() >= last.announced_at + ttl_s - 0.05, "the record vanished before its TTL"
        await d.stop()

    asyncio.run(scenario())


def test_failures_back_off_and_recover():
    class Flaky(NullDiscovery):
        fail = 3

        async def _announce(self, record):
            if self.fail:
                self.fail -= 1
                raise ConnectionError("down")
            await super()._announce(record)

    async def scenario():
        d = Flaky(announce_interval_s=10.0, ttl_s=30.0)
        ann = Announcer(d, factory(), retry_s=0.05, rng=random.Random(0))
        assert ann.next_delay() >= 9.0  # healthy: the interval, with +-10% jitter
        ann.start()
        t0 = time.monotonic()
        await async_wait_until(lambda: ann.announced > 0, 30, 0.01, "an announcement after 3 failures")
        elapsed = time.monotonic() - t0
        assert ann.announced == 1 and ann.failures == 0 and ann.last_error is None
        # Retries after 0.05, 0.1, 0.2 s; the healthy interval would be >= 9 s (a loaded machine adds delay).
        assert 0.3 - 0.05 <= elapsed < 5.0, elapsed
        assert [r.peer_id for r in await d.lookup("org/model")] == ["me"]
        await ann.stop()
        assert await d.lookup("org/model") == []

    asyncio.run(scenario())


def test_null_discovery_sees_only_own_live_records():
    async def scenario():
        clock = [1_800_000_000.0]
        d = NullDiscovery(clock=lambda: clock[0])
        await d.announce(factory("me")(clock[0], 10.0))
        assert [r.peer_id for r in await d.lookup("org/model")] == ["me"]
        clock[0] += 11
        assert await d.lookup("org/model") == []

    asyncio.run(scenario())


def test_stop_ends_the_loop_even_when_a_cancel_is_lost():
    """Python 3.11's asyncio.wait_for loses a cancel that arrives as its call completes (seen in the suite: stop()
    waited 60 s for a loop that went on announcing). Here the announce swallows the first cancel outright:
    stop() must still end the loop, withdraw, and return within seconds."""

    class Stubborn(NullDiscovery):
        entered: asyncio.Event
        swallowed = 0

        async def _announce(self, record):
            await super()._announce(record)
            self.entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if self.swallowed:
                    raise
                self.swallowed += 1  # the lost cancel: return as if the call had just completed

    async def scenario():
        d = Stubborn(announce_interval_s=0.05, ttl_s=30.0)
        d.entered = asyncio.Event()
        ann = Announcer(d, factory())
        ann.start()
        await asyncio.wait_for(d.entered.wait(), 30)
        began = time.monotonic()
        await asyncio.wait_for(ann.stop(), 20)  # the old stop() awaited the task for ever
        assert time.monotonic() - began < 10
        assert d.swallowed == 1 and not ann.running
        assert await d.lookup("org/model") == []  # withdrawn

    asyncio.run(scenario())
