"""TTFT of a request whose 1,000-token prefix another request already computed, vs a cold request.

One node process (embedded SmolLM2-135M, bf16, 1 thread, serving=default: prefix cache on), driven
through its streaming OpenAI completions API. Per trial and interleaved:
- cold: a fresh random 1,000-token prefix + a question, never seen before: the whole prompt is prefilled;
- warm: another fresh prefix, first sent once with one question (untimed: it fills the cache), then
  timed with a different question: only the blocks after the shared prefix are computed.
With --with-off, a third arm: cold on a serving=off node, which prefills the prompt in one piece. The
serving=default node computes every prompt in 32-token block pieces (the exact mode: a hit gives the cold
run's tokens bit for bit), so cold(default)/cold(off) is what exactness costs a cold request.
TTFT is the time from sending the request to its first streamed token. Target: warm/cold <= 0.2.

    python bench/bench_prefix_cache.py --trials 7 [--with-off]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

from openhydra.testing import TEST_CACHE_ROOT

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import medians, plot_trials, print_table, run_interleaved  # noqa: E402

WORDS = ["river", "stone", "light", "harbor", "market", "winter", "garden", "letter", "engine", "window", "silver",
         "forest", "road", "captain", "village", "music", "paper", "mountain", "signal", "orchard", "bridge"]


def make_prefix(tokenizer, tokens: int, rng: random.Random) -> str:
    words: list[str] = []
    while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(50))
    while len(tokenizer(" ".join(words))["input_ids"]) > tokens:
        words.pop()
    return "Notes: " + " ".join(words)


def ttft_ms(url: str, model: str, prompt: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True, "ignore_eos": True}
    began = time.perf_counter()
    with httpx.Client(timeout=300) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
                return (time.perf_counter() - began) * 1000
    raise RuntimeError("no token streamed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--with-off", action="store_true", help="also time cold requests on a serving=off node")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_prefix_cache.png"))
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from transformers import AutoTokenizer

    from openhydra.testing.machine import announce

    announce()  # the CPU, its flags, versions and the load average now; the load again at exit

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import NodeProcess

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(TEST_CACHE_ROOT))
    rng = random.Random(0)
    model = "openhydra-smollm2-135m"
    common = ["model=smollm2-135m", "hardware=cpu", "hardware.dtype=bfloat16", "api.rate_limit_requests=100000"]
    node = NodeProcess([*common, "serving=default"], threads=args.threads)  # each its own data dir (NodeProcess)
    off_node = NodeProcess([*common, "serving=off"], threads=args.threads)

    def cold() -> float:
        prefix = make_prefix(tokenizer, args.prefix_tokens, rng)
        return ttft_ms(node.url, model, prefix + "\nQuestion: which word is first?")

    def warm() -> float:
        prefix = make_prefix(tokenizer, args.prefix_tokens, rng)
        ttft_ms(node.url, model, prefix + "\nQuestion: which word is first?")  # fills the cache (untimed)
        return ttft_ms(node.url, model, prefix + "\nQuestion: which word is last?")

    def cold_off() -> float:
        prefix = make_prefix(tokenizer, args.prefix_tokens, rng)
        return ttft_ms(off_node.url, model, prefix + "\nQuestion: which word is first?")

    cold_arm, warm_arm = "cold (fresh 1,000-token prefix)", "warm (prefix computed before)"
    off_arm = "cold, serving=off (one-piece prefill)"
    arms = {cold_arm: cold, warm_arm: warm}
    print(f"load average before: {os.getloadavg()}")
    with node:
        cold(), warm()  # warm-up: first-request costs out of the way
        if args.with_off:
            off_node.start().wait_ready()
            cold_off()
            arms[off_arm] = cold_off
        try:
            rates = run_interleaved(arms, args.trials, unit="ms")
        finally:
            off_node.stop()
    print(f"load average after: {os.getloadavg()} (2 shared cores: absolute figures are noisy)")
    med = medians(rates)
    if args.with_off:
        print(f"cold exact (block pieces) / cold serving=off (one piece) = {med[cold_arm] / med[off_arm]:.3f}")
    ratio = med[warm_arm] / med[cold_arm]
    per_trial = [w / c for w, c in zip(rates[warm_arm], rates[cold_arm], strict=True)]
    print_table(rates, metric="median TTFT ms")
    print(f"\nTTFT warm/cold (median of medians) = {ratio:.3f}; median per-trial ratio = "
          f"{statistics.median(per_trial):.3f}  [prefix {args.prefix_tokens} tokens, threads={args.threads}, "
          f"trials={args.trials}] target <= 0.2")
    plot_trials(rates, f"SmolLM2-135M TTFT, 1,000-token shared prefix: warm/cold {ratio:.2f}", args.plot,
                ylabel="TTFT ms")


if __name__ == "__main__":
    sys.exit(main())
