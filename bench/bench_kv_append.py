"""K/V appended in place (runtime/kv_layer.py ``AppendLayer``) vs transformers' concatenating ``DynamicLayer``.

    OMP_NUM_THREADS=1 python bench/bench_kv_append.py [--prompt 2000] [--steps 48] [--trials 5]
        [--quantization int4] [--dtype float32]

The embedded SmolLM2 in one ShardRuntime, 1 thread: per trial and arm, a ``--prompt``-token prefill then
``--steps`` greedy decode steps, each timed; the arms alternate order per trial and share the runtime (only the
session's cache differs). Prints the median decode step per arm, the per-trial ratios and checks the tokens are
the same; a plot beside the table. docs/benchmarks.md, "One node vs llama.cpp".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_trials, print_table

from openhydra.testing.machine import announce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--quantization", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--plot", default="docs/img/bench_kv_append.png")
    args = parser.parse_args()
    announce()
    torch.set_num_threads(1)
    from transformers import DynamicCache

    from openhydra.runtime.kv_layer import session_cache
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    rt = ShardRuntime(embedded_model_dir(TEST_CACHE_ROOT), dtype=getattr(torch, args.dtype),
                      quantization=args.quantization)
    arms = {"DynamicLayer (concatenate)": lambda: DynamicCache(config=rt.shard_config),
            "AppendLayer (in place)": lambda: session_cache(rt.shard_config)}
    step_ms: dict[str, list[float]] = {name: [] for name in arms}
    tokens: dict[str, list[int]] = {}
    prompt = torch.arange(100, 100 + args.prompt) % rt.vocab_size
    for trial in range(args.trials):
        order = list(arms) if trial % 2 == 0 else list(arms)[::-1]
        for name in order:
            rt._sessions._new_cache = arms[name]
            session = f"{name}-{trial}"
            out = rt.forward(session, torch.arange(args.prompt), input_ids=prompt)
            times, produced = [], []
            for i in range(args.steps):
                token = int(out.argmax())
                produced.append(token)
                began = time.perf_counter()
                out = rt.forward(session, torch.tensor([args.prompt + i]), input_ids=torch.tensor([token]))
                times.append(time.perf_counter() - began)
            rt.close_session(session)
            step_ms[name].append(statistics.median(times) * 1e3)
            tokens.setdefault(name, produced)
            print(f"trial {trial + 1}: {name} {step_ms[name][-1]:.2f} ms per step", flush=True)
    names = list(arms)
    print_table(step_ms, metric="median decode step (ms)")
    ratios = [a / b for a, b in zip(step_ms[names[1]], step_ms[names[0]], strict=True)]
    print(f"\nin place ÷ concatenate, per trial: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f}")
    print(f"same tokens: {tokens[names[0]] == tokens[names[1]]}")
    print(f"[prompt={args.prompt}, steps={args.steps}, trials={args.trials}, quantization={args.quantization}, "
          f"dtype={args.dtype}, 1 thread]")
    plot_trials(step_ms, f"decode step at {args.prompt}+ positions: in place ÷ concatenate "
                         f"{statistics.median(ratios):.3f}", args.plot, ylabel="ms per decode step")


if __name__ == "__main__":
    main()
