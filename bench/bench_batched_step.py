"""A continuous-batching decode step in process: K/V appended in the attention library call, or through ``update``.

The lean batched step (runtime/lean_layers.py ``LeanLlamaLayer.step_rows``) on the low-bit kernel appends each row's
new key and value to its session's cache and attends, per layer. Two arms, interleaved per trial, 1 thread, on the
embedded SmolLM2-135M (``--quantization``, fp32):
- ``update``: each row's ``AppendLayer.update``, then ``attention_rows`` (what the step did before; still its path
  where a row's cache is another kind of layer or two rows share one);
- ``library``: ``append_attention_rows``, the appends inside the attention call.
Per trial and arm: ``--rows`` sessions prefilled with prompts of ``--prompt`` + r tokens, then ``--steps`` batched
steps (``forward_batch``, as the batcher runs them); the median step. The arms' logits must be bit-equal at every
step. A lone session's decode step (``ShardRuntime.forward``) is timed in the same trials, for "rows x lone step ÷
batched step": what batching gives at this row count in steady decode (prefill not counted).

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

    def lone(trial: int) -> float:
        name, n = f"lone{trial}", args.prompt
        out = runtime.forward(name, torch.arange(n), input_ids=torch.arange(100, 100 + n))
        times = []
        for step in range(args.steps):
            token = torch.tensor([int(out.argmax())])
            began = time.perf_counter()
            out = runtime.forward(name, torch.tensor([n + step]), input_ids=token)
            times.append(time.perf_counter() - began)
        runtime.close_session(name)
        return statistics.median(times) * 1e3

    rates: dict[str, list[float]] = {"update": [], "library": [], "lone step": []}
    for trial in range(args.trials):
        outputs = {}
        for arm in (["update", "library"] if trial % 2 == 0 else ["library", "update"]):
            rates[arm].append((timed := batched(arm, trial))[0])
            outputs[arm] = timed[1]
        rates["lone step"].append(lone(trial))
        if not all(_equal(a, b) for a, b in zip(outputs["update"], outputs["library"], strict=True)):
            raise SystemExit(f"trial {trial}: the two arms' logits differ")
        print(f"trial {trial}: batched step of {args.rows}: update {rates['update'][-1]:.2f} ms, library "
              f"{rates['library'][-1]:.2f} ms; lone step {rates['lone step'][-1]:.2f} ms", flush=True)
    print_table(rates, metric="median ms per step")
    update, library, single = (statistics.median(rates[k]) for k in ("update", "library", "lone step"))
    per_trial = statistics.median(u / v for u, v in zip(rates["update"], rates["library"], strict=True))
    print(f"\nupdate / library = {update / library:.3f} (per-trial {per_trial:.3f}); {args.rows} x lone step ÷ "
          f"batched step: {args.rows * single / update:.2f} (update), {args.rows * single / library:.2f} (library); "
          f"logits bit-equal  [rows={args.rows}, steps={args.steps}, prompt={args.prompt}, "
          f"quantization={args.quantization}, trials={args.trials}]")
    plot_trials(rates, f"batched step of {args.rows}: update / library = {update / library:.2f}", args.plot,
                ylabel="ms per step")


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return all(_equal(x, y) for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    sys.exit(main())
