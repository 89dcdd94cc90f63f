"""Span choice for ``shard=auto``: serve the layers the swarm covers least.

Like Petals' ``choose_best_blocks``: each layer's throughput is the sum of the announced
throughputs of the peers covering it (a peer's tok/s over its span is the rate it pushes tokens
through every layer of it). A pipeline runs no faster than its weakest layer, so a newcomer that can
hold ``max_layers`` layers takes the window whose sorted per-layer throughputs are
lexicographically smallest: it lifts the weakest layer first, then the next weakest, and so on.
Ties go to the lowest start. Cost O(n + L·m log m) for n peers, L layers, window m.

A peer that announced no measurement counts as ``default_throughput_tps`` so that mere presence
still counts. ``rebalance_gain`` tells a running peer whether moving would help the swarm enough
to be worth reloading weights (Petals' ``should_choose_other_blocks``, simplified).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from openhydra.discovery.records import PeerAnnouncement


def layer_throughput(
    announcements: Iterable[PeerAnnouncement],
    total_layers: int,
    *,
    model_id: str | None = None,
    exclude_peer: str | None = None,
    now: float | None = None,
    default_throughput_tps: float = 1.0,
) -> list[float]:
    """Summed throughput (tok/s) of the live peers covering each layer."""
    now = time.time() if now is None else now
    diff = [0.0] * (total_layers + 1)
    latest: dict[str, PeerAnnouncement] = {}
    for r in announcements:
        if r.total_layers != total_layers or r.peer_id == exclude_peer or r.is_expired(now):
            continue
        if model_id is not None and r.model_id != model_id:
            continue
        old = latest.get(r.peer_id)
        if old is None or r.announced_at > old.announced_at:
            latest[r.peer_id] = r
    for r in latest.values():
        tps = r.throughput_tps if r.throughput_tps > 0 else default_throughput_tps
        diff[r.start] += tps
        diff[r.end] -= tps
    out: list[float] = []
    run = 0.0
    for i in range(total_layers):
        run += diff[i]
        out.append(max(0.0, round(run, 9)))
    return out


def best_start(throughputs: list[float], num_layers: int) -> int:
    """Start of the window of ``num_layers`` layers whose sorted throughputs are smallest."""
    if not 1 <= num_layers <= len(throughputs):
        raise ValueError(f"window of {num_layers} layers does not fit {len(throughputs)} layers")
    options = ((sorted(throughputs[i : i + num_layers]), i) for i in range(len(throughputs) - num_layers + 1))
    return min(options)[1]


def choose_span(
    announcements: Iterable[PeerAnnouncement],
    total_layers: int,
    max_layers: int,
    *,
    model_id: str | None = None,
    own_peer_id: str | None = None,
    now: float | None = None,
    default_throughput_tps: float = 1.0,
) -> tuple[int, int]:
    """The span ``[start, end)`` this node should serve, holding at most ``max_layers`` layers.

    ``own_peer_id`` leaves this node's own (old) announcement out, for rebalancing.
    """
    if total_layers < 1 or max_layers < 1:
        raise ValueError(f"need total_layers >= 1 and max_layers >= 1, got {total_layers}, {max_layers}")
    m = min(max_layers, total_layers)
    if m == total_layers:
        return (0, total_layers)
    tp = layer_throughput(
        announcements,
        total_layers,
        model_id=model_id,
        exclude_peer=own_peer_id,
        now=now,
        default_throughput_tps=default_throughput_tps,
    )
    start = best_start(tp, m)
    return (start, start + m)


def rebalance_gain(
    announcements: Iterable[PeerAnnouncement],
    me: PeerAnnouncement,
    *,
    now: float | None = None,
    default_throughput_tps: float = 1.0,
) -> tuple[float, tuple[int, int]]:
    """How much the swarm's bottleneck throughput would grow if ``me`` moved to the best span.

    Returns ``(gain, span)`` with ``gain = new bottleneck / current bottleneck`` (1.0 = no better).
    A caller moves only above a threshold (e.g. 1.2), so peers do not chase each other.
    """
    others = [r for r in announcements if r.peer_id != me.peer_id]
    mine = me.throughput_tps if me.throughput_tps > 0 else default_throughput_tps
    base = layer_throughput(
        others, me.total_layers, model_id=me.model_id, now=now, default_throughput_tps=default_throughput_tps
    )
    span = choose_span(
        others,
        me.total_layers,
        me.num_layers,
        model_id=me.model_id,
        now=now,
        default_throughput_tps=default_throughput_tps,
    )

    def bottleneck(a: int, b: int) -> float:
        return min(t + (mine if a <= i < b else 0.0) for i, t in enumerate(base))

    current = bottleneck(me.start, me.end)
    moved = bottleneck(*span)
    if current <= 0:
        return (float("inf") if moved > 0 else 1.0), span
    return moved / current, span
