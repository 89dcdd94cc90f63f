"""Discovery feeds routing: spans announced to a real `openhydra-dht` come back as a valid chain,
and a killed peer's span turns into a hole (or a full-model fallback) once its TTL passes."""

from __future__ import annotations

import asyncio

from openhydra.discovery.announcer import Announcer
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import LayerCoverageMap, is_valid_chain, nearest_covered_model

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
    async def scenario():
        spans = {"a": (0, 4), "b": (4, 8), "c": (8, 12)}
        announcers = {}
        for peer, (s, e) in spans.items():
            d = HttpDiscovery([dht_server], announce_interval_s=0.25, ttl_s=1.0, timeout_s=5)
            announcers[peer] = Announcer(d, factory(peer, s, e))
            announcers[peer].start()
        small = Announcer(
            HttpDiscovery([dht_server], announce_interval_s=0.25, ttl_s=1.0),
            factory("s", 0, 4, model="org/small", total=4),
        )
        small.start()
        coordinator = HttpDiscovery([dht_server], timeout_s=5)
        for _ in range(100):  # first announcements land within a few event-loop turns
            if len(await coordinator.lookup(MODEL)) == 3:
                break
            await asyncio.sleep(0.05)

        cmap = LayerCoverageMap(await coordinator.lookup(MODEL))
        chain = cmap.chain()
        assert chain is not None and chain.peer_ids == ["a", "b", "c"] and is_valid_chain(chain, 12, MODEL)
        assert chain.hops[1].peer.grpc_address == "127.0.0.1:50055"

        await announcers["b"].stop(withdraw=False)  # SIGKILL-like: the record just stops being refreshed
        await asyncio.sleep(1.5)
        maps = {m: LayerCoverageMap(await coordinator.lookup(m), model_id=m) for m in (MODEL, "org/small")}
        assert maps[MODEL].coverage().holes == [(4, 8)]
        choice = nearest_covered_model(MODEL, [MODEL, "org/small"], maps)
        assert choice.model_id == "org/small" and "layers [4, 8)" in choice.reason

        await Announcer(HttpDiscovery([dht_server]), factory("full", 0, 12, tps=2.0), ttl_s=30).announce_once()
        cmap = LayerCoverageMap(await coordinator.lookup(MODEL))
        assert cmap.chain().peer_ids == ["full"]  # the full-model peer covers the hole
        for ann in [*announcers.values(), small]:
            await ann.stop()
        await coordinator.stop()

    asyncio.run(scenario())
