"""Aggregate output tok/s with 8 concurrent streams vs 1 stream on one node (continuous batching).

Node processes serving embedded SmolLM2-135M (bf16, 1 thread each), driven through the streaming
OpenAI chat API with distinct prompts (so coalescing never applies). Arms, interleaved per trial:
- 1 stream, serving=batched;
- 8 concurrent streams, serving=batched (decode steps of all sessions run as one forward);
- with --with-off, 8 concurrent streams and 1 stream on a serving=off node (each session's step runs alone);
- with --with-unchained, 1 and 8 streams on a batched node without decode chains (``OPENHYDRA_STEP_CHAINS=0``: each
  stream's thread queues its own next step, the behaviour before runtime/step_chain.py).
A batched node runs every decode step on a fixed 8-row matmul with per-row attention (the exact mode:
a stream's tokens do not depend on the others), a lone stream included: 1 stream batched / 1 stream off
is what exactness costs a lone stream.
Aggregate output tok/s = all completion tokens / wall time from the first request sent to the last
stream closed (prefill included, as serving benchmarks report). Target: 8 batched / 1 >= 3.

    python bench/bench_batching.py --trials 3 --tokens 32 [--with-off] [--with-unchained]
        [--hardware cpu_int4 --dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import medians, plot_trials, print_table, run_interleaved  # noqa: E402

from openhydra.testing.machine import announce  # noqa: E402

TOPICS = ["a lighthouse keeper", "a clockmaker", "a river pilot", "a beekeeper", "a glassblower", "a cartographer",
          "a night baker", "a bridge engineer"]
MODEL = "openhydra-smollm2-135m"


def stream_tokens(url: str, topic: str, tokens: int) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    count = 0
    with httpx.Client(timeout=600) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    count = usage["completion_tokens"]
    return count


def aggregate_rate(url: str, streams: int, tokens: int) -> float:
    counts = [0] * streams

    def run(i: int) -> None:
        counts[i] = stream_tokens(url, TOPICS[i % len(TOPICS)], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if min(counts) != tokens:
        raise RuntimeError(f"streams returned {counts} tokens, expected {tokens} each")
    return sum(counts) / elapsed


def node_overrides(hardware: str, dtype: str, *extra: str) -> list[str]:
    """A bench node serving the embedded SmolLM2 on ``hardware`` in ``dtype``, privacy off, no rate limit."""
    # no node.data_dir: each NodeProcess gets its own (a running node locks its data dir, cli.py)
    return ["model=smollm2-135m", f"hardware={hardware}", f"hardware.dtype={dtype}",
            "api.rate_limit_requests=100000", "privacy=off", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hardware", default="cpu", help="conf/hardware group of the nodes")
    parser.add_argument("--dtype", default="bfloat16", help="hardware.dtype (float32 for cpu_int4 / cpu_int8)")
    parser.add_argument("--with-off", action="store_true", help="also time the streams on a serving=off node")
    parser.add_argument("--with-unchained", action="store_true",
                        help="also time the streams on a batched node without decode chains")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_batching.png"))
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    from openhydra.testing.processes import NodeProcess

    common = node_overrides(args.hardware, args.dtype)
    batched = NodeProcess([*common, "serving=batched", f"serving.batching.max_batch={args.streams}"],
                          threads=args.threads)
    plain = NodeProcess([*common, "serving=off"], threads=args.threads)
    unchained = NodeProcess([*common, "serving=batched", f"serving.batching.max_batch={args.streams}"],
                            threads=args.threads, env={"OPENHYDRA_STEP_CHAINS": "0"})
    one, many, many_off = "1 stream (batched node)", f"{args.streams} streams (batched node)", \
        f"{args.streams} streams (serving=off)"
    one_off = "1 stream (serving=off)"
    arms = {
        one: lambda: aggregate_rate(batched.url, 1, args.tokens),
        many: lambda: aggregate_rate(batched.url, args.streams, args.tokens),
    }
    if args.with_off:
        arms[many_off] = lambda: aggregate_rate(plain.url, args.streams, args.tokens)
        arms[one_off] = lambda: aggregate_rate(plain.url, 1, args.tokens)
    one_un, many_un = "1 stream (batched, no chains)", f"{args.streams} streams (batched, no chains)"
    if args.with_unchained:
        arms[one_un] = lambda: aggregate_rate(unchained.url, 1, args.tokens)
        arms[many_un] = lambda: aggregate_rate(unchained.url, args.streams, args.tokens)
    print(f"load average before: {os.getloadavg()}")
    with batched:
        aggregate_rate(batched.url, 2, 4)  # warm-up
        for wanted, node in ((args.with_off, plain), (args.with_unchained, unchained)):
            if wanted:
                node.start().wait_ready()
                aggregate_rate(node.url, 2, 4)
        try:
            rates = run_interleaved(arms, args.trials)
        finally:
            plain.stop()
            unchained.stop()
    print(f"load average after: {os.getloadavg()} (2 shared cores: absolute figures are noisy)")
    med = medians(rates)
    print_table(rates, metric="median aggregate output tok/s")
    off = (f"; batched / unbatched at {args.streams} streams = {med[many] / med[many_off]:.2f}; 1 stream batched "
           f"(exact, padded rows) / 1 stream off = {med[one] / med[one_off]:.2f}") if args.with_off else ""
    if args.with_unchained:
        chains_trial = statistics.median(m / o for m, o in zip(rates[many], rates[many_un], strict=True))
        off += (f"; decode chains: 8 streams {med[many] / med[many_un]:.2f}x (per-trial {chains_trial:.2f}), "
                f"1 stream {med[one] / med[one_un]:.2f}x, 8 / 1 without them {med[many_un] / med[one_un]:.2f}")
    per_trial = statistics.median(m / o for m, o in zip(rates[many], rates[one], strict=True))
    print(f"\n{args.streams} streams / 1 stream (batched) = {med[many] / med[one]:.2f} (median per-trial ratio "
          f"{per_trial:.2f}; target >= 3){off}  "
          f"[hardware={args.hardware}, {args.dtype}, tokens={args.tokens}, threads={args.threads}, "
          f"trials={args.trials}]")
    plot_trials(rates, f"SmolLM2-135M {args.hardware} {args.dtype}, 1 thread: {args.streams} streams / 1 = "
                f"{med[many] / med[one]:.2f}",
                args.plot, ylabel="aggregate output tok/s")


if __name__ == "__main__":
    sys.exit(main())
