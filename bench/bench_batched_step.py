"""A continuous-batching decode step in process: K/V appended in the attention library call, or through ``update``.

The lean batched step (runtime/lean_layers.py ``LeanLlamaLayer.step_rows``) on the low-bit kernel appends each row's
new key and value to its session's cache and attends, per layer. Two arms, interleaved per trial, 1 thread, on the
embedded SmolLM2-135M (``--quantization``, fp32):
- ``update``: each row's ``AppendLayer.update``, then ``attention_rows`` (what the step did before; still its path
  where a row's cache is another kind of layer or two rows share one);
- ``library``: ``append_attention_rows``, the appends inside the attention call.
Per trial and arm: ``--rows`` sessions prefilled with prompts of ``--prompt`` + r tokens, then ``--steps`` batched
steps (``forward_batch``, as the batcher runs them); the median step. Then a lone session's ``--steps`` decode steps
(``ShardRuntime.forward``; the lean step appends in the library call too, a call of one row), the median step. The
arms' logits must be bit-equal at every step. "rows x lone step ÷ batched step": what batching gives at this row
count in steady decode (prefill not counted).

    OMP_NUM_THREADS=1 python bench/bench_batched_step.py [--rows 8] [--steps 32] [--trials 7]
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
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8"])
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parent.parent / "docs" / "img"
                                              / "bench_batched_step.png"))
    args = parser.parse_args()
    announce()
    torch.set_num_threads(1)
    from openhydra.runtime import lean_layers
    from openhydra.runtime.batching import _Pending, forward_batch
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    runtime = ShardRuntime(embedded_model_dir(TEST_CACHE_ROOT), dtype=torch.float32, quantization=args.quantization)
    if runtime._lean is None or lean_layers.lowbit.kernel() is None:
        raise SystemExit("needs the lean step on the low-bit kernel (AVX-512 VNNI or AVX2 and a C compiler)")
    in_library = lean_layers.appends_in_library
    arms = {"update": lambda layers: False, "library": in_library}

    def batched(arm: str, trial: int) -> tuple[float, list[torch.Tensor]]:
        lean_layers.appends_in_library = arms[arm]
        names = [f"{arm}{trial}-{r}" for r in range(args.rows)]
        lengths = [args.prompt + r for r in range(args.rows)]
        for name, n in zip(names, lengths, strict=True):
            runtime.forward(name, torch.arange(n), input_ids=torch.arange(100, 100 + n))
        times, logits = [], []
        try:
            for step in range(args.steps):
                items = [_Pending(name, n + step, torch.tensor([200 + r + step]), None, False)
                         for r, (name, n) in enumerate(zip(names, lengths, strict=True))]
                began = time.perf_counter()
                out = forward_batch(runtime, items, rows=args.rows)
                times.append(time.perf_counter() - began)
                if failed := [o for o in out if isinstance(o, BaseException)]:
                    raise failed[0]
                logits.append(out)
        finally:
            lean_layers.appends_in_library = in_library
            for name in names:
                runtime.close_session(name)
        return statistics.median(times) * 1e3, logits

    def lone(arm: str, trial: int) -> tuple[float, list[torch.Tensor]]:
        lean_layers.appends_in_library = arms[arm]
        name, n = f"lone-{arm}{trial}", args.prompt
        try:
            out = runtime.forward(name, torch.arange(n), input_ids=torch.arange(100, 100 + n))
            times, logits = [], []
            for step in range(args.steps):
                token = torch.tensor([int(out.argmax())])
                began = time.perf_counter()
                out = runtime.forward(name, torch.tensor([n + step]), input_ids=token)
                times.append(time.perf_counter() - began)
                logits.append(out)
        finally:
            lean_layers.appends_in_library = in_library
            runtime.close_session(name)
        return statistics.median(times) * 1e3, logits

    rates: dict[str, list[float]] = {"update": [], "library": [], "lone step, update": [], "lone step, library": []}
    for trial in range(args.trials):
        outputs = {}
        for arm in (["update", "library"] if trial % 2 == 0 else ["library", "update"]):
            rates[arm].append((timed := batched(arm, trial))[0])
            outputs[arm] = timed[1]
            rates[f"lone step, {arm}"].append((timed := lone(arm, trial))[0])
            outputs[f"lone {arm}"] = timed[1]
        if not all(_equal(a, b) for a, b in zip(outputs["update"], outputs["library"], strict=True)):
            raise SystemExit(f"trial {trial}: the two arms' batched logits differ")
        if not all(_equal(a, b) for a, b in zip(outputs["lone update"], outputs["lone library"], strict=True)):
            raise SystemExit(f"trial {trial}: the two arms' lone-step logits differ")
        print(f"trial {trial}: batched step of {args.rows}: update {rates['update'][-1]:.2f} ms, library "
              f"{rates['library'][-1]:.2f} ms; lone step: update {rates['lone step, update'][-1]:.2f} ms, library "
              f"{rates['lone step, library'][-1]:.2f} ms", flush=True)
    print_table(rates, metric="median ms per step")
    update, library, lone_update, lone_library = (statistics.median(v) for v in rates.values())
    per_trial = statistics.median(u / v for u, v in zip(rates["update"], rates["library"], strict=True))
    lone_trial = statistics.median(u / v for u, v in zip(rates["lone step, update"], rates["lone step, library"],
                                                         strict=True))
    print(f"\nbatched: update / library = {update / library:.3f} (per-trial {per_trial:.3f}); lone step: update / "
          f"library = {lone_update / lone_library:.3f} (per-trial {lone_trial:.3f}); {args.rows} x lone step ÷ "
          f"batched step: {args.rows * lone_update / update:.2f} (update), {args.rows * lone_library / library:.2f} "
          f"(library); logits bit-equal  [rows={args.rows}, steps={args.steps}, prompt={args.prompt}, "
          f"quantization={args.quantization}, trials={args.trials}]")
    plot_trials(rates, f"batched step of {args.rows}: update / library = {update / library:.2f}", args.plot,
                ylabel="ms per step")


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return all(_equal(x, y) for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    sys.exit(main())
