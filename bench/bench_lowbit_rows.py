"""The low-bit kernel (runtime/kernels/lowbit.c) at each row count: this tree's source against a git revision's.

A decode step gives the kernel 1 activation row, a batched step of 8 sessions 8, a speculative verify 2-9, a
prefill tens. Both sources are built with the node's own flags (runtime/lowbit.py ``_build``) and run on the same
packed weights: every Linear-like module of the embedded SmolLM2-135M at ``--quantization`` (the head included),
the whole model's matmuls of one step per measurement. Arms interleaved per trial, 1 thread; each arm's outputs
must be bit-equal at every row count (fp32 and bf16 inputs), or the script stops.

    OMP_NUM_THREADS=1 python bench/bench_lowbit_rows.py --base REV [--rows 1,4,8,16,42] [--trials 11]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table

from openhydra.testing.machine import announce

ROOT = Path(__file__).resolve().parent.parent


def build_at(revision: str, scratch: Path) -> ctypes.CDLL:
    """The kernel library of ``revision``'s lowbit.c, built as the node builds its own."""
    from openhydra.runtime import lowbit

    source = scratch / "lowbit.c"
    source.write_text(subprocess.run(["git", "show", f"{revision}:openhydra/runtime/kernels/lowbit.c"], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout)
    own, lowbit.SOURCE = lowbit.SOURCE, source
    try:
        built = lowbit._build(scratch / "cache")
    finally:
        lowbit.SOURCE = own
    library = lowbit.open_library(built) if built is not None else None
    if library is None:
        raise SystemExit(f"the kernel of {revision} does not build or run here")
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision whose lowbit.c is the 'before' arm")
    parser.add_argument("--rows", default="1,4,8,16,42")
    parser.add_argument("--trials", type=int, default=11)
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8"])
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "bench_lowbit_rows.png"))
    args = parser.parse_args()
    announce()
    torch.set_num_threads(1)
    from openhydra.runtime import lowbit
    from openhydra.runtime.lean_layers import lowbit_of
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    now = lowbit.kernel()
    if now is None:
        raise SystemExit("no low-bit kernel on this machine (needs AVX-512 VNNI or AVX2 and a C compiler)")
    with tempfile.TemporaryDirectory() as scratch:
        before = build_at(args.base, Path(scratch))
        if before.oh_group_rows() != now.oh_group_rows():
            raise SystemExit("the two builds read different weight layouts: not comparable")
        runtime = ShardRuntime(embedded_model_dir(TEST_CACHE_ROOT), dtype=torch.float32,
                               quantization=args.quantization)
        weights = [w for module in runtime.modules.modules() if (w := lowbit_of(module)) is not None]
        arms = {"before": [dataclasses.replace(w, lib=before) for w in weights], "now": weights}
        counts = [int(r) for r in args.rows.split(",")]
        generator = torch.Generator().manual_seed(0)
        inputs = {r: [torch.randn(r, w.in_features, generator=generator) for w in weights] for r in counts}
        for r in counts:
            for a, b, x in zip(arms["before"], arms["now"], inputs[r], strict=True):
                for dtype in (torch.float32, torch.bfloat16):
                    if not torch.equal(a.matmul(x.to(dtype)), b.matmul(x.to(dtype))):
                        raise SystemExit(f"{r} rows, {dtype}: the two kernels' outputs differ")
        print(f"outputs bit-equal at {counts} rows, fp32 and bf16 ({len(weights)} weights, "
              f"{sum(w.in_features * w.out_features for w in weights) / 1e6:.1f} M parameters)", flush=True)
        times: dict[str, list[float]] = {f"{arm}, {r} rows": [] for r in counts for arm in arms}
        for trial in range(args.trials):
            for r in counts:
                for arm in (list(arms) if trial % 2 == 0 else list(reversed(arms))):
                    began = time.perf_counter()
                    for w, x in zip(arms[arm], inputs[r], strict=True):
                        w.matmul(x)
                    times[f"{arm}, {r} rows"].append((time.perf_counter() - began) * 1e3)
            print(f"trial {trial}: " + ", ".join(f"{name} {v[-1]:.2f}" for name, v in times.items()), flush=True)
    print_table(times, metric="median ms per step's matmuls")
    ratios = {}
    print("\n| rows | before ms | now ms | before / now (per-trial median) |\n|---|---|---|---|")
    for r in counts:
        b, n = times[f"before, {r} rows"], times[f"now, {r} rows"]
        ratios[r] = statistics.median(x / y for x, y in zip(b, n, strict=True))
        print(f"| {r} | {statistics.median(b):.2f} | {statistics.median(n):.2f} | {ratios[r]:.3f} |")
    print(f"[base={args.base}, quantization={args.quantization}, trials={args.trials}, isa={lowbit.isa()}]")
    plot(times, counts, ratios, args)


def plot(times: dict[str, list[float]], counts: list[int], ratios: dict[int, float], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    for offset, arm in ((-width / 2, "before"), (width / 2, "now")):
        per_row = [statistics.median(times[f"{arm}, {r} rows"]) / r for r in counts]
        bars = ax.bar([i + offset for i in range(len(counts))], per_row, width,
                      label=f"{arm} ({args.base})" if arm == "before" else arm)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(counts)), [f"{r} rows\n{ratios[r]:.2f}x" for r in counts])
    ax.set_ylabel("ms per activation row (a step's matmuls)")
    ax.set_title(f"low-bit kernel, SmolLM2-135M {args.quantization}, 1 thread")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
