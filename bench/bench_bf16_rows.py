"""Where the bf16 library stops paying: one decoder layer's matmuls at 1 to 256 rows, library against PyTorch.

    OMP_NUM_THREADS=1 python bench/bench_bf16_rows.py [--model-dir DIR] [--trials 5] [--repeats 15]

``hardware.matmul=library`` runs a bf16 Linear on the library (runtime/lowbit.py ``Bf16Weight``) up to a row limit
(``lowbit.bf16_kernel_rows``: ``BF16_KERNEL_ROWS`` on a CPU with bf16 dot products, else none), and PyTorch's bf16
matmul of the weight unpacked for that call beyond. The limit was set from this bench's crossover. This
times the four matmuls of one decoder layer of the model's shapes (q/k/v fused, o, gate/up fused, down; random bf16
weights: the kernels' speed does not depend on the values) on bf16 rows, 1 thread, for each row count, three ways:

- ``library``: ``Bf16Weight.on_library``, the packed weight read by the library;
- ``pytorch, unpacked per call``: what ``Bf16Weight.matmul`` does past the limit (the packed copy unpacked, then
  ``F.linear``);
- ``pytorch, natural layout``: ``F.linear`` on a weight kept in its natural layout (what ``hardware=cpu`` runs; a
  library span does not keep that copy).

Trials interleave the arms and row counts (the order alternates); each value is the median of ``--repeats`` calls,
and the table gives the medians over trials. The crossover is the first row count where the library is slower than
the unpacking PyTorch arm. Prints the machine and the load at start and end; writes a plot.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish_plot, whole_model_bench

ROWS = (1, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128, 192, 256)
ARMS = ("library", "pytorch, unpacked per call", "pytorch, natural layout")


def layer_shapes(model_dir: Path) -> list[tuple[int, int]]:
    """[(out, in)] of a decoder layer's matmuls as the library span fuses them."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads)
    return [((heads + 2 * kv) * head_dim, hidden), (hidden, heads * head_dim), (2 * inter, hidden), (hidden, inter)]


def main() -> None:
    args, model_dir = whole_model_bench(__doc__, repeats=15, plot="docs/img/bench_bf16_rows.png")
    import torch

    from openhydra.runtime import lowbit

    lib = lowbit.kernel()
    if lib is None:
        sys.exit("no low-bit library on this machine (no AVX2/AVX-512 VNNI or no C compiler): nothing to compare")
    shapes = layer_shapes(model_dir)
    limit = lowbit.bf16_kernel_rows(lib)
    print(f"model {model_dir.name}: one layer's matmuls (out, in) {shapes}; library path {lowbit.isa()}; row limit "
          f"in use here: {limit or 'none (every row count on the library)'}", flush=True)
    gen = torch.Generator().manual_seed(0)
    dense = [(torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16) for n, k in shapes]
    packed = [lowbit.Bf16Weight.of(w, lib) for w in dense]
    inputs = {r: [torch.randn(r, k, generator=gen).to(torch.bfloat16) for _, k in shapes] for r in ROWS}
    calls = {
        "library": lambda r: [w.on_library(x) for w, x in zip(packed, inputs[r], strict=True)],
        "pytorch, unpacked per call": lambda r: [torch.nn.functional.linear(x, w.dense()) for w, x in
                                                 zip(packed, inputs[r], strict=True)],
        "pytorch, natural layout": lambda r: [torch.nn.functional.linear(x, w) for w, x in
                                              zip(dense, inputs[r], strict=True)],
    }
    for r in (1, 64):  # the arms compute the same product (bits aside)
        for a, b in zip(calls["library"](r), calls["pytorch, natural layout"](r), strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.02)

    def time_ms(arm: str, rows: int) -> float:
        calls[arm](rows)  # warm
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            calls[arm](rows)
            times.append(time.perf_counter() - began)
        return statistics.median(times) * 1e3

    results: dict[str, dict[int, list[float]]] = {arm: {r: [] for r in ROWS} for arm in ARMS}
    for trial in range(args.trials):
        order = [(r, a) for r in ROWS for a in ARMS]
        for rows, arm in order if trial % 2 == 0 else reversed(order):
            results[arm][rows].append(time_ms(arm, rows))
        print(f"trial {trial + 1}/{args.trials} done", flush=True)
    med = {arm: {r: statistics.median(v) for r, v in by_rows.items()} for arm, by_rows in results.items()}
    print("\n| rows | " + " | ".join(f"{a} ms" for a in ARMS) + " | library ÷ unpacked | library ÷ natural |")
    print("|---|" + "---|" * (len(ARMS) + 2))
    for r in ROWS:
        lib_ms, unpacked, natural = (med[a][r] for a in ARMS)
        print(f"| {r} | {lib_ms:.3f} | {unpacked:.3f} | {natural:.3f} | {lib_ms / unpacked:.2f} | "
              f"{lib_ms / natural:.2f} |")
    crossover = next((r for r in ROWS if med["library"][r] > med["pytorch, unpacked per call"][r]), None)
    print(f"\ncrossover (first row count where the library is slower than PyTorch with the unpacking): {crossover}; "
          f"the row limit in use here: {limit}")
    _plot(med, crossover, limit, model_dir.name, args.plot)
    print(json.dumps({"model": model_dir.name, "isa": lowbit.isa(), "medians_ms": med, "crossover_rows": crossover,
                      "limit_rows": limit}))


def _plot(med: dict, crossover: int | None, limit: int | None, model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in ARMS:
        ax.plot(ROWS, [med[arm][r] for r in ROWS], marker="o", label=arm)
    if limit is not None:
        ax.axvline(limit, color="grey", linestyle="--", label=f"row limit in use: {limit}")
    if crossover is not None:
        ax.axvline(crossover, color="red", linestyle=":", label=f"measured crossover {crossover} rows")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    finish_plot(fig, ax, path, xlabel="activation rows per call", ylabel="ms per layer's matmuls (median)",
                title=f"{model}: a layer's bf16 matmuls, 1 thread (limit: {limit or 'none'})")


if __name__ == "__main__":
    main()
