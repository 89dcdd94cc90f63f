"""Decode step with the low-bit kernel's packed weights in 2 MiB pages (runtime/hugepages.py) against 4 KiB pages.

    OMP_NUM_THREADS=1 python bench/bench_hugepages.py [--quantization int4] [--trials 9] [--steps 48]

Two ShardRuntimes of the embedded SmolLM2 (all 30 layers and the head) in one process, fp32 activations on the low-bit
kernel, 1 thread: one as the node loads it (packed weights carved from ``MADV_HUGEPAGE`` chunks), one loaded with
``OPENHYDRA_HUGEPAGES=0`` (plain torch allocations: the same bytes in 4 KiB pages). Each trial decodes ``--steps``
greedy tokens on each arm after the same 42-token prompt, arms alternating which goes first; the medians of the
per-trial median step times and their ratio are printed with the machine's load and the process's AnonHugePages,
beside a plot. Both arms must give the same tokens (checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import median_step_ms, medians, plot_trials, print_table, run_interleaved  # noqa: E402


def anon_huge_mib() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8"])
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_hugepages.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    torch.set_num_threads(1)
    from openhydra.runtime import hugepages, lowbit
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    if lowbit.kernel() is None:
        sys.exit("no low-bit kernel on this machine: nothing to compare")
    if not hugepages.available():
        sys.exit("this OS offers no transparent huge pages: nothing to compare")
    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    before = anon_huge_mib()
    huge = ShardRuntime(model_dir, dtype=torch.float32, quantization=args.quantization)
    in_huge = anon_huge_mib() - before
    os.environ[hugepages.ENV] = "0"
    try:
        plain = ShardRuntime(model_dir, dtype=torch.float32, quantization=args.quantization)
    finally:
        del os.environ[hugepages.ENV]
    grew = anon_huge_mib() - before - in_huge
    thp = hugepages.THP_ENABLED.read_text().strip()
    print(f"low-bit kernel: {lowbit.isa()}; {args.quantization}, fp32, 1 thread; AnonHugePages +{in_huge:.0f} MiB "
          f"loading the huge-page arm, +{grew:.0f} MiB loading the other; THP: {thp}")
    prompt = torch.arange(100, 142)
    tokens = {}
    for name, rt in (("huge", huge), ("plain", plain)):
        out, seq = rt.forward("check", torch.arange(prompt.numel()), input_ids=prompt), []
        for i in range(16):
            seq.append(int(out.argmax()))
            out = rt.forward("check", torch.tensor([prompt.numel() + i]), input_ids=torch.tensor([seq[-1]]))
        rt.close_session("check")
        tokens[name] = seq
    assert tokens["huge"] == tokens["plain"], tokens
    trial = {"n": 0}

    def arm(rt: ShardRuntime):
        def run() -> float:
            trial["n"] += 1
            return median_step_ms(rt, f"t{trial['n']}", prompt, args.steps)

        return run

    names = ("2 MiB pages", "4 KiB pages")
    rates = run_interleaved({names[0]: arm(huge), names[1]: arm(plain)}, args.trials, unit="ms/step")
    print_table(rates, metric="median ms per decode step")
    m = medians(rates)
    per_trial = statistics.median(b / a for a, b in zip(rates[names[0]], rates[names[1]], strict=True))
    print(f"\nspeed-up {m[names[1]] / m[names[0]]:.3f}x (per-trial median {per_trial:.3f}x): "
          f"{m[names[1]] - m[names[0]]:.2f} ms per step; same 16 greedy tokens in both arms")
    plot_trials(rates, f"SmolLM2 {args.quantization} decode step: weights in 2 MiB vs 4 KiB pages", args.plot,
                ylabel="ms per step")


if __name__ == "__main__":
    main()
