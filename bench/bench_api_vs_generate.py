"""Decode tok/s through the node's streaming OpenAI API vs in-process transformers `generate`.

Same model (embedded SmolLM2-135M, bf16), same thread count (1 by default) in both processes, same
prompt and length, runs interleaved A/B/A/B, medians reported. Decode rate excludes prefill: it is
(tokens - 1) / (time of last token - time of first token) for both arms.

    python bench/bench_api_vs_generate.py --trials 7 --tokens 128
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

    node = NodeProcess(
        [
            "model=smollm2-135m",
            "hardware=cpu",
            "hardware.dtype=bfloat16",
            "api.rate_limit_requests=100000",
        ],
        threads=args.threads,
    )
    api_arm, gen_arm = "streaming API (node process)", "transformers generate (in process)"
    with node:
        api_decode_rate(node.url, "openhydra-smollm2-135m", messages, 8)  # warm-up both arms
        generate_decode_rate(model, prompt_ids, 8)
        rates = run_interleaved(
            {
                api_arm: lambda: api_decode_rate(node.url, "openhydra-smollm2-135m", messages, args.tokens),
                gen_arm: lambda: generate_decode_rate(model, prompt_ids, args.tokens),
            },
            args.trials,
        )
    med = medians(rates)
    ratio = med[api_arm] / med[gen_arm]
    ratios = [a / g for a, g in zip(rates[api_arm], rates[gen_arm], strict=True)]
    print_table(rates)
    print(
        f"\nratio api/generate (median of medians) = {ratio:.3f}; "
        f"median of per-trial ratios = {statistics.median(ratios):.3f}  "
        f"[threads={args.threads}, tokens={args.tokens}, trials={args.trials}, torch {torch.__version__}]"
    )
    plot_trials(rates, f"SmolLM2-135M bf16, {args.threads} thread: ratio {ratio:.2f}", args.plot)

if __name__ == "__main__":
    sys.exit(main())
