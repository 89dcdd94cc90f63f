"""Serving from behind NAT: per-token time relayed (libp2p circuit relay) vs direct (gRPC), relay cost, time to
become reachable. Needs root, network namespaces and nft (openhydra/sim/nat.py).

    python -m bench.bench_nat [--model-dir tiny|smollm2|DIR] [--tokens 24] [--rounds 3]
                              [--relay-one-way-ms MS | --one-way-ms MS]

Two runs of the same 3-node chain (coordinator [0,3) -> homea [3,6) -> homeb [6,8) -> coordinator), one after the
other in fresh namespaces: ``relayed`` puts homea and homeb behind their own nftables NAT routers (libp2p through
p2pd relays: coordinator -> relay -> homea -> relay -> homeb); ``direct`` puts them on the public segment with
plain gRPC. Per-token time is the median gap between streamed tokens (after the first 2), per round. Relay CPU
and bytes are read from /proc of the relay daemons over the timed rounds. ``--relay-one-way-ms 10`` puts the
userspace delay relay (openhydra/sim/relay.py; this kernel has no netem) in front of every relay: each crossing of
a relay leg gets 10 ms one-way (20 ms RTT per link), so a relayed hop gets 2 x 10 ms; rounds alternate latency
off / on in the same swarm; the gRPC links (homeb -> the coordinator's reply server) get none.

``--one-way-ms 10`` runs both arms with every link between hosts at that one-way delay: relayed as above plus
homeb's gRPC reply to the coordinator through a delay relay on the wan (4 relay crossings + 1 = 5 per token);
direct with every gRPC connection between hosts through it (coordinator -> homea -> homeb -> coordinator: 3).
Each arm alternates latency off / on per round in one swarm; each prints its load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench.common import bench_model_dir, machine_banner
from openhydra.sim.nat_swarm import run_nat_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="tiny")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relay-one-way-ms", type=float, default=0.0,
                        help="> 0: only the relayed run, with every relay connection through the userspace delay "
                             "relay (this one-way delay per crossing), rounds interleaved latency off / on")
    parser.add_argument("--one-way-ms", type=float, default=0.0,
                        help="> 0: both arms with every link between hosts (relay legs and gRPC) at this one-way "
                             "delay through the userspace delay relay, rounds interleaved latency off / on")
    args = parser.parse_args()
    if args.one_way_ms > 0 and args.relay_one_way_ms > 0:
        parser.error("--one-way-ms already delays the relay legs: give one of --one-way-ms, --relay-one-way-ms")
    model_dir = Path(bench_model_dir(args.model_dir))
    print(machine_banner(), flush=True)
    results = {}
    for mode in ("relayed",) if args.relay_one_way_ms > 0 else ("relayed", "direct"):
        relay_ms = args.relay_one_way_ms or (args.one_way_ms if mode == "relayed" else 0.0)
        load = os.getloadavg()
        r = run_nat_scenario(model_dir, 8, lambda *_: "", prefix="ohbnat", tokens=args.tokens,
                             relay_failover=False, behind_nat=mode == "relayed", rounds=args.rounds,
                             relay_one_way_ms=relay_ms, grpc_one_way_ms=args.one_way_ms)
        reach = {name: v.get("seconds_to_reachable") for name, v in r["reachability"].items()}
        paths = [h["path"] for h in r["hop_paths"]]
        results[mode] = {"token_ms": r["token_ms"], "token_ms_delayed": r["token_ms_delayed"],
                         "relay_one_way_ms": relay_ms, "grpc_one_way_ms": args.one_way_ms, "paths": paths,
                         "relay_cpu_ms_per_token": r["relay_cpu_ms_per_token"],
                         "relay_bytes_per_token": r["relay_bytes_per_token"], "seconds_to_reachable": reach,
                         "start_to_serving_s": r["start_to_serving_s"], "loadavg_before": [round(x, 2) for x in load],
                         "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        if args.one_way_ms > 0:
            results[mode].update(added_latency(r["token_ms"], r["token_ms_delayed"], paths, args.one_way_ms))
        print(mode, json.dumps(results[mode]), flush=True)
    if args.one_way_ms > 0:
        print_comparison(results, args.one_way_ms)
    print(json.dumps(results))


def added_latency(off: list, on: list, paths: list[str], one_way_ms: float) -> dict:
    """Median per-token time with the latency off and on, the difference, and the prediction: one way per link
    crossing, the coordinator's own span (first hop) local, a relayed hop 2 crossings (to the relay, from it), a
    gRPC hop 1, and the last hop's reply to the coordinator 1 (gRPC in both arms)."""
    off, on = [x for x in off if x is not None], [x for x in on if x is not None]
    crossings = sum(2 if p == "relayed" else 1 for p in paths[1:]) + 1 if paths else None
    med_off = round(statistics.median(off), 1) if off else None
    med_on = round(statistics.median(on), 1) if on else None
    return {"median_ms_off": med_off, "median_ms_on": med_on,
            "added_ms": round(med_on - med_off, 1) if med_off is not None and med_on is not None else None,
            "crossings_per_token": crossings,
            "predicted_added_ms": crossings * one_way_ms if crossings is not None else None}


def print_comparison(results: dict, one_way_ms: float) -> None:
    """Both arms side by side, as a markdown table (the docs' layout)."""
    rows = [("hop paths", lambda r: ", ".join(r["paths"]) or "-"),
            ("per-token time, latency off (rounds)", lambda r: " / ".join(f"{x} ms" for x in r["token_ms"])),
            (f"per-token time, {one_way_ms:g} ms one-way per link (rounds)",
             lambda r: " / ".join(f"{x} ms" for x in r["token_ms_delayed"])),
            ("median off -> on", lambda r: f"{r['median_ms_off']} -> {r['median_ms_on']} ms"),
            ("added per token (predicted)",
             lambda r: f"+{r['added_ms']} ms ({r['crossings_per_token']} crossings x {one_way_ms:g} ms = "
                       f"{r['predicted_added_ms']} ms)"),
            ("load average before / after", lambda r: f"{r['loadavg_before']} / {r['loadavg_after']}")]
    print(f"\n| | {' | '.join(results)} |\n| --- |{' --- |' * len(results)}")
    for label, cell in rows:
        print(f"| {label} | {' | '.join(cell(r) for r in results.values())} |")
    print(flush=True)


if __name__ == "__main__":
    main()
