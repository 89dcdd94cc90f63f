"""Route choice time of the LayerCoverageMap at 100 / 1,000 / 10,000 peers (medians).

Two swarm shapes over a 64-layer model:
- ``mixed``: half the peers serve aligned shards (full, 1/2, 1/4, 1/8 of the model, as the
  index/total form gives), half serve random spans of 4-24 layers (shard=auto-like);
- ``random``: every peer a random span (the most distinct spans, the worst case for assembly).
Columns: building the map (once per discovery lookup), ``chain()`` (per request) in exact and
partial modes, ``replacement_for`` a middle span with its peer banned, and the first partial
``chain()`` on a fresh map, which also builds the per-layer index (once per map).
Prints a table and writes docs/img/route_choice.png.

    python bench/bench_route_choice.py [--repeats 15] [--sizes 100 1000 10000] [--no-plot]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import LayerCoverageMap

L = 64
NOW = 1_800_000_000.0


def make_swarm(n: int, shape: str, rng: random.Random) -> list[PeerAnnouncement]:
    records = []
    for i in range(n):
        if shape == "mixed" and i % 2 == 0:
            total = rng.choice([1, 2, 4, 8])
            k = rng.randrange(total)
            a, b = k * L // total, (k + 1) * L // total
        else:
            size = rng.randint(4, 24)
            a = rng.randint(0, L - size)
            b = a + size
        records.append(
            PeerAnnouncement(
                peer_id=f"p{i}",
                model_id="m",
                start=a,
                end=b,
                total_layers=L,
                grpc_address="10.0.0.1:50051",
                throughput_tps=rng.uniform(1, 50),
                load=rng.random() * 0.5,
                announced_at=NOW,
                ttl_s=180.0,
            )
        )
    return records


def timings_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def median_ms(fn, repeats: int) -> float:
    return statistics.median(timings_ms(fn, repeats))


def measure(shape: str, n: int, repeats: int) -> dict[str, float]:
    rng = random.Random(n)
    records = make_swarm(n, shape, rng)
    rtt = {r.peer_id: rng.uniform(5, 200) for r in records}
    score = {r.peer_id: rng.uniform(0.5, 1.0) for r in records}.__getitem__
    build = timings_ms(lambda: LayerCoverageMap(records, L, now=NOW, rtt_ms=rtt, score=score), repeats)
    exact = LayerCoverageMap(records, L, now=NOW, rtt_ms=rtt, score=score)
    partial = LayerCoverageMap(records, L, now=NOW, rtt_ms=rtt, score=score, allow_partial=True)
    # The first partial call builds the per-layer index (once per map): timed on its own.
    fresh = [LayerCoverageMap(records, L, now=NOW, rtt_ms=rtt, score=score, allow_partial=True) for _ in range(3)]
    index_ms = statistics.median(timings_ms(lambda: fresh.pop().chain(), 3))
    partial_times = timings_ms(partial.chain, repeats + 1)[1:]
    best = partial.chain()  # also builds the per-layer index once, as a live map would
    mid = best.hops[len(best) // 2] if best else None
    banned = {mid.peer_id} if mid else set()
    span = (mid.start, mid.end) if mid else (16, 48)
    return {
        "shape": shape,
        "peers": n,
        "spans": len({r.span for r in records}),
        "build_ms": statistics.median(build),
        "build_min_ms": min(build),
        "exact_ms": median_ms(exact.chain, repeats),
        "partial_ms": statistics.median(partial_times),
        "partial_min_ms": min(partial_times),
        "index_ms": index_ms,
        "replace_ms": median_ms(lambda: partial.replacement_for(span, exclude=banned), repeats),
        "found": float(best is not None),
    }


def run(sizes: list[int], repeats: int) -> list[dict[str, float]]:
    return [measure(shape, n, repeats) for shape in ("mixed", "random") for n in sizes]


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, shape in zip(axes, ("mixed", "random"), strict=True):
        sub = [r for r in rows if r["shape"] == shape]
        xs = [r["peers"] for r in sub]
        for key, label in (
            ("build_ms", "build map"),
            ("exact_ms", "chain (exact)"),
            ("partial_ms", "chain (partial)"),
            ("replace_ms", "replacement"),
        ):
            ax.plot(xs, [r[key] for r in sub], marker="o", label=label)
        ax.axhline(10, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{shape} spans, {L} layers")
        ax.set_xlabel("peers announcing the model")
    axes[0].set_ylabel("median time, ms (dashed: 10 ms budget)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs/img/route_choice.png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    rows = run(args.sizes, args.repeats)
    print(f"median ms (min ms) over {args.repeats} runs")
    print(
        f"{'shape':7} {'peers':>6} {'spans':>6} {'build map':>16} {'chain exact':>12} {'chain partial':>16} "
        f"{'replace':>8} {'1st partial':>12}"
    )
    for r in rows:
        print(
            f"{r['shape']:7} {r['peers']:6d} {r['spans']:6d} {r['build_ms']:8.2f} ({r['build_min_ms']:5.2f}) "
            f"{r['exact_ms']:12.3f} {r['partial_ms']:8.3f} ({r['partial_min_ms']:5.3f}) {r['replace_ms']:8.3f} "
            f"{r['index_ms']:12.2f}"
        )
    for shape in ("mixed", "random"):
        sub = [r for r in rows if r["shape"] == shape]
        if len(sub) >= 2:
            growth = sub[-1]["build_ms"] / sub[0]["build_ms"]
            print(f"{shape}: build grows x{growth:.1f} for x{sub[-1]['peers'] / sub[0]['peers']:.0f} peers")
    if not args.no_plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
