"""Decode step with the layer norms on the low-bit library (KernelRMSNorm) against PyTorch's, side by side.

    OMP_NUM_THREADS=1 python bench/bench_kernel_norms.py [--quantization int4] [--trials 9] [--steps 48]

Two ShardRuntimes of the embedded SmolLM2 in one process, fp32 with the low-bit kernel's matmuls, 1 thread: one as
the node loads it (``use_kernel_norms``: every layer's two norms one ``oh_rms_norm`` call each), one with
transformers' RMSNorm modules kept (the lean step's six PyTorch operations per norm), both with SDPA attention
(bench_kernel_attention.py measures the kernel's). Each trial decodes ``--steps`` greedy tokens on each arm after the
same 42-token prompt, arms alternating which goes first; the medians of the per-trial median step times and their
ratio are printed with the machine's load, beside a plot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import medians, plot_trials, print_table, run_interleaved, runtime_pair, step_arms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8"])
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_kernel_norms.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    from openhydra.runtime import shard

    # the norms alone: attention stays SDPA in both arms (the kernel's attention needs the kernel's norms)
    original, shard.use_kernel_attention = shard.use_kernel_attention, lambda *a, **k: False
    try:
        kernel_rt, torch_rt = runtime_pair(args.quantization, "use_kernel_norms", lambda layers, dtype: 0)
    finally:
        shard.use_kernel_attention = original
    from openhydra.runtime import lean_layers, lowbit

    assert kernel_rt.kernel_norm_layers == kernel_rt.num_layers and torch_rt.kernel_norm_layers == 0
    assert all(isinstance(layer.input_layernorm, lowbit.KernelRMSNorm) for layer in kernel_rt.modules.layers)
    assert lean_layers.lean_usable(kernel_rt._lean, "sdpa") and lean_layers.lean_usable(torch_rt._lean, "sdpa")
    print(f"low-bit kernel: {lowbit.isa()}; {args.quantization}, fp32, 1 thread; {kernel_rt.num_layers} layers")
    prompt = torch.arange(100, 142)
    arms = step_arms({"norms on the kernel": kernel_rt, "PyTorch norms": torch_rt}, prompt, args.steps)
    rates = run_interleaved(arms, args.trials, unit="ms/step")
    print_table(rates, metric="median ms per decode step")
    m = medians(rates)
    ratio = m["PyTorch norms"] / m["norms on the kernel"]
    per_trial = statistics.median(b / a for a, b in zip(rates["norms on the kernel"], rates["PyTorch norms"],
                                                        strict=True))
    saved = m["PyTorch norms"] - m["norms on the kernel"]
    print(f"\nspeed-up {ratio:.3f}x (per-trial median {per_trial:.3f}x): {saved:.2f} ms per step, "
          f"{saved * 1e3 / (2 * kernel_rt.num_layers):.1f} us per norm")
    plot_trials(rates, f"SmolLM2 {args.quantization} decode step: layer norms", args.plot, ylabel="ms per step")


if __name__ == "__main__":
    main()
