"""Discovery feeds routing: spans announced to a real `openhydra-dht` come back as a valid chain,
and a killed peer's span turns into a hole (or a full-model fallback) once its TTL passes."""

from __future__ import annotations

import asyncio
import time

from openhydra.discovery.announcer import Announcer
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import LayerCoverageMap, is_valid_chain, nearest_covered_model
from openhydra.testing.wait import async_wait_until

MODEL = "org/model-12l"


def factory(peer: str, start: int, end: int, tps: float = 10.0, model: str = MODEL, total: int = 12):
    def make(announced_at: float, ttl_s: float) -> PeerAnnouncement:
        return PeerAnnouncement(
            peer_id=peer,
            model_id=model,
            start=start,
            end=end,
            total_layers=total,
            grpc_address=f"127.0.0.1:{50051 + start}",
            throughput_tps=tps,
            announced_at=announced_at,
            ttl_s=ttl_s,
        )

    return make


def test_announced_spans_assemble_and_a_dead_peer_becomes_a_hole(dht_server):
    """Live peers get a TTL far longer than any stall of a loaded machine; only the peer that dies has a
    short one. Its hole is awaited by polling, and must not appear before its TTL can have run out."""
    live_ttl_s, dead_ttl_s = 60.0, 2.0

    async def scenario():
        spans = {"a": (0, 4), "b": (4, 8), "c": (8, 12)}
        announcers = {}
        for peer, (s, e) in spans.items():
            ttl_s, interval_s = (dead_ttl_s, 0.25) if peer == "b" else (live_ttl_s, 1.0)
            d = HttpDiscovery(
                [dht_server], announce_interval_s=interval_s, ttl_s=ttl_s, timeout_s=5, allow_unsigned_names=True
            )
            announcers[peer] = Announcer(d, factory(peer, s, e))
            announcers[peer].start()
        small = Announcer(
            HttpDiscovery([dht_server], announce_interval_s=1.0, ttl_s=live_ttl_s, allow_unsigned_names=True),
            factory("s", 0, 4, model="org/small", total=4),
        )
        small.start()
        coordinator = HttpDiscovery([dht_server], timeout_s=5, allow_unsigned_names=True)

        async def all_three():
            cmap = LayerCoverageMap(await coordinator.lookup(MODEL))
            return cmap if len(cmap) == 3 else None

        cmap = await async_wait_until(all_three, 30, 0.05, f"3 live announced records of {MODEL}")
        chain = cmap.chain()
        assert chain is not None and chain.peer_ids == ["a", "b", "c"] and is_valid_chain(chain, 12, MODEL)
        assert chain.hops[1].peer.grpc_address == "127.0.0.1:50055"
        await async_wait_until(lambda: small.announced > 0, 30, 0.05, "the small model's first announcement")

        await announcers["b"].stop(withdraw=False)  # SIGKILL-like: the record just stops being refreshed
        last_b = announcers["b"].last_record
        assert last_b is not None

        async def b_is_a_hole():
            cmap = LayerCoverageMap(await coordinator.lookup(MODEL), model_id=MODEL)
            return cmap if cmap.coverage().holes else None

        hole_map = await async_wait_until(b_is_a_hole, dead_ttl_s + 30, 0.05, "b's record to expire into a hole")
        # The server starts a record's TTL when the announce arrives, which is after the client stamped it.
        assert time.time() >= last_b.announced_at + dead_ttl_s - 0.05, "b's record expired before its TTL"
        assert hole_map.coverage().holes == [(4, 8)]
        assert sorted(hole_map.peers) == ["a", "c"]
        small_map = LayerCoverageMap(await coordinator.lookup("org/small"), model_id="org/small")
        maps = {MODEL: hole_map, "org/small": small_map}
        choice = nearest_covered_model(MODEL, [MODEL, "org/small"], maps)
        assert choice.model_id == "org/small" and "layers [4, 8)" in choice.reason

        await Announcer(
            HttpDiscovery([dht_server], allow_unsigned_names=True), factory("full", 0, 12, tps=2.0), ttl_s=30
        ).announce_once()
        cmap = LayerCoverageMap(await coordinator.lookup(MODEL))
        assert cmap.chain().peer_ids == ["full"]  # the full-model peer covers the hole
        for ann in [*announcers.values(), small]:
            await ann.stop()
        await coordinator.stop()

    asyncio.run(scenario())
