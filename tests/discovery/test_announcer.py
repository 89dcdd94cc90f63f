"""Announcer: re-announces on its interval, keeps a record alive past its TTL, backs off, withdraws."""

from __future__ import annotations

import asyncio
import random
import time

from openhydra.discovery.announcer import Announcer
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.discovery.service import NullDiscovery


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
        d = HttpDiscovery([dht_server], announce_interval_s=0.3, ttl_s=1.0, timeout_s=5)
        reader = HttpDiscovery([dht_server], timeout_s=5)
        ann = Announcer(d, factory("alive"))
        ann.start()
        try:
            await asyncio.sleep(2.2)  # > 2 TTLs
            assert [r.peer_id for r in await reader.lookup("org/model")] == ["alive"]
            assert ann.announced >= 3 and ann.running  # every 0.3 s, allowing for a loaded machine
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
        d = HttpDiscovery([dht_server], announce_interval_s=0.2, ttl_s=0.8, timeout_s=5)
        ann = Announcer(d, factory("dies"))
        ann.start()
        await asyncio.sleep(0.5)
        await ann.stop(withdraw=False)  # like a SIGKILL: nobody withdraws
        assert "dies" in {r.peer_id for r in await d.lookup("org/model")}
        await asyncio.sleep(1.0)
        assert "dies" not in {r.peer_id for r in await d.lookup("org/model")}
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
        while ann.announced == 0 and time.monotonic() - t0 < 3:
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        assert ann.announced == 1 and ann.failures == 0 and ann.last_error is None
        assert 0.3 - 0.05 <= elapsed < 1.5  # retries after 0.05, 0.1, 0.2 s, not after 10 s
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
