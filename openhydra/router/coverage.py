"""Layer coverage map: which peers cover which layers of one model, and the chain to run through.

A chain is a list of hops ``(peer, start, end)`` whose ranges tile ``[0, L)`` in order (DESIGN §6);
each hop's range lies inside the peer's announced span. Two rules, chosen per map:

- ``allow_partial=False`` (default, always safe): a hop runs the peer's whole span, so spans must
  tile ``[0, L)`` exactly. Use it while peers cannot be told to run a sub-range.
- ``allow_partial=True``: a hop may run a sub-range of the peer's span (``hop.start > peer.start``
  or ``hop.end < peer.end``); the coordinator must send ``hop.start``/``hop.end`` to the peer.
  Then a chain exists whenever every layer is covered by some peer.

Assembly. Build (O(n log n), once per lookup): de-duplicate, drop expired, banned and zero-score
peers, group peers by span, each group sorted by estimated cost. Choice (per request): the
cheapest path over layer boundaries, one edge per distinct span (its best non-excluded peer):
O(s) exact for s distinct spans; partial uses a per-layer index pruned to the cheapest span per
end layer, O(L^2) at most (the full O(s·L) scan for a layer whose pruned best peer is excluded).
This is the spec's O(n·s) greedy bound, met with an exact shortest path under the cost model.
Departed or banned peers are passed as ``exclude`` (a BanList works) instead of rebuilding.

Cost of a hop, in milliseconds: one-way latency to the peer (half its RTT) plus its compute time
for the layers it runs (from its measured throughput over its span, slowed by its load), divided
by its score (reputation/stake hook; 1.0 is neutral, below ``min_score`` excludes the peer).
A full-model peer is just a one-hop chain, so it is chosen when shards are missing or slower.
"""

from __future__ import annotations

import heapq
import random
import time
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from openhydra.discovery.records import PeerAnnouncement


@dataclass(frozen=True)
class RouteTunables:
    default_rtt_ms: float = 100.0  # RTT assumed for a peer we have not measured, ms
    default_throughput_tps: float = 1.0  # tok/s assumed for a peer that announced 0 (unmeasured)
    load_penalty: float = 1.0  # compute time is multiplied by (1 + load_penalty * load)
    min_score: float = 1e-3  # peers whose score is below this are left out (slashed, failing audits)
    spread: float = 0.0  # with an rng, pick uniformly among a span's peers within (1 + spread) * best cost


@dataclass(frozen=True, slots=True)
class Hop:
    peer: PeerAnnouncement
    start: int  # first layer this hop runs
    end: int  # one past the last layer it runs
    cost_ms: float = 0.0  # estimated

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id

    @property
    def partial(self) -> bool:
        return self.start != self.peer.start or self.end != self.peer.end


@dataclass(frozen=True)
class Chain:
    hops: tuple[Hop, ...]

    @property
    def cost_ms(self) -> float:
        return sum(h.cost_ms for h in self.hops)

    @property
    def peer_ids(self) -> list[str]:
        return [h.peer_id for h in self.hops]

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(h.start, h.end) for h in self.hops]

    def __iter__(self) -> Iterator[Hop]:
        return iter(self.hops)

    def __len__(self) -> int:
        return len(self.hops)


@dataclass(frozen=True)
class CoverageReport:
    model_id: str
    total_layers: int
    peers: int
    counts: list[int]  # peers covering each layer
    throughput_tps: list[float]  # summed announced throughput covering each layer
    holes: list[tuple[int, int]]  # maximal uncovered ranges [a, b)

    @property
    def complete(self) -> bool:
        return not self.holes

    @property
    def covered_fraction(self) -> float:
        return sum(1 for c in self.counts if c) / self.total_layers

    def to_dict(self) -> dict[str, object]:
        return {
            "model_id": self.model_id,
            "total_layers": self.total_layers,
            "peers": self.peers,
            "complete": self.complete,
            "covered_fraction": self.covered_fraction,
            "counts": self.counts,
            "throughput_tps": self.throughput_tps,
            "holes": [list(h) for h in self.holes],
        }


# A candidate peer for one span, as a plain tuple (10,000 of them are built per lookup):
# (cost of its whole span ms, peer id, one-way latency ms, compute ms per layer, record),
# costs already divided by the peer's score. Tuples sort by cost, then peer id.
_Cand = tuple[float, str, float, float, PeerAnnouncement]
_Group = tuple[int, int, list[_Cand]]  # (start, end, candidates sorted by cost)


class LayerCoverageMap:
    """Coverage of one model's layers by the announced peers, and chain assembly over it."""

    def __init__(
        self,
        announcements: Iterable[PeerAnnouncement],
        total_layers: int | None = None,
        *,
        model_id: str | None = None,
        score: Callable[[str], float] | None = None,
        rtt_ms: Callable[[str], float | None] | Mapping[str, float] | None = None,
        banned: Container[str] = (),
        now: float | None = None,
        allow_partial: bool = False,
        tunables: RouteTunables | None = None,
    ) -> None:
        t = self.tunables = tunables or RouteTunables()
        self.allow_partial = allow_partial
        now = time.time() if now is None else now
        records = list(announcements)
        self.model_id = model_id or (records[0].model_id if records else "")
        if total_layers is None:
            total_layers = _most_common([r.total_layers for r in records if r.model_id == self.model_id])
        self.total_layers = total_layers or 0
        rtt_get = rtt_ms.get if isinstance(rtt_ms, Mapping) else rtt_ms
        model, layers = self.model_id, self.total_layers
        latest: dict[str, PeerAnnouncement] = {}
        for r in records:
            if r.model_id != model or r.total_layers != layers or r.announced_at + r.ttl_s <= now:
                continue
            old = latest.get(r.peer_id)
            if old is None or r.announced_at > old.announced_at:
                latest[r.peer_id] = r
        default_half_rtt, default_tps = t.default_rtt_ms / 2.0, t.default_throughput_tps
        load_penalty, min_score = t.load_penalty, t.min_score
        groups: dict[tuple[int, int], list[_Cand]] = {}
        peers: dict[str, PeerAnnouncement] = {}
        for peer_id, r in latest.items():
            if peer_id in banned:
                continue
            s = 1.0 if score is None else score(peer_id)
            if not s >= min_score:  # also drops NaN
                continue
            rtt = rtt_get(peer_id) if rtt_get is not None else None
            one_way = default_half_rtt if rtt is None else rtt / 2.0
            tps = max(r.throughput_tps, 1e-6) if r.throughput_tps > 0 else default_tps  # finite costs
            n = r.end - r.start
            per = 1000.0 / (tps * n) * (1.0 + load_penalty * r.load) / s
            base = one_way / s
            span = (r.start, r.end)
            cands = groups.get(span)
            if cands is None:
                cands = groups[span] = []
            cands.append((base + per * n, peer_id, base, per, r))
            peers[peer_id] = r
        self.peers = peers
        self._groups: list[_Group] = []
        for (a, b), cands in sorted(groups.items()):
            cands.sort()
            self._groups.append((a, b, cands))
        self._by_start: dict[int, list[_Group]] = {}
        for g in self._groups:
            self._by_start.setdefault(g[0], []).append(g)
        self._starts = sorted(self._by_start)
        # Per layer f, built on first partial use: every group covering f, and the pruned list with
        # only the cheapest group (from f, by its best peer) for each end layer.
        self._covering: list[list[_Group]] | None = None
        self._pruned: list[list[_Group]] = []

    def __len__(self) -> int:
        return len(self.peers)

    # ---------------------------------------------------------------- coverage

    def coverage(self, exclude: Container[str] = ()) -> CoverageReport:
        """Per-layer peer counts and throughput, and the holes, leaving out ``exclude``."""
        n = self.total_layers
        diff = [0] * (n + 1)
        tdiff = [0.0] * (n + 1)
        peers = 0
        for a, b, cands in self._groups:
            k = 0
            tps = 0.0
            for c in cands:
                if c[1] not in exclude:
                    k += 1
                    tps += c[4].throughput_tps
            if k:
                peers += k
                diff[a] += k
                diff[b] -= k
                tdiff[a] += tps
                tdiff[b] -= tps
        counts, throughput, holes = [], [], []
        run, trun, hole_start = 0, 0.0, None
        for i in range(n):
            run += diff[i]
            trun += tdiff[i]
            counts.append(run)
            throughput.append(round(trun, 6))
            if run == 0 and hole_start is None:
                hole_start = i
            elif run and hole_start is not None:
                holes.append((hole_start, i))
                hole_start = None
        if hole_start is not None:
            holes.append((hole_start, n))
        return CoverageReport(self.model_id, n, peers, counts, throughput, holes)

    def peer_table(self, exclude: Container[str] = ()) -> list[dict[str, object]]:
        """One row per peer for /v1/network/status: span, address, throughput, load, estimated cost."""
        return [
            {
                "peer_id": c[1],
                "start": a,
                "end": b,
                "grpc_address": c[4].grpc_address,
                "throughput_tps": c[4].throughput_tps,
                "load": c[4].load,
                "region": c[4].region,
                "est_span_ms": round(c[0], 3),
                "excluded": c[1] in exclude,
            }
            for a, b, cands in self._groups
            for c in cands
        ]

    def full_model_peers(self, exclude: Container[str] = ()) -> list[PeerAnnouncement]:
        cands = next((c for a, b, c in self._by_start.get(0, []) if b == self.total_layers), [])
        return [c[4] for c in cands if c[1] not in exclude]

    # ---------------------------------------------------------------- chains

    def chain(self, exclude: Container[str] = (), rng: random.Random | None = None) -> Chain | None:
        """The cheapest chain tiling ``[0, L)``, or None when the layers are not covered."""
        if self.total_layers <= 0:
            return None
        return self._assemble(0, self.total_layers, exclude, rng)

    def replacement_for(
        self, span: tuple[int, int], exclude: Container[str] = (), rng: random.Random | None = None
    ) -> Chain | None:
        """A peer, or a sub-chain, that runs exactly the layers ``[a, b)`` of a failed hop."""
        a, b = span
        if not 0 <= a < b <= self.total_layers:
            raise ValueError(f"span {span} is not inside [0, {self.total_layers})")
        return self._assemble(a, b, exclude, rng)

    def _pick(self, cands: list[_Cand], exclude: Container[str], rng: random.Random | None) -> _Cand | None:
        if rng is None or self.tunables.spread <= 0:
            for c in cands:
                if c[1] not in exclude:
                    return c
            return None
        ok = [c for c in cands if c[1] not in exclude]
        if not ok:
            return None
        limit = ok[0][0] * (1.0 + self.tunables.spread)
        near = [c for c in ok if c[0] <= limit]
        return near[rng.randrange(len(near))]

    def _assemble(self, a: int, b: int, exclude: Container[str], rng: random.Random | None) -> Chain | None:
        if self.allow_partial:
            back = self._shortest_partial(a, b, exclude, rng)
        else:
            back = self._shortest_exact(a, b, exclude, rng)
        if b not in back:
            return None
        segments: list[tuple[int, int, _Cand]] = []
        pos = b
        while pos != a:
            prev, cand = back[pos]
            segments.append((prev, pos, cand))
            pos = prev
        segments.reverse()
        if self.allow_partial:
            segments = _merge_repeats(segments)
        return Chain(tuple(Hop(c[4], s, e, c[2] + c[3] * (e - s)) for s, e, c in segments))

    def _shortest_exact(
        self, a: int, b: int, exclude: Container[str], rng: random.Random | None
    ) -> dict[int, tuple[int, _Cand]]:
        dist = {a: 0.0}
        back: dict[int, tuple[int, _Cand]] = {}
        starts = self._starts
        for i in range(bisect_left(starts, a), len(starts)):
            s = starts[i]
            if s >= b:
                break
            d = dist.get(s)
            if d is None:
                continue
            for _, e, cands in self._by_start[s]:
                if e > b:
                    continue
                c = self._pick(cands, exclude, rng)
                if c is None:
                    continue
                nd = d + c[0]
                old = dist.get(e)
                if old is None or nd < old:
                    dist[e] = nd
                    back[e] = (s, c)
        return back

    def _shortest_partial(
        self, a: int, b: int, exclude: Container[str], rng: random.Random | None
    ) -> dict[int, tuple[int, _Cand]]:
        covering = self._covering_index()
        pruned = self._pruned
        fast_pick = rng is None or self.tunables.spread <= 0
        # The pruned lists hold when nothing is clipped at b and no pruned entry's best peer is out.
        use_pruned = fast_pick and b == self.total_layers
        dist = {a: 0.0}
        back: dict[int, tuple[int, _Cand]] = {}
        frontier = [a]
        done: set[int] = set()
        while frontier:
            f = heapq.heappop(frontier)
            if f in done or f >= b:
                continue
            done.add(f)
            d = dist[f]
            groups = covering[f]
            if use_pruned and not any(g[2][0][1] in exclude for g in pruned[f]):
                groups = pruned[f]
            for _, end, cands in groups:
                c = cands[0]
                if fast_pick is False or c[1] in exclude:
                    c = self._pick(cands, exclude, rng)
                    if c is None:
                        continue
                e = end if end < b else b
                nd = d + c[2] + c[3] * (e - f)
                old = dist.get(e)
                if old is None or nd < old:
                    if old is None:
                        heapq.heappush(frontier, e)
                    dist[e] = nd
                    back[e] = (f, c)
        return back

    def _covering_index(self) -> list[list[_Group]]:
        if self._covering is None:
            covering: list[list[_Group]] = [[] for _ in range(self.total_layers)]
            for g in self._groups:
                for layer in range(g[0], g[1]):
                    covering[layer].append(g)
            pruned: list[list[_Group]] = []
            for f, groups in enumerate(covering):
                cheapest: dict[int, tuple[float, _Group]] = {}
                for g in groups:
                    c = g[2][0]
                    cost = c[2] + c[3] * (g[1] - f)
                    old = cheapest.get(g[1])
                    if old is None or cost < old[0]:
                        cheapest[g[1]] = (cost, g)
                pruned.append([g for _, g in cheapest.values()])
            self._covering, self._pruned = covering, pruned
        return self._covering


def _merge_repeats(segments: list[tuple[int, int, _Cand]]) -> list[tuple[int, int, _Cand]]:
    """In partial mode the cheapest path may leave a peer and come back to it (X, Y, X). A peer's
    span is contiguous, so one hop of X over the whole stretch is valid: use that instead."""
    while True:
        first: dict[str, int] = {}
        for i, (_, end, cand) in enumerate(segments):
            j = first.setdefault(cand[1], i)
            if j != i:
                segments = [*segments[:j], (segments[j][0], end, cand), *segments[i + 1 :]]
                break
        else:
            return segments


# -------------------------------------------------------------------- validity


def chain_problems(chain: Chain | Sequence[Hop], total_layers: int, model_id: str | None = None) -> list[str]:
    """Why ``chain`` is not a valid pipeline for a model of ``total_layers`` layers ([] if it is)."""
    hops = list(chain)
    if not hops:
        return ["empty chain"]
    problems: list[str] = []
    frontier = 0
    seen: set[str] = set()
    for i, h in enumerate(hops):
        p = h.peer
        if h.start != frontier:
            problems.append(f"hop {i} ({p.peer_id}) starts at layer {h.start}, expected {frontier}")
        if h.start >= h.end:
            problems.append(f"hop {i} ({p.peer_id}) has empty range [{h.start}, {h.end})")
        if not p.start <= h.start < h.end <= p.end:
            problems.append(f"hop {i} runs [{h.start}, {h.end}) outside {p.peer_id}'s span [{p.start}, {p.end})")
        if p.total_layers != total_layers:
            problems.append(f"hop {i} ({p.peer_id}) serves a {p.total_layers}-layer model, expected {total_layers}")
        if model_id is not None and p.model_id != model_id:
            problems.append(f"hop {i} ({p.peer_id}) serves {p.model_id}, expected {model_id}")
        if p.peer_id in seen:
            problems.append(f"peer {p.peer_id} appears twice")
        seen.add(p.peer_id)
        frontier = h.end
    if frontier != total_layers:
        problems.append(f"chain ends at layer {frontier}, expected {total_layers}")
    return problems


def is_valid_chain(chain: Chain | Sequence[Hop], total_layers: int, model_id: str | None = None) -> bool:
    """True when the hops tile ``[0, total_layers)`` in order, each inside its peer's span."""
    return not chain_problems(chain, total_layers, model_id)


# -------------------------------------------------------------------- degradation


@dataclass(frozen=True)
class ModelChoice:
    model_id: str
    chain: Chain
    reason: str | None  # None when the requested model is served; else why it was degraded


def nearest_covered_model(
    requested: str,
    catalog_order: Sequence[str],
    maps: Mapping[str, LayerCoverageMap],
    exclude: Container[str] = (),
) -> ModelChoice | None:
    """Serve ``requested`` if a chain covers it, else the nearest smaller covered model.

    ``catalog_order`` lists models from largest to smallest; only models after ``requested`` are
    candidates. The decision comes from layer coverage (a chain exists), never from a peer count.
    """
    order = list(catalog_order)
    candidates = [requested] + (order[order.index(requested) + 1 :] if requested in order else [])
    first_gap = ""
    for model_id in candidates:
        cmap = maps.get(model_id)
        chain = cmap.chain(exclude) if cmap is not None else None
        if chain is not None:
            if model_id == requested:
                return ModelChoice(model_id, chain, None)
            return ModelChoice(
                model_id,
                chain,
                f"{first_gap}; serving {model_id}, the nearest smaller model with full layer coverage",
            )
        if model_id == requested:
            first_gap = _gap_reason(model_id, cmap, exclude)
    return None


def _gap_reason(model_id: str, cmap: LayerCoverageMap | None, exclude: Container[str]) -> str:
    if cmap is None or cmap.total_layers == 0 or not cmap.peers:
        return f"{model_id} has no peers"
    holes = cmap.coverage(exclude).holes
    if holes:
        text = ", ".join(f"[{a}, {b})" for a, b in holes[:4])
        return f"{model_id} has no peer for layers {text}"
    return f"{model_id}'s peer spans do not join into a complete pipeline"


def _most_common(values: list[int]) -> int | None:
    if not values:
        return None
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -v))
