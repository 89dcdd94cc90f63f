"""The head at a prompt's last position: a slice of the prompt's rows vs a row with a one-position step's strides.

``lm_head(norm(h)[:, -1:])`` hands the head a [1, 1, D] view that keeps [1, S, D]'s strides; in bf16 that sends the
Linear down ``aten::bmm`` with a copy of the whole weight. ``ShardRuntime._output`` now gives the row a one-position
step's strides. This bench times a whole-model prefill (SmolLM2-135M, 1 thread, in process) with the former head
call and the current one, interleaved, for each dtype and prompt length, and checks that their logits are equal.

    OMP_NUM_THREADS=1 python bench/bench_prompt_head.py --trials 6 --lengths 40 400
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

from common import finish_plot  # noqa: E402

from openhydra.runtime.shard import ShardRuntime  # noqa: E402
from openhydra.testing import TEST_CACHE_ROOT  # noqa: E402
from openhydra.testing.machine import announce  # noqa: E402

CURRENT = ShardRuntime._output


def former_output(self: ShardRuntime, h: torch.Tensor, all_logits: bool) -> torch.Tensor:
    """``_output`` before the change: the last row as a slice."""
    with torch.inference_mode():
        h = self.modules.norm(h)
        if not all_logits:
            h = h[:, -1:, :]
        return self.modules.lm_head(h)[0].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--lengths", type=int, nargs="+", default=[40, 400])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_prompt_head.png"))
    args = parser.parse_args()
    announce()
    torch.set_num_threads(1)
    from openhydra.runtime.source import embedded_model_dir

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    rows = []
    for dtype in args.dtypes:
        rt = ShardRuntime(model_dir, dtype=getattr(torch, dtype))
        for n in args.lengths:
            ids = torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(n))
            times: dict[str, list[float]] = {"former": [], "current": []}
            outs: dict[str, torch.Tensor] = {}
            for trial in range(args.trials):
                arms = [("former", former_output), ("current", CURRENT)]
                for name, output in arms if trial % 2 == 0 else arms[::-1]:
                    ShardRuntime._output = output
                    try:
                        started = time.perf_counter()
                        outs[name] = rt.forward(f"{name}{trial}", torch.arange(n), input_ids=ids)
                        times[name].append(time.perf_counter() - started)
                    finally:
                        ShardRuntime._output = CURRENT
                    rt.close_session(f"{name}{trial}")
            former, current = (statistics.median(times[k]) * 1e3 for k in ("former", "current"))
            equal = torch.equal(outs["former"], outs["current"])
            rows.append((dtype, n, former, current, equal))
            print(f"{dtype:9s} {n:4d} prompt tokens: prefill {former:7.1f} ms -> {current:7.1f} ms "
                  f"(current / former {current / former:.3f}); logits equal: {equal}", flush=True)
    print("\n| dtype | prompt tokens | prefill, former (ms) | current (ms) | current ÷ former | logits equal |")
    print("|---|---|---|---|---|---|")
    for dtype, n, former, current, equal in rows:
        print(f"| {dtype} | {n} | {former:.1f} | {current:.1f} | {current / former:.3f} | {equal} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    labels = [f"{d}\n{n} tokens" for d, n, *_ in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[2] for r in rows], 0.4, label="former head call (a slice)")
    ax.bar([i + 0.2 for i in x], [r[3] for r in rows], 0.4, label="current (a one-position row)")
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    finish_plot(fig, ax, args.plot, xlabel="", ylabel="whole-model prefill, ms (median)",
                title="SmolLM2-135M prefill, 1 thread: the head at the prompt's last position")


if __name__ == "__main__":
    main()
