"""Decode tok/s of a 3-peer loopback pipeline with ``privacy=onion`` vs ``privacy=off``, interleaved.

Two swarms of real node processes (each: its own HTTP DHT and three nodes serving SmolLM2-135M layers
[0,10), [10,20), [20,30), 1 torch thread per process), identical except for the privacy option. Both
are driven through the streaming OpenAI API of their first node with the same prompt and length,
arms alternate order every trial, medians reported (DESIGN.md §4: compare A and B in one run).
Under ``onion`` every activation (coordinator -> A -> B -> C -> coordinator) is sealed with
AES-256-GCM, the coordinator embeds locally, and each session starts with a 3-layer onion.

    python bench/bench_privacy.py --trials 7 --tokens 96
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from openhydra.testing import TEST_CACHE_ROOT

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_api_vs_generate import api_decode_rate  # noqa: E402
from common import machine_banner, medians, plot_trials, print_table, run_interleaved  # noqa: E402

SPANS = [(0, 10), (10, 20), (20, 30)]
ARMS = ("privacy=off", "privacy=onion")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_privacy.png"))
    args = parser.parse_args()

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

    cache = TEST_CACHE_ROOT
    model_dir = embedded_model_dir(cache)
    model = model_dir.name
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="bench-privacy-"))
    print(f"start: {machine_banner()}", flush=True)
    with DhtProcess() as dht_off, DhtProcess() as dht_onion:
        def node(arm: str, dht_url: str, a: int, b: int) -> NodeProcess:
            overrides = swarm_node_overrides(model_dir, dht_url, a, b, work / f"{arm[8:]}{a}", dtype=args.dtype)
            return NodeProcess([*overrides, arm], threads=1)

        swarms = {arm: [node(arm, dht.url, a, b) for a, b in SPANS]
                  for arm, dht in zip(ARMS, (dht_off, dht_onion), strict=True)}
        nodes = [n for swarm in swarms.values() for n in swarm]
        try:
            start_all(nodes)
            urls = {arm: swarm[0].url for arm, swarm in swarms.items()}
            for url in urls.values():
                api_decode_rate(url, model, messages, 8)  # warm-up
            arms = {arm: (lambda url=url: api_decode_rate(url, model, messages, args.tokens))
                    for arm, url in urls.items()}
            rates = run_interleaved(arms, args.trials)
        finally:
            for node in nodes:
                node.stop()
    med = medians(rates)
    ratio = med["privacy=onion"] / med["privacy=off"]
    per_token_ms = 1000 / med["privacy=onion"] - 1000 / med["privacy=off"]
    print_table(rates)
    per_trial = sorted(b / a for a, b in zip(rates["privacy=off"], rates["privacy=onion"], strict=True))
    print(f"per-trial onion/off: {', '.join(f'{r:.3f}' for r in per_trial)} "
          f"(median {statistics.median(per_trial):.3f})")
    print(f"end: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nratio onion/off = {ratio:.3f} (target >= 0.98); extra per token = {per_token_ms:.2f} ms "
          f"[{args.dtype}, 3 peers, 1 thread per process, tokens={args.tokens}, trials={args.trials}]")
    plot_trials(rates, f"SmolLM2-135M {args.dtype}, 3 peers: onion/off = {ratio:.3f}", args.plot)


if __name__ == "__main__":
    sys.exit(main())
