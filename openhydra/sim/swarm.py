"""The simulated swarm's membership: peers joining with ``shard=auto``, leaving, and the DHT view.

A newcomer is promoted to the largest model its memory fits and picks its span with the real
``choose_span`` over the records the DHT holds at that moment (stale ones included), like a node
with ``shard=auto``. Records expire ``ttl_s`` after their announcement; a peer that leaves
gracefully withdraws its record, a crashed one leaves it behind until it expires.

Coordinators keep one real ``LayerCoverageMap`` per model, rebuilt from a DHT lookup when it is
older than ``lookup_ttl_s`` (or on failover), with their own measured RTT to every peer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.bans import BanList, BanTunables
from openhydra.router.coverage import LayerCoverageMap, RouteTunables
from openhydra.router.spans import choose_span
from openhydra.sim.config import SimConfig
from openhydra.sim.world import EPOCH, Host, SimPeer, World


@dataclass
class Coordinator:
    index: int
    host: Host
    bans: BanList
    maps: dict[str, tuple[float, LayerCoverageMap]] = field(default_factory=dict)  # model -> (built at, map)


class Swarm:
    def __init__(self, cfg: SimConfig, world: World, clock: list[float]) -> None:
        self.cfg = cfg
        self.world = world
        self._clock = clock  # clock[0] is the simulated time, shared with the event loop
        self.peers: dict[str, SimPeer] = {}  # every peer that ever joined, by id
        self.live: dict[str, dict[str, SimPeer]] = {m: {} for m in cfg.models}  # model -> live peers
        self.dht: dict[str, dict[str, PeerAnnouncement]] = {m: {} for m in cfg.models}  # model -> records
        self.joined = 0
        self.left = 0
        self.map_builds = 0
        self.map_build_ms: list[float] = []  # wall clock
        self.map_build_cpu_ms: list[float] = []  # CPU time of this process (fair on a shared machine)
        self._used_maps: set[int] = set()
        self.tunables = RouteTunables(load_penalty=cfg.routing.load_penalty, spread=cfg.routing.spread)
        bans = BanTunables(initial_s=cfg.routing.ban_initial_s, max_s=cfg.routing.ban_max_s)
        self.coordinators = [
            Coordinator(i, world.new_host(), BanList(bans, clock=lambda: self._clock[0]))
            for i in range(cfg.coordinators)
        ]

    @property
    def now(self) -> float:
        return self._clock[0]

    # -- membership ------------------------------------------------------------------------------------
    def records(self, model: str) -> list[PeerAnnouncement]:
        """What a DHT lookup returns now (records not yet expired, stale ones of crashed peers too)."""
        now = EPOCH + self.now
        table = self.dht[model]
        expired = [pid for pid, r in table.items() if r.announced_at + r.ttl_s <= now]
        for pid in expired:
            del table[pid]
        return list(table.values())

    def join(self, tier: str | None = None) -> SimPeer | None:
        """A newcomer: promote, choose a span from the DHT (``shard=auto``), announce. None if nothing fits."""
        world = self.world
        tier = tier or world.draw_tier()
        hw = self.cfg.hardware[tier]
        model = self.cfg.promote(hw)
        if model is None:
            return None
        total = self.cfg.models[model].layers
        span = choose_span(self.records(model), total, self.cfg.max_layers(hw, model), model_id=model,
                           now=EPOCH + self.now)
        return self.add(world.make_peer(self.joined, tier, model, span, self.now, world.new_host()))

    def add(self, peer: SimPeer) -> SimPeer:
        """Register a peer built by hand (scripted scenarios and tests) and announce it."""
        self.joined += 1
        self.peers[peer.peer_id] = peer
        self.live[peer.model][peer.peer_id] = peer
        self.announce(peer)
        return peer

    def announce(self, peer: SimPeer) -> None:
        if peer.alive:
            self.dht[peer.model][peer.peer_id] = peer.record(self.now, self.cfg.discovery.ttl_s)

    def leave(self, peer: SimPeer, graceful: bool) -> None:
        peer.alive = False
        peer.left_at = self.now
        self.left += 1
        self.live[peer.model].pop(peer.peer_id, None)
        if graceful:
            self.dht[peer.model].pop(peer.peer_id, None)

    def live_count(self) -> int:
        return sum(len(v) for v in self.live.values())

    # -- coordinators ----------------------------------------------------------------------------------
    def coverage_map(self, coord: Coordinator, model: str, refresh: bool = False) -> LayerCoverageMap:
        cached = coord.maps.get(model)
        if cached is not None and not refresh and self.now - cached[0] < self.cfg.discovery.lookup_ttl_s:
            return cached[1]
        records = self.records(model)
        peers, world, host = self.peers, self.world, coord.host

        def rtt(peer_id: str) -> float:
            return world.rtt_ms(host, peers[peer_id].host)

        t0, c0 = time.perf_counter(), time.process_time()
        cmap = LayerCoverageMap(records, self.cfg.models[model].layers, model_id=model, rtt_ms=rtt,
                                now=EPOCH + self.now, allow_partial=self.cfg.routing.allow_partial,
                                tunables=self.tunables)
        self.map_build_ms.append((time.perf_counter() - t0) * 1000.0)
        self.map_build_cpu_ms.append((time.process_time() - c0) * 1000.0)
        if cached is not None:
            self._used_maps.discard(id(cached[1]))
        self.map_builds += 1
        coord.maps[model] = (self.now, cmap)
        return cmap

    def first_use(self, cmap: LayerCoverageMap) -> bool:
        """True the first time a map is routed on (a partial map then builds its per-layer index)."""
        if id(cmap) in self._used_maps:
            return False
        self._used_maps.add(id(cmap))
        return True

    def maps_for(self, coord: Coordinator, models: list[str], refresh: bool = False) -> dict[str, LayerCoverageMap]:
        return {m: self.coverage_map(coord, m, refresh) for m in models}
