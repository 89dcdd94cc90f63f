"""A node with several threads, with and without its compute lane, against a one-thread node (runtime/compute_lane.py).

Three node processes serving embedded SmolLM2-135M on the same hardware group, driven through the streaming OpenAI
chat API as bench_batching.py drives them (distinct prompts, greedy, ``ignore_eos``; aggregate output tok/s from the
first request to the last stream's end, prefill included):
- ``1 thread``: ``hardware.threads`` 1 (what the other benchmarks pin);
- ``N threads, no lane``: N threads and ``OPENHYDRA_COMPUTE_LANE=0`` (every thread that computes uses N threads: the
  behaviour before the lane);
- ``N threads, lane``: N threads, every step of the span on one thread (the default).
Arms: 1 stream and ``--streams`` concurrent streams on each node, interleaved per trial (order rotated).

    python bench/bench_threads.py --trials 5 --tokens 64 [--threads 2] [--hardware cpu_int4 --dtype float32]
    [--serving default]

``--swarm``: instead of one node per variant, a 3-peer swarm on this machine (layers [0,10), [10,20), [20,30), each
with its own HTTP DHT), as the README's local swarm runs it; one stream through the first peer's API, decode tok/s
(bench_pipeline.py's measure). There every node's lane holds threads while the others compute, which is what
``GOMP_SPINCOUNT`` (runtime/compute_lane.py ``SPIN_COUNT``, set by ``openhydra-node``) bounds; ``--spin-counts
300000,10000`` adds a lane arm per value.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_batching import aggregate_rate, node_overrides  # noqa: E402
from common import medians, print_table, run_interleaved  # noqa: E402

from openhydra.testing import TEST_CACHE_ROOT  # noqa: E402
from openhydra.testing.machine import announce  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="N (default: this machine's CPUs)")
    parser.add_argument("--hardware", default="cpu_int4", help="conf/hardware group of the nodes")
    parser.add_argument("--dtype", default="float32", help="hardware.dtype")
    parser.add_argument("--serving", default="default", help="conf/serving group (default, batched, off)")
    parser.add_argument("--swarm", action="store_true", help="3-peer swarms instead of single nodes")
    parser.add_argument("--spin-counts", default="", help="extra lane arms with these GOMP_SPINCOUNT values")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_threads.png"))
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    from openhydra.testing.processes import NodeProcess, start_all

    n = args.threads
    variants: dict[str, tuple[int, dict[str, str] | None]] = {
        "1 thread": (1, None), f"{n} threads, no lane": (n, {"OPENHYDRA_COMPUTE_LANE": "0"}),
        f"{n} threads, lane": (n, None)}
    for count in filter(None, (args.spin_counts or "").split(",")):
        variants[f"{n} threads, lane, spin {count}"] = (n, {"GOMP_SPINCOUNT": count})
    print(f"load average before: {os.getloadavg()}")
    if args.swarm:
        rates = swarm_rates(variants, args)
    else:
        common = node_overrides(args.hardware, args.dtype, f"serving={args.serving}",
                                f"serving.batching.max_batch={args.streams}")
        nodes = {name: NodeProcess(common, threads=threads, env=env) for name, (threads, env) in variants.items()}
        arms = {}
        for name, node in nodes.items():
            arms[f"{name}: 1 stream"] = lambda u=node.url: aggregate_rate(u, 1, args.tokens)
            arms[f"{name}: {args.streams} streams"] = lambda u=node.url: aggregate_rate(u, args.streams, args.tokens)
        try:
            start_all(list(nodes.values()))
            for node in nodes.values():
                aggregate_rate(node.url, 2, 4)  # warm-up
            rates = run_interleaved(arms, args.trials)
        finally:
            for node in nodes.values():
                node.stop()
    print(f"load average after: {os.getloadavg()} (shared cores: absolute figures are noisy)")
    med = medians(rates)
    print_table(rates, metric="median decode tok/s" if args.swarm else "median aggregate output tok/s")
    loads = ["1 stream"] if args.swarm else ["1 stream", f"{args.streams} streams"]
    lane, unlaned, single = (f"{n} threads, lane", f"{n} threads, no lane", "1 thread")
    print()
    for streams in loads:
        per_trial = statistics.median(a / b for a, b in zip(rates[f"{lane}: {streams}"],
                                                              rates[f"{unlaned}: {streams}"], strict=True))
        print(f"{streams}: lane / no lane = {med[f'{lane}: {streams}'] / med[f'{unlaned}: {streams}']:.2f} "
              f"(per-trial {per_trial:.2f}); lane / 1 thread = "
              f"{med[f'{lane}: {streams}'] / med[f'{single}: {streams}']:.2f}")
    where = "3-peer swarm" if args.swarm else f"serving={args.serving}"
    print(f"[hardware={args.hardware}, {args.dtype}, {where}, tokens={args.tokens}, threads={n}, "
          f"trials={args.trials}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'openhydra-node default')}]")
    plot(rates, list(variants), loads, args.plot, f"SmolLM2-135M, {args.hardware} {args.dtype}, {where}",
         "decode tok/s" if args.swarm else "aggregate output tok/s")


def swarm_rates(variants: dict[str, tuple[int, dict[str, str] | None]],
                args: argparse.Namespace) -> dict[str, list[float]]:
    """One 3-peer swarm per variant, each with its own DHT; a lone stream's decode tok/s through the first peer."""
    from bench_api_vs_generate import api_decode_rate

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    dhts = {name: DhtProcess() for name in variants}
    swarms: dict[str, list] = {}
    try:
        for name, (threads, env) in variants.items():
            dhts[name].__enter__()
            swarms[name] = [NodeProcess(swarm_node_overrides(model_dir, dhts[name].url, a, b,
                                                             work / f"{len(swarms)}-{a}", dtype=args.dtype,
                                                             hardware=args.hardware), threads=threads, env=env)
                            for a, b in [(0, 10), (10, 20), (20, 30)]]
        start_all([node for peers in swarms.values() for node in peers])
        for peers in swarms.values():
            api_decode_rate(peers[0].url, model_dir.name, messages, 8)  # warm-up
        arms = {f"{name}: 1 stream": (lambda u=peers[0].url: api_decode_rate(u, model_dir.name, messages, args.tokens))
                for name, peers in swarms.items()}
        return run_interleaved(arms, args.trials)
    finally:
        for peers in swarms.values():
            for node in peers:
                node.stop()
        for dht in dhts.values():
            dht.__exit__(None, None, None)


def plot(rates: dict[str, list[float]], nodes: list[str], loads: list[str], path: str, title: str,
         ylabel: str) -> None:
    """One panel per load: each node's median (bar) and its trials (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(loads), figsize=(5 + 2.5 * len(nodes) * len(loads) // 2, 4), squeeze=False)
    colors = ["#999999", "#d62728", "#2ca02c"]
    for ax, load in zip(axes[0], loads, strict=True):
        for i, node in enumerate(nodes):
            values = rates[f"{node}: {load}"]
            ax.bar(i, statistics.median(values), color=colors[i % len(colors)], alpha=0.8)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
            ax.text(i, statistics.median(values) / 2, f"{statistics.median(values):.0f}", ha="center", color="white",
                    fontweight="bold")
        ax.set_xticks(range(len(nodes)), [name.replace(", ", ",\n") for name in nodes])
        ax.set_title(load)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
