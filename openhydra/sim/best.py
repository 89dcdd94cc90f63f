"""Per-token latency of a route in the simulated truth, and the best route possible.

Push forwarding (DESIGN §3): one token costs coordinator -> hop 1 -> ... -> hop k -> coordinator
one-way latencies plus each hop's compute for the layers it runs (slowed by its load). The router's
cost model only knows coordinator <-> peer RTTs; the truth uses peer <-> peer latency. So the best
route is computed here independently, exactly, by dynamic programming over layer boundaries:

    D[y][p] = cheapest time to have run layers [0, y) with the last hop on peer p.

Peer-to-peer latency is (RTT[region_q, region_p] + access_q + access_p) / 2, which splits by region,
so the minimum over the previous peer q is a minimum over R regions of per-region minima:
O(L * (n + R^2)) for n peers, L layers, R regions (numpy over peers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openhydra.router.coverage import Chain
from openhydra.sim.world import Host, SimPeer, World


def slowdown(peer: SimPeer, load_penalty: float) -> float:
    return 1.0 + load_penalty * peer.load


def chain_token_ms(world: World, coord: Host, hops: Sequence[tuple[SimPeer, int, int]], load_penalty: float) -> float:
    """One decode step through ``hops`` [(peer, start, end)], ms: one-way hops plus compute."""
    total = 0.0
    prev = coord
    for peer, a, b in hops:
        total += world.one_way_ms(prev, peer.host) + peer.layer_ms * (b - a) * slowdown(peer, load_penalty)
        prev = peer.host
    return total + world.one_way_ms(prev, coord)


def chain_prefill_ms(world: World, coord: Host, hops: Sequence[tuple[SimPeer, int, int]], load_penalty: float,
                     tokens: int, prefill_parallel: float) -> float:
    """Prefill (or replay) of ``tokens`` tokens: one pass, compute scaled by (1 + tokens / parallel)."""
    factor = 1.0 + tokens / prefill_parallel
    total = 0.0
    prev = coord
    for peer, a, b in hops:
        total += world.one_way_ms(prev, peer.host) + peer.layer_ms * (b - a) * slowdown(peer, load_penalty) * factor
        prev = peer.host
    return total + world.one_way_ms(prev, coord)


def resolve(chain: Chain, peers: dict[str, SimPeer]) -> list[tuple[SimPeer, int, int]]:
    return [(peers[h.peer_id], h.start, h.end) for h in chain.hops]


def best_token_ms(world: World, coord: Host, peers: Sequence[SimPeer], total_layers: int, load_penalty: float,
                  allow_partial: bool) -> float:
    """The cheapest per-token latency over every valid chain of ``peers`` (live ones), ms; inf if none."""
    if not peers:
        return float("inf")
    start = np.fromiter((p.start for p in peers), dtype=np.int64, count=len(peers))
    end = np.fromiter((p.end for p in peers), dtype=np.int64, count=len(peers))
    comp = np.fromiter((p.layer_ms * slowdown(p, load_penalty) for p in peers), dtype=float, count=len(peers))
    region = np.fromiter((p.host.region for p in peers), dtype=np.int64, count=len(peers))
    half_access = np.fromiter((p.host.access_ms / 2.0 for p in peers), dtype=float, count=len(peers))
    half_rtt = world.rtt / 2.0  # [R, R]
    n_regions = half_rtt.shape[0]
    inf = np.inf
    # F[p] = min over entry layers x of (cost to enter p at x) - comp[p] * x
    entry_min = np.full(len(peers), inf)
    for x in range(total_layers):
        if x == 0:
            enter = half_rtt[coord.region, region] + coord.access_ms / 2.0 + half_access
        else:
            ends_here = (start < x) & (end >= x) if allow_partial else end == x
            done = np.where(ends_here, entry_min + comp * x, inf)  # D[x][q]
            if not np.isfinite(done).any():
                if not np.isfinite(entry_min).any():
                    return inf
                continue
            per_region = np.full(n_regions, inf)
            np.minimum.at(per_region, region, done + half_access)
            enter = (per_region[:, None] + half_rtt).min(axis=0)[region] + half_access
        can_enter = (start <= x) & (end > x) if allow_partial else start == x
        entry_min = np.minimum(entry_min, np.where(can_enter, enter - comp * x, inf))
    finish = np.where(end == total_layers, entry_min + comp * total_layers, inf)
    back = half_rtt[region, coord.region] + coord.access_ms / 2.0 + half_access
    return float((finish + back).min())
