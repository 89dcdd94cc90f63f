"""Serving from behind NAT: per-token time relayed (libp2p circuit relay) vs direct (gRPC), relay cost, time to
become reachable. Needs root, network namespaces and nft (openhydra/sim/nat.py).

    python -m bench.bench_nat [--model-dir tiny|smollm2|DIR] [--tokens 24] [--rounds 3]

Two runs of the same 3-node chain (coordinator [0,3) -> homea [3,6) -> homeb [6,8) -> coordinator), one after the
other in fresh namespaces: ``relayed`` puts homea and homeb behind their own nftables NAT routers (libp2p through
p2pd relays: coordinator -> relay -> homea -> relay -> homeb); ``direct`` puts them on the public segment with
plain gRPC. Per-token time is the median gap between streamed tokens (after the first 2), per round. Relay CPU
and bytes are read from /proc of the relay daemons over the timed rounds. ``--relay-one-way-ms 10`` puts the
userspace delay relay (openhydra/sim/relay.py; this kernel has no netem) in front of every relay: each crossing of
a relay leg gets 10 ms one-way (20 ms RTT per link), so a relayed hop gets 2 x 10 ms; rounds alternate latency
off / on in the same swarm. The direct (gRPC) links get no added latency in this topology.
"""

from __future__ import annotations

import argparse
import json
import os
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
    args = parser.parse_args()
    model_dir = Path(bench_model_dir(args.model_dir))
    print(machine_banner(), flush=True)
    results = {}
    for mode in ("relayed",) if args.relay_one_way_ms > 0 else ("relayed", "direct"):
        load = os.getloadavg()
        r = run_nat_scenario(model_dir, 8, lambda *_: "", prefix="ohbnat", tokens=args.tokens,
                             relay_failover=False, behind_nat=mode == "relayed", rounds=args.rounds,
                             relay_one_way_ms=args.relay_one_way_ms)
        reach = {name: v.get("seconds_to_reachable") for name, v in r["reachability"].items()}
        results[mode] = {"token_ms": r["token_ms"], "token_ms_delayed": r["token_ms_delayed"],
                         "relay_one_way_ms": args.relay_one_way_ms, "paths": [h["path"] for h in r["hop_paths"]],
                         "relay_cpu_ms_per_token": r["relay_cpu_ms_per_token"],
                         "relay_bytes_per_token": r["relay_bytes_per_token"], "seconds_to_reachable": reach,
                         "start_to_serving_s": r["start_to_serving_s"], "loadavg_before": [round(x, 2) for x in load]}
        print(mode, json.dumps(results[mode]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
