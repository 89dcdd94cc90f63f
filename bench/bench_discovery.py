"""Lookup latency and memory of the hivemind Kademlia discovery against DHT node count.

For each swarm size N: start N real hivemind DHT nodes on loopback (local-only flags), each
joining through a random earlier node; 10 peers announce a model's spans through random nodes;
then lookups from random nodes measure latency (median, p90) and success (all 10 records seen).
Memory: PSS (proportional set size, so pages shared after fork count once) of each node's DHT
process plus its p2pd daemon. Prints a table and writes docs/img/discovery_lookup.png.

    python bench/bench_discovery.py [--sizes 5 20 50] [--lookups 40] [--no-plot]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path

import psutil

from openhydra.discovery.kademlia import KademliaDiscovery
from openhydra.discovery.records import PeerAnnouncement

PEERS = 10
LAYERS = 32


def _pss_mb(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


async def start_swarm(n: int, rng: random.Random, batch: int = 6) -> tuple[list[KademliaDiscovery], float]:
    t0 = time.perf_counter()
    first = KademliaDiscovery(timeout_s=20, allow_unsigned_names=True)  # the bench peers are plain names
    await first.start()
    nodes = [first]
    while len(nodes) < n:
        k = min(batch, n - len(nodes))
        new = [KademliaDiscovery(initial_peers=rng.choice(nodes).visible_maddrs, timeout_s=20,
                                 allow_unsigned_names=True) for _ in range(k)]
        await asyncio.gather(*(d.start() for d in new))
        nodes.extend(new)
    return nodes, time.perf_counter() - t0


async def measure(n: int, lookups: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    nodes, start_s = await start_swarm(n, rng)
    try:
        model = f"bench/model-{n}"
        now = time.time()
        for i in range(PEERS):
            a = i * LAYERS // PEERS
            b = (i + 1) * LAYERS // PEERS
            record = PeerAnnouncement(
                peer_id=f"peer{i}",
                model_id=model,
                start=a,
                end=b,
                total_layers=LAYERS,
                grpc_address="127.0.0.1:50051",
                announced_at=now,
                ttl_s=300.0,
            )
            await rng.choice(nodes).announce(record)
        latencies, ok = [], 0
        for _ in range(lookups):
            node = rng.choice(nodes)
            t0 = time.perf_counter()
            try:
                got = await node.lookup(model)
            except Exception:
                got = []
            latencies.append((time.perf_counter() - t0) * 1000)
            ok += len(got) == PEERS
        latencies.sort()
        me = psutil.Process(os.getpid())
        pss = [_pss_mb(psutil.Process(d.dht.pid)) for d in nodes]
        return {
            "nodes": n,
            "start_s": start_s,
            "p50_ms": statistics.median(latencies),
            "p90_ms": latencies[int(0.9 * (len(latencies) - 1))],
            "success": ok / lookups,
            "pss_per_node_mb": statistics.mean(pss),
            "pss_total_mb": sum(pss),
            "parent_rss_mb": me.memory_info().rss / 2**20,
        }
    finally:
        await asyncio.gather(*(d.stop() for d in nodes), return_exceptions=True)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["nodes"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [r["p50_ms"] for r in rows], marker="o", label="median")
    ax1.plot(xs, [r["p90_ms"] for r in rows], marker="o", label="p90")
    ax1.set_xlabel("hivemind DHT nodes on loopback")
    ax1.set_ylabel("lookup latency, ms")
    ax1.set_title(f"lookup of {PEERS} records")
    ax1.legend()
    ax2.plot(xs, [r["pss_total_mb"] for r in rows], marker="o", color="C2")
    ax2.set_xlabel("hivemind DHT nodes on loopback")
    ax2.set_ylabel("PSS of all DHT processes + p2pd, MiB")
    ax2.set_title("memory")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--lookups", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs/img/discovery_lookup.png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    rows = []
    print(
        f"{'nodes':>5} {'start s':>8} {'p50 ms':>7} {'p90 ms':>7} {'success':>8} {'PSS/node MiB':>13} "
        f"{'PSS total MiB':>14}",
        flush=True,
    )
    for n in args.sizes:
        r = asyncio.run(measure(n, args.lookups, args.seed))
        rows.append(r)
        print(
            f"{r['nodes']:5d} {r['start_s']:8.1f} {r['p50_ms']:7.1f} {r['p90_ms']:7.1f} {r['success']:8.0%} "
            f"{r['pss_per_node_mb']:13.1f} {r['pss_total_mb']:14.0f}",
            flush=True,
        )
    if not args.no_plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
