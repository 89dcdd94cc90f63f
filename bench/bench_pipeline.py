"""Decode tok/s of a 3-peer loopback pipeline vs one node holding the whole model.

Both arms are real node processes driven through the streaming OpenAI API with the same prompt and
length, 1 torch thread per process, runs interleaved, medians reported. The swarm is the HTTP DHT
plus three nodes serving SmolLM2-135M layers [0,10), [10,20), [20,30); requests enter at the first.

    python bench/bench_pipeline.py --trials 7 --tokens 96
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from openhydra.testing import TEST_CACHE_ROOT

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_api_vs_generate import api_decode_rate  # noqa: E402
from common import medians, plot_trials, print_table, run_interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_pipeline.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

    cache = TEST_CACHE_ROOT
    model_dir = embedded_model_dir(cache)
    model = model_dir.name
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    single = NodeProcess(["model=local", f"model.path={model_dir}", "hardware=cpu", f"hardware.dtype={args.dtype}",
                          f"node.data_dir={work / 'single'}", "api.rate_limit_requests=100000"], threads=1)
    with DhtProcess() as dht:
        peers = [NodeProcess(swarm_node_overrides(model_dir, dht.url, a, b, work / f"p{a}", dtype=args.dtype),
                             threads=1) for a, b in [(0, 10), (10, 20), (20, 30)]]
        try:
            start_all([single, *peers])
            urls = {"single node": single.url, "3-peer pipeline": peers[0].url}
            for url in urls.values():
                api_decode_rate(url, model, messages, 8)  # warm-up
            arms = {name: (lambda url=url: api_decode_rate(url, model, messages, args.tokens))
                    for name, url in urls.items()}
            rates = run_interleaved(arms, args.trials)
        finally:
            for node in [single, *peers]:
                node.stop()
    med = medians(rates)
    ratio = med["3-peer pipeline"] / med["single node"]
    per_token_ms = 1000 / med["3-peer pipeline"] - 1000 / med["single node"]
    print_table(rates)
    print(f"\nratio pipeline/single = {ratio:.3f}; extra per token = {per_token_ms:.2f} ms for 3 hops + reply "
          f"[{args.dtype}, 1 thread per process, tokens={args.tokens}, trials={args.trials}]")
    plot_trials(rates, f"SmolLM2-135M {args.dtype}: pipeline/single = {ratio:.2f}", args.plot)


if __name__ == "__main__":
    sys.exit(main())
