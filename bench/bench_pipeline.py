"""Decode tok/s of a 3-peer loopback pipeline vs one node holding the whole model.

Both arms are real node processes driven through the streaming OpenAI API with the same prompt and
length, 1 torch thread per process, runs interleaved, medians reported. The swarm is the HTTP DHT
plus three nodes serving SmolLM2-135M layers [0,10), [10,20), [20,30); requests enter at the first.

    python bench/bench_pipeline.py --trials 7 --tokens 96
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

from bench_api_vs_generate import api_decode_rate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_pipeline.png"))
    args = parser.parse_args()

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

    cache = Path(os.environ.get("OPENHYDRA_TEST_CACHE", Path.home() / ".cache" / "openhydra-test"))
    model_dir = embedded_model_dir(cache)
    model = model_dir.name
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    single = NodeProcess(["model=local", f"model.path={model_dir}", "hardware=cpu", f"hardware.dtype={args.dtype}",
                          f"node.data_dir={work / 'single'}", "api.rate_limit_requests=100000"], threads=1)
    rates: dict[str, list[float]] = {"single node": [], "3-peer pipeline": []}
    with DhtProcess() as dht:
        peers = [NodeProcess(swarm_node_overrides(model_dir, dht.url, a, b, work / f"p{a}", dtype=args.dtype),
                             threads=1) for a, b in [(0, 10), (10, 20), (20, 30)]]
        try:
            start_all([single, *peers])
            arms = {"single node": single.url, "3-peer pipeline": peers[0].url}
            for url in arms.values():
                api_decode_rate(url, model, messages, 8)  # warm-up
            for trial in range(args.trials):
                order = list(arms) if trial % 2 == 0 else list(reversed(arms))
                for name in order:
                    rate = api_decode_rate(arms[name], model, messages, args.tokens)
                    rates[name].append(rate)
                    print(f"trial {trial} {name:16s} {rate:6.2f} tok/s", flush=True)
        finally:
            for node in [single, *peers]:
                node.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["3-peer pipeline"] / med["single node"]
    per_token_ms = 1000 / med["3-peer pipeline"] - 1000 / med["single node"]
    print("\n| arm | median decode tok/s |\n|---|---|")
    for name, value in med.items():
        print(f"| {name} | {value:.2f} |")
    print(f"\nratio pipeline/single = {ratio:.3f}; extra per token = {per_token_ms:.2f} ms for 3 hops + reply "
          f"[{args.dtype}, 1 thread per process, tokens={args.tokens}, trials={args.trials}]")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in rates.items():
        ax.plot(range(len(values)), values, "o-", label=name)
    ax.set_xlabel("trial (interleaved)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"SmolLM2-135M {args.dtype}: pipeline/single = {ratio:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
