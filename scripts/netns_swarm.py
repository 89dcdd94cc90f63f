"""A real OpenHydra swarm across 7 network namespaces, links through the userspace delay relay.

Router (bridge + relay), DHT, 4 peers serving SmolLM2-135M in spans (the middle span twice), and a
coordinator; every connection between namespaces crosses the relay (one-way delay + bandwidth cap
per link). Prints one JSON report: discovery, the chain, per-token latency against the prediction
(whole-model compute measured in this process + one-way hops), and failover after cutting the
middle peer's link mid-stream. Needs root and `ip netns`; cleans its namespaces up on exit.

    python scripts/netns_swarm.py [--model smollm2|tiny] [--one-way-ms 10] [--rate-mbit 100] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openhydra.node import model_num_layers
from openhydra.runtime.source import embedded_model_dir
from openhydra.sim.netns import available
from openhydra.sim.netns_swarm import run_scenario

CACHE = Path.home() / ".cache" / "openhydra-test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--one-way-ms", type=float, default=10.0, help="added one-way latency per link, ms")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="bandwidth cap per link direction")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--cut-at-token", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency-off/on stream pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    args = parser.parse_args()
    ok, why = available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    if args.model == "smollm2":
        model_dir = embedded_model_dir(CACHE)
    else:
        from openhydra.testing.tiny import build_tiny_model

        model_dir = build_tiny_model("llama", CACHE / "tiny-llama-8l", embedded_model_dir(CACHE), num_layers=8)
    layers, _ = model_num_layers(model_dir)
    report = run_scenario(model_dir, layers, prefix="ohswarm", one_way_ms=args.one_way_ms, rate_mbit=args.rate_mbit,
                          tokens=args.tokens, cut_at_token=args.cut_at_token, rounds=args.rounds,
                          threads=args.threads)
    report["model"] = str(model_dir)
    report["layers"] = layers
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
