"""The discrete-event loop: churn, announcements, requests, failover, and coverage sampling.

Deterministic for a seed: one RNG stream, one event heap ordered by (time, sequence). Only the
wall-clock timings of route choice vary between runs; they never feed back into the simulation.

A request is routed by its coordinator with the real ``nearest_covered_model`` (degrading to a
smaller covered model) over real ``LayerCoverageMap``s; a hop whose peer is gone is noticed after
``crash_detect_s``, banned in the coordinator's real ``BanList`` and replaced with
``replacement_for`` exactly as ``SwarmPipeline`` does, then the session's history is replayed
(a prefill of prompt + tokens so far) and decoding resumes. Per-token latency is fixed per chain
segment from the peers' load when it was chosen (a simplification: later arrivals do not slow it).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from openhydra.router.coverage import Chain, chain_problems, nearest_covered_model
from openhydra.sim.best import best_token_ms, chain_prefill_ms, chain_token_ms, resolve
from openhydra.sim.config import SimConfig
from openhydra.sim.metrics import CoverageSample, Metrics
from openhydra.sim.swarm import Coordinator, Swarm
from openhydra.sim.world import SimPeer, World


@dataclass
class Session:
    sid: int
    coord: Coordinator
    requested: str
    prompt: int
    new_tokens: int
    arrived_at: float
    model: str | None = None
    chain: Chain | None = None
    hops: list[tuple[SimPeer, int, int]] | None = None
    done: int = 0  # tokens delivered when the current segment started
    seg_first: float = 0.0  # time the segment's first token lands
    token_ms: float = 0.0
    version: int = 0
    attempts: int = 0  # route attempts in this step (bounded by max_failovers_per_step)
    deadline: float = 0.0  # give up routing after this time (route_wait_s)
    broken: tuple[int, int] | None = None  # span of the hop that failed, to replace
    failed_at: float | None = None  # when a peer of its chain left (recovery is measured from here)
    started: bool = False


class Simulation:
    def __init__(self, cfg: SimConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.clock = [0.0]
        self.world = World(cfg, self.rng)
        self.swarm = Swarm(cfg, self.world, self.clock)
        self.metrics = Metrics()
        self.sessions: dict[int, Session] = {}
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._next_sid = 0
        self.wall_s = 0.0

    # -- event plumbing -------------------------------------------------------------------------------
    def at(self, t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self._heap, (t, self._seq, kind, payload))
        self._seq += 1

    @property
    def now(self) -> float:
        return self.clock[0]

    def schedule_request(self, t: float, requested: str, prompt: int, new_tokens: int, coordinator: int = 0) -> None:
        """One scripted request (tests and scenarios), besides the Poisson arrivals."""
        self.at(t, "scripted", (requested, prompt, new_tokens, coordinator))

    def schedule_leave(self, t: float, peer: SimPeer, graceful: bool) -> None:
        self.at(t, "leave", (peer, graceful))

    def run(self, arrivals: bool = True) -> Metrics:
        """Run to the end: the initial swarm joins at t=0, then churn and requests until the horizon.

        ``arrivals=False`` leaves out the random joins, leaves and requests (scripted scenarios).
        """
        started = time.perf_counter()
        cfg = self.cfg
        for _ in range(cfg.peers):
            peer = self.swarm.join()
            if peer is not None:
                self._schedule_peer(peer, self.rng.uniform(0, cfg.discovery.announce_interval_s), arrivals)
        join_rate = cfg.peers * cfg.churn_per_hour / 3600.0
        if arrivals and join_rate > 0:
            self.at(self.rng.expovariate(join_rate), "join")
        if arrivals:
            self.at(self.rng.expovariate(cfg.request_rate_per_s), "request")
        self.at(0.0, "sample")
        if arrivals and cfg.measure.kill_busy_every_s > 0:
            self.at(cfg.measure.kill_busy_every_s, "kill_busy")
        handlers = {"join": self._on_join, "scripted": self._on_scripted, "leave": self._on_leave,
                    "announce": self._on_announce, "request": self._on_request, "route": self._on_route,
                    "hop_failed": self._on_hop_failed, "complete": self._on_complete, "sample": self._on_sample,
                    "kill_busy": self._on_kill_busy}
        while self._heap:
            t, _, kind, payload = heapq.heappop(self._heap)
            self.clock[0] = t
            handlers[kind](payload)
        self.wall_s = time.perf_counter() - started
        return self.metrics

    def _schedule_peer(self, peer: SimPeer, first_announce: float, churn: bool = True) -> None:
        cfg = self.cfg
        self.at(self.now + first_announce, "announce", peer)
        if churn and cfg.churn_per_hour > 0:
            life = self.rng.expovariate(cfg.churn_per_hour / 3600.0)
            if self.now + life < cfg.horizon_s:
                self.at(self.now + life, "leave", (peer, self.rng.random() < cfg.graceful_fraction))

    # -- churn ------------------------------------------------------------------------------------------
    def _newcomer(self, tier: str | None = None) -> None:
        peer = self.swarm.join(tier)
        if peer is not None:
            self._schedule_peer(peer, first_announce=self.cfg.discovery.announce_interval_s)

    def _on_join(self, _: None) -> None:
        self._newcomer()
        t = self.now + self.rng.expovariate(self.cfg.peers * self.cfg.churn_per_hour / 3600.0)
        if t < self.cfg.horizon_s:
            self.at(t, "join")

    def _on_announce(self, peer: SimPeer) -> None:
        if not peer.alive:
            return
        self.swarm.announce(peer)
        interval = self.cfg.discovery.announce_interval_s * self.rng.uniform(0.9, 1.1)
        if self.now + interval < self.cfg.horizon_s + 900.0:
            self.at(self.now + interval, "announce", peer)

    def _on_leave(self, payload: tuple[SimPeer, bool]) -> None:
        peer, graceful = payload
        if not peer.alive:
            return
        self.swarm.leave(peer, graceful)
        for sid in sorted(peer.sessions):
            s = self.sessions[sid]
            self.metrics.sessions_hit += 1
            done_now = self._delivered(s)
            self._release(s, done_now)
            s.done = done_now
            s.version += 1
            s.failed_at = self.now
            s.broken = next((a, b) for p, a, b in s.hops or [] if p is peer)
            delay = self.world.one_way_ms(peer.host, s.coord.host) / 1000.0 if graceful \
                else self.cfg.routing.crash_detect_s
            self.at(self.now + delay, "hop_failed", (s, peer.peer_id, s.version))

    def _on_kill_busy(self, _: None) -> None:
        """Fault injection: a peer serving a session leaves and a newcomer joins (recovery is measured often)."""
        busy = sorted({p.peer_id for s in self.sessions.values() for p, _, _ in s.hops or [] if p.alive and p.sessions})
        if busy:
            peer = self.swarm.peers[self.rng.choice(busy)]
            self._on_leave((peer, self.rng.random() < self.cfg.graceful_fraction))
            self.metrics.forced_leaves += 1
            self._newcomer(peer.tier)  # churn, not shrinkage: the same kind of machine joins (shard=auto)
        t = self.now + self.cfg.measure.kill_busy_every_s
        if t < self.cfg.horizon_s:
            self.at(t, "kill_busy")

    # -- requests --------------------------------------------------------------------------------------
    def _open(self, coord: Coordinator, requested: str, prompt: int, new_tokens: int) -> Session:
        s = Session(sid=self._next_sid, coord=coord, requested=requested, prompt=prompt, new_tokens=new_tokens,
                    arrived_at=self.now, deadline=self.now + self.cfg.routing.route_wait_s)
        self._next_sid += 1
        self.sessions[s.sid] = s
        self.metrics.requests += 1
        self._on_route(s)
        return s

    def _on_scripted(self, payload: tuple[str, int, int, int]) -> None:
        requested, prompt, new_tokens, coordinator = payload
        self._open(self.swarm.coordinators[coordinator], requested, prompt, new_tokens)

    def _on_request(self, _: None) -> None:
        cfg = self.cfg
        names, shares = zip(*cfg.request_mix.items(), strict=True)
        coord = self.rng.choice(self.swarm.coordinators)
        requested = self.rng.choices(names, weights=shares)[0]
        prompt = self.rng.randint(*cfg.prompt_tokens)
        self._open(coord, requested, prompt, self.rng.randint(*cfg.new_tokens))
        t = self.now + self.rng.expovariate(cfg.request_rate_per_s)
        if t < cfg.horizon_s:
            self.at(t, "request")

    def _on_route(self, s: Session) -> None:
        swarm, cfg = self.swarm, self.cfg
        coord = s.coord
        refresh = s.attempts > 0 or s.broken is not None
        if s.model is None:  # first route: the requested model, or the nearest smaller covered one
            order = cfg.catalog_order
            candidates = order[order.index(s.requested):]
            maps = swarm.maps_for(coord, candidates, refresh=refresh)
            fresh = swarm.first_use(maps[s.requested])
            t0, c0 = time.perf_counter(), time.process_time()
            choice = nearest_covered_model(s.requested, order, maps, exclude=coord.bans.banned())
            self._timed(t0, c0, fresh)
            model, chain = (choice.model_id, choice.chain) if choice else (None, None)
            if choice is not None and cfg.routing.spread > 0:  # nearest_covered_model takes no rng
                chain = maps[model].chain(exclude=coord.bans.banned(), rng=self.rng) or chain
        else:  # failover: a peer or a sub-chain for exactly the failed span (SwarmPipeline._repair)
            model = s.model
            cmap = swarm.coverage_map(coord, model, refresh=True)
            banned = coord.bans.banned()
            rng = self.rng if cfg.routing.spread > 0 else None
            fresh = swarm.first_use(cmap)
            t0, c0 = time.perf_counter(), time.process_time()
            chain = None
            if s.broken is not None and s.chain is not None:
                patch = cmap.replacement_for(s.broken, exclude=banned, rng=rng)
                if patch is not None:
                    index = next(i for i, h in enumerate(s.chain.hops) if (h.start, h.end) == s.broken)
                    spliced = Chain(s.chain.hops[:index] + patch.hops + s.chain.hops[index + 1:])
                    if not chain_problems(spliced, cfg.models[model].layers, model):
                        chain = spliced
            if chain is None:
                chain = cmap.chain(exclude=banned, rng=rng)
            self._timed(t0, c0, fresh)
        if chain is None:
            if self.now + cfg.routing.retry_every_s <= s.deadline:
                s.attempts += 1
                self.at(self.now + cfg.routing.retry_every_s, "route", s)
            else:
                self._finish(s, ok=False, reason="no_route")
            return
        hops = resolve(chain, swarm.peers)
        dead = next((p for p, _, _ in hops if not p.alive), None)
        if dead is not None:  # a stale record: the connection fails after the deadline
            self.metrics.dead_on_route += 1
            s.model, s.chain = model, chain
            s.broken = next((a, b) for p, a, b in hops if p is dead)
            s.version += 1
            self.at(self.now + cfg.routing.crash_detect_s, "hop_failed", (s, dead.peer_id, s.version))
            return
        self._start(s, model, chain, hops)

    def _timed(self, wall0: float, cpu0: float, fresh: bool) -> None:
        m = self.metrics
        m.route_choice_ms.append((time.perf_counter() - wall0) * 1000.0)
        (m.route_choice_first_cpu_ms if fresh else m.route_choice_cpu_ms).append((time.process_time() - cpu0) * 1000.0)

    def _on_hop_failed(self, payload: tuple[Session, str, int]) -> None:
        s, peer_id, version = payload
        if version != s.version:
            return
        s.coord.bans.ban(peer_id)
        self.metrics.banned.append(peer_id)
        self.metrics.failovers += 1
        s.attempts += 1
        if s.attempts > self.cfg.routing.max_failovers_per_step:
            self._finish(s, ok=False, reason="too_many_failovers")
            return
        s.deadline = self.now + self.cfg.routing.route_wait_s
        self._on_route(s)

    def _start(self, s: Session, model: str, chain: Chain, hops: list[tuple[SimPeer, int, int]]) -> None:
        cfg, world, m = self.cfg, self.world, self.metrics
        lp = cfg.routing.load_penalty
        token_ms = chain_token_ms(world, s.coord.host, hops, lp)
        history = s.prompt + s.done
        prefill_ms = chain_prefill_ms(world, s.coord.host, hops, lp, history, cfg.compute.prefill_parallel)
        if not s.started:
            s.started = True
            if model != s.requested:
                m.degraded += 1
            m.token_ms.append(token_ms)
            m.ttft_ms.append((self.now - s.arrived_at) * 1000.0 + prefill_ms)
            if self.rng.random() < cfg.measure.best_route_fraction:
                live = list(self.swarm.live[model].values())
                best = best_token_ms(world, s.coord.host, live, cfg.models[model].layers, lp, cfg.routing.allow_partial)
                m.best_token_ms.append(best)
                m.paired_ratio.append(token_ms / best)
        s.model, s.chain, s.hops, s.token_ms = model, chain, hops, token_ms
        s.attempts, s.broken = 0, None
        s.seg_first = self.now + prefill_ms / 1000.0
        if s.failed_at is not None:
            m.recovery_ms.append((s.seg_first - s.failed_at) * 1000.0)
            s.failed_at = None
        for peer, _, _ in hops:
            peer.active += 1
            peer.sessions.add(s.sid)
        remaining = s.new_tokens - s.done - 1  # the prefill (or replay) delivers one token
        s.version += 1
        self.at(s.seg_first + max(0, remaining) * token_ms / 1000.0, "complete", (s, s.version))

    def _delivered(self, s: Session) -> int:
        """Tokens the client has received by now (the segment's first lands at seg_first)."""
        if self.now < s.seg_first:
            return s.done
        extra = 1 + int((self.now - s.seg_first) * 1000.0 / s.token_ms) if s.token_ms > 0 else s.new_tokens
        return min(s.new_tokens - 1, s.done + extra)

    def _release(self, s: Session, done_now: int) -> None:
        served = max(0, done_now - s.done)
        for peer, a, b in s.hops or []:
            if s.sid in peer.sessions:
                peer.sessions.discard(s.sid)
                peer.active -= 1
                peer.busy_ms += served * peer.layer_ms * (b - a)

    def _on_complete(self, payload: tuple[Session, int]) -> None:
        s, version = payload
        if version != s.version:
            return
        self._release(s, s.new_tokens)
        self._finish(s, ok=True)

    def _finish(self, s: Session, ok: bool, reason: str = "") -> None:
        if ok:
            self.metrics.succeeded += 1
        else:
            self.metrics.failed[reason] += 1
        s.version += 1
        del self.sessions[s.sid]

    # -- measurement ------------------------------------------------------------------------------------
    def _on_sample(self, _: None) -> None:
        for model, spec in self.cfg.models.items():
            diff = [0] * (spec.layers + 1)
            for p in self.swarm.live[model].values():
                diff[p.start] += 1
                diff[p.end] -= 1
            dht_diff = [0] * (spec.layers + 1)
            for r in self.swarm.records(model):
                dht_diff[r.start] += 1
                dht_diff[r.end] -= 1
            counts, dht_counts, run, drun = [], [], 0, 0
            for i in range(spec.layers):
                run += diff[i]
                drun += dht_diff[i]
                counts.append(run)
                dht_counts.append(drun)
            self.metrics.coverage.append(CoverageSample(
                self.now, model, len(self.swarm.live[model]), sum(1 for c in counts if c == 0),
                sum(1 for c in dht_counts if c == 0), min(counts)))
        if self.now + self.cfg.measure.sample_s <= self.cfg.horizon_s:
            self.at(self.now + self.cfg.measure.sample_s, "sample")

    def load_gini(self, model: str) -> float:
        """Gini of peers' utilization (compute busy time / time alive) for one model."""
        from openhydra.sim.metrics import gini

        end = self.now
        util = []
        for p in self.swarm.peers.values():
            if p.model == model:
                alive_s = (p.left_at if p.left_at is not None else end) - p.joined_at
                if alive_s > 0:
                    util.append(p.busy_ms / (alive_s * 1000.0))
        return gini(util)

    def report(self) -> dict[str, object]:
        out = self.metrics.summary()
        out.update(peers=self.cfg.peers, joined=self.swarm.joined, left=self.swarm.left,
                   live_at_end=self.swarm.live_count(), horizon_s=self.cfg.horizon_s,
                   churn_per_hour=self.cfg.churn_per_hour, wall_s=round(self.wall_s, 2),
                   map_builds=self.swarm.map_builds,
                   map_build_ms_p50=_p(self.swarm.map_build_ms, 50), map_build_ms_p99=_p(self.swarm.map_build_ms, 99),
                   map_build_cpu_ms_p50=_p(self.swarm.map_build_cpu_ms, 50),
                   map_build_cpu_ms_p99=_p(self.swarm.map_build_cpu_ms, 99))
        by_model: dict[str, dict[str, object]] = {}
        for model in self.cfg.models:
            samples = [c for c in self.metrics.coverage if c.model == model]
            by_model[model] = {
                "live_peers_end": len(self.swarm.live[model]),
                "samples_with_hole": sum(1 for c in samples if c.holes_layers),
                "samples": len(samples),
                "max_holes_layers": max((c.holes_layers for c in samples), default=0),
                "min_peers_per_layer": min((c.min_peers_per_layer for c in samples), default=0),
                "load_gini": round(self.load_gini(model), 4),
            }
        out["models"] = by_model
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _p(values: list[float], q: float) -> float:
    from openhydra.sim.metrics import percentile

    return percentile(values, q)
