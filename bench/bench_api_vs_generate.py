"""Decode tok/s through the node's streaming OpenAI API vs in-process transformers `generate`.

Same model (embedded SmolLM2-135M, bf16), same thread count (1 by default) in both processes, same
prompt and length, runs interleaved A/B/A/B, medians reported. Decode rate excludes prefill: it is
(tokens - 1) / (time of last token - time of first token) for both arms.

    python bench/bench_api_vs_generate.py --trials 7 --tokens 128 [--hardware cpu,cpu_fast]

``--hardware``: one node per listed conf/hardware option (bf16 each), all interleaved with ``generate``; each
node's ratio to it, and each to the first node's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from openhydra.testing import TEST_CACHE_ROOT

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import medians, plot_trials, print_table, run_interleaved  # noqa: E402


def api_decode_rate(url: str, model: str, messages: list[dict], tokens: int) -> float:
    import httpx

    body = {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    stamps: list[float] = []
    with httpx.Client(timeout=300) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def generate_decode_rate(model, prompt_ids, tokens: int) -> float:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    stamps = Stamps()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            streamer=stamps,
        )
    token_times = stamps.times[1:]  # the first put() is the prompt
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hardware", default="cpu", help="comma-separated conf/hardware options, one node each")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_api_vs_generate.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing.processes import NodeProcess

    torch.set_num_threads(args.threads)
    cache = TEST_CACHE_ROOT
    model_dir = embedded_model_dir(cache)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    from contextlib import ExitStack

    options = args.hardware.split(",")
    nodes = {hw: NodeProcess(["model=smollm2-135m", f"hardware={hw}", "hardware.dtype=bfloat16",
                              "api.rate_limit_requests=100000"], threads=args.threads) for hw in options}
    api_arms = {hw: f"streaming API (node, hardware={hw})" for hw in options}
    gen_arm = "transformers generate (in process)"
    with ExitStack() as stack:
        for node in nodes.values():
            stack.enter_context(node)
        for node in nodes.values():
            api_decode_rate(node.url, "openhydra-smollm2-135m", messages, 8)  # warm-up every arm
        generate_decode_rate(model, prompt_ids, 8)
        arms = {api_arms[hw]: (lambda url=node.url: api_decode_rate(url, "openhydra-smollm2-135m", messages,
                                                                     args.tokens)) for hw, node in nodes.items()}
        arms[gen_arm] = lambda: generate_decode_rate(model, prompt_ids, args.tokens)
        rates = run_interleaved(arms, args.trials)
    med = medians(rates)
    print_table(rates)
    first = api_arms[options[0]]
    for hw in options:
        arm = api_arms[hw]
        ratios = [a / g for a, g in zip(rates[arm], rates[gen_arm], strict=True)]
        print(f"\nhardware={hw}: ratio api/generate (median of medians) = {med[arm] / med[gen_arm]:.3f}; median of "
              f"per-trial ratios = {statistics.median(ratios):.3f}")
        if arm != first:
            ratios = [a / b for a, b in zip(rates[arm], rates[first], strict=True)]
            print(f"hardware={hw} ÷ hardware={options[0]}: {med[arm] / med[first]:.3f} (median of per-trial ratios "
                  f"{statistics.median(ratios):.3f})")
    ratio = med[first] / med[gen_arm]
    print(f"[threads={args.threads}, tokens={args.tokens}, trials={args.trials}, torch {torch.__version__}]")
    plot_trials(rates, f"SmolLM2-135M bf16, {args.threads} thread: ratio {ratio:.2f}", args.plot)

if __name__ == "__main__":
    sys.exit(main())
