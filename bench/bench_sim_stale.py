"""Stale records after peers die, against the announce period and the TTL (real HTTP DHT on loopback).

One real ``openhydra-dht`` server; N peers each run the real ``Announcer`` (jitter +-10%) through
the real ``HttpDiscovery``. After a warm-up, half the peers crash (their announcers stop without
withdrawing). A coordinator then looks up every 0.1 s: the *stale fraction* is the share of records
in an answer whose peer is dead. We also count *lapses*: live peers missing from an answer (a TTL too
close to the period lets records expire between announcements). Times are scaled down (periods of
0.5-2 s); stale lifetimes scale with them (the defaults, 60 s and 180 s, are the 1 s / 3 s row x 60).

Theory: a crashed peer's record lives TTL - (time since its last announcement), uniform over the
period, so stale records vanish between TTL - period and TTL after the crash (mean TTL - period/2).

    python bench/bench_sim_stale.py [--peers 20] [--no-plot]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from openhydra.discovery.announcer import Announcer
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.testing.processes import free_port

MODEL = "bench/stale"
LAYERS = 32
COMBOS = [(0.5, 1.5), (0.5, 3.0), (1.0, 1.5), (1.0, 3.0), (2.0, 1.5), (2.0, 3.0)]  # (period s, TTL / period)


def record_factory(i: int):
    start = (i % (LAYERS // 4)) * 4

    def make(now: float, ttl_s: float) -> PeerAnnouncement:
        return PeerAnnouncement(
            peer_id=f"peer{i}",
            model_id=MODEL,
            start=start,
            end=start + 4,
            total_layers=LAYERS,
            grpc_address="127.0.0.1:50051",
            announced_at=now,
            ttl_s=ttl_s,
        )

    return make


async def measure(url: str, peers: int, period: float, ttl: float) -> dict[str, object]:
    disc = HttpDiscovery([url], announce_interval_s=period, ttl_s=ttl, timeout_s=5.0, allow_unsigned_names=True)
    await disc.start()
    announcers = [Announcer(disc, record_factory(i)) for i in range(peers)]
    for a in announcers:
        await a.announce_once()
        a.start()
    await asyncio.sleep(2 * period)
    dead = {f"peer{i}" for i in range(0, peers, 2)}
    for i in range(0, peers, 2):
        await announcers[i].stop(withdraw=False)  # a crash: the record stays until it expires
    t_kill = time.monotonic()
    series: list[tuple[float, float, float]] = []  # (s since crash, stale fraction, missing live fraction)
    last_stale_seen = 0.0
    last_seen = {pid: 0.0 for pid in dead}  # per dead peer: when a lookup last returned its record
    while time.monotonic() - t_kill < ttl + period + 1.0:
        got = {r.peer_id for r in await disc.lookup(MODEL)}
        t = time.monotonic() - t_kill
        stale = len(got & dead)
        missing = (peers - len(dead)) - len(got - dead)
        series.append((t, stale / len(got) if got else 0.0, missing / (peers - len(dead))))
        if stale:
            last_stale_seen = t
        for pid in got & dead:
            last_seen[pid] = t
        await asyncio.sleep(0.1)
    for a in announcers:
        await a.stop(withdraw=False)
    async with httpx.AsyncClient() as client:  # clean the table for the next combination
        for i in range(peers):
            await client.delete(f"{url}/v1/peers", params={"model_id": MODEL, "peer_id": f"peer{i}"})
    await disc.stop()
    window = [s for t, s, _ in series if t <= ttl]
    return {
        "period_s": period,
        "ttl_s": ttl,
        "stale_gone_after_s": round(last_stale_seen, 2),
        "mean_stale_life_s": round(statistics.mean(last_seen.values()), 2),
        "theory_mean_s": ttl - period / 2,
        "theory_max_s": ttl,
        "theory_min_s": ttl - period,
        "mean_stale_fraction_first_ttl": round(statistics.mean(window), 3) if window else 0.0,
        "max_missing_live_fraction": round(max(m for _, _, m in series), 3),
        "series": series,
    }


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        series = r["series"]
        ax.plot(
            [t / r["period_s"] for t, _, _ in series],
            [s for _, s, _ in series],
            label=f"period {r['period_s']} s, TTL {r['ttl_s']} s",
        )
    ax.set_xlabel("time since half the peers crashed, in announce periods")
    ax.set_ylabel("stale share of records in a lookup")
    ax.set_title("stale records after a crash (real openhydra-dht, real Announcer)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs/img/scale_stale_records.png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    port = free_port()
    server = subprocess.Popen(
        # the simulated peers are plain names (peer0, ...), unsigned
        [sys.executable, "-m", "openhydra.discovery.http_dht_server", "--port", str(port), "--allow-unsigned-names"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        rows = []
        print(
            f"{'period s':>8} {'TTL s':>6} {'stale gone s':>12} {'theory s':>10} {'mean life s':>11} {'theory':>6} "
            f"{'mean stale':>10} {'max lapse':>9}",
            flush=True,
        )
        for period, factor in COMBOS:
            r = asyncio.run(measure(url, args.peers, period, period * factor))
            rows.append(r)
            print(
                f"{r['period_s']:8.1f} {r['ttl_s']:6.2f} {r['stale_gone_after_s']:12.2f} "
                f"{r['theory_min_s']:4.2f}-{r['theory_max_s']:<5.2f} {r['mean_stale_life_s']:11.2f} "
                f"{r['theory_mean_s']:6.2f} {r['mean_stale_fraction_first_ttl']:10.3f} "
                f"{r['max_missing_live_fraction']:9.3f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
    if not args.no_plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
