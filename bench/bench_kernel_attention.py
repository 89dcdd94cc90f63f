"""Attention on the low-bit library (runtime/kernel_attention.py) against PyTorch's SDPA, side by side.

    OMP_NUM_THREADS=1 python bench/bench_kernel_attention.py [--quantization int4] [--trials 7] [--steps 48]
        [--batch 8] [--long 1000]

Two ShardRuntimes of the embedded SmolLM2 in one process, fp32 with the low-bit kernel's matmuls and norms, 1
thread: one as the node loads it (``use_kernel_attention``: one ``oh_attention`` call per layer in every path), one
with SDPA kept (as before this change). Each trial measures on each arm, arms alternating which goes first:
- decode: the median step of ``--steps`` greedy tokens after the same 42-token prompt;
- batched: the median of 8 continuous-batching steps of ``--batch`` sessions (``forward_batch``, one new position
  per session, prompts of 20-48 tokens);
- prefill: one prompt of ``--long`` tokens (attention grows with its square: where SDPA's blocked kernel is
  strongest).
The medians of each, their ratios (SDPA ÷ kernel: above 1 means the kernel is faster) and the machine's load are
printed, beside a plot of the trials (docs/benchmarks.md, "Attention on the kernel").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import finish_plot, median_step_ms, medians, runtime_pair  # noqa: E402

ARMS = ("kernel attention", "SDPA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8"])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--long", type=int, default=1000, help="prefill length (0: skip)")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_kernel_attention.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    current, sdpa = runtime_pair(args.quantization, "use_kernel_attention", lambda *a, **k: False)  # SDPA kept
    runtimes = {ARMS[0]: current, ARMS[1]: sdpa}
    from openhydra.runtime import lowbit
    from openhydra.runtime.batching import _Pending, forward_batch
    from openhydra.runtime.kernel_attention import KERNEL_ATTENTION
    from openhydra.runtime.shard import ShardRuntime

    assert runtimes[ARMS[0]].shard_config._attn_implementation == KERNEL_ATTENTION
    assert runtimes[ARMS[1]].shard_config._attn_implementation == "sdpa"
    print(f"low-bit kernel: {lowbit.isa()}; {args.quantization}, fp32, 1 thread; "
          f"{runtimes[ARMS[0]].num_layers} layers")
    prompt = torch.arange(100, 142)
    long_prompt = torch.randint(3, 40000, (args.long,), generator=torch.Generator().manual_seed(1))
    batch_prompts = [torch.randint(3, 40000, (20 + 4 * i,), generator=torch.Generator().manual_seed(i))
                     for i in range(args.batch)]
    counter = {"n": 0}

    def session() -> str:
        counter["n"] += 1
        return f"s{counter['n']}"

    def decode(rt: ShardRuntime) -> float:
        return median_step_ms(rt, session(), prompt, args.steps)

    def batched(rt: ShardRuntime) -> float:
        sids = [session() for _ in batch_prompts]
        tokens = [rt.forward(s, torch.arange(p.numel()), input_ids=p).argmax(-1) for s, p in zip(sids, batch_prompts,
                                                                                                 strict=True)]
        times = []
        for j in range(8):
            items = [_Pending(s, p.numel() + j, t, None, False) for s, p, t in zip(sids, batch_prompts, tokens,
                                                                                     strict=True)]
            began = time.perf_counter()
            outs = forward_batch(rt, items)
            times.append(time.perf_counter() - began)
            tokens = [o.argmax(-1) for o in outs]
        for s in sids:
            rt.close_session(s)
        return statistics.median(times) * 1e3

    def prefill(rt: ShardRuntime) -> float:
        sid = session()
        began = time.perf_counter()
        rt.forward(sid, torch.arange(long_prompt.numel()), input_ids=long_prompt)
        elapsed = time.perf_counter() - began
        rt.close_session(sid)
        return elapsed * 1e3

    measures = {"decode step": decode, f"batched step ({args.batch} sessions)": batched}
    if args.long:
        measures[f"prefill of {args.long} tokens"] = prefill
    results = {m: {arm: [] for arm in ARMS} for m in measures}
    for trial in range(args.trials):
        order = ARMS if trial % 2 == 0 else ARMS[::-1]
        for m, fn in measures.items():
            for arm in order:
                results[m][arm].append(fn(runtimes[arm]))
        print(f"trial {trial}: " + "; ".join(
            f"{m} " + " / ".join(f"{results[m][arm][-1]:.2f}" for arm in ARMS) for m in measures) + " ms", flush=True)
    print(f"\n| measure | {ARMS[0]}, ms | {ARMS[1]}, ms | SDPA ÷ kernel (per-trial median) |\n|---|---|---|---|")
    for m in measures:
        med = medians(results[m])
        per_trial = statistics.median(b / a for a, b in zip(results[m][ARMS[0]], results[m][ARMS[1]], strict=True))
        print(f"| {m} | {med[ARMS[0]]:.2f} | {med[ARMS[1]]:.2f} | {med[ARMS[1]] / med[ARMS[0]]:.3f}x "
              f"({per_trial:.3f}x) |")
    _plot(results, args)


def _plot(results: dict[str, dict[str, list[float]]], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5))
    for ax, (measure, arms) in zip(axes, results.items(), strict=True):
        for arm, values in arms.items():
            ax.plot(range(len(values)), values, marker="o", label=arm)
        ax.set_title(measure, fontsize=9)
        ax.set_xlabel("trial")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("ms")
    axes[0].legend(fontsize=8)
    finish_plot(fig, axes[-1], args.plot, xlabel="trial", ylabel="ms",
                title=f"SmolLM2 {args.quantization}: attention on the kernel vs SDPA")


if __name__ == "__main__":
    main()
