"""Where one decode step of a CPU node goes: ``ShardRuntime.forward`` timed alone, then a torch profile of it.

    OMP_NUM_THREADS=1 python bench/profile_decode_step.py [--quantization int4] [--dtype float32] [--steps 64]
        [--prompt 42] [--verify 5] [--batch 8]

The whole embedded SmolLM2 in one ShardRuntime (no network, no API), 1 thread: a ``--prompt``-token prompt (its
prefill timed, the median of 3), then ``--steps`` greedy decode steps, each timed (median printed), then
``--verify``-position speculative verifies (``all_logits``: what a peer runs for a verify; each rolled back, the
median of 15), ``--batch`` sessions' decode steps as continuous batching runs them (``forward_batch``, max_batch 8),
through the lean layers and through transformers' layers with the rows attention, alternated (same bits, tested;
median per batched step), then 10 more decode steps
under ``torch.profiler`` with the ops sorted by their own CPU time: how much of a step the matmul kernels take
against the small ops around them (the low-bit kernel, runtime/lowbit.py, is a ctypes call the profiler does not
list). ``OPENHYDRA_LOWBIT=0`` runs PyTorch's int4/int8 kernels instead.
docs/benchmarks.md, "One node vs llama.cpp".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from openhydra.testing.machine import announce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=42, help="prompt tokens")
    parser.add_argument("--verify", type=int, default=5, help="positions per timed verify (0: none)")
    parser.add_argument("--batch", type=int, default=0, help="sessions per timed batched step (0: none)")
    args = parser.parse_args()
    announce()
    torch.set_num_threads(1)
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    rt = ShardRuntime(embedded_model_dir(TEST_CACHE_ROOT), dtype=getattr(torch, args.dtype),
                      quantization=args.quantization)
    prompt = torch.arange(100, 100 + args.prompt)
    prefill = []
    for attempt in range(3):
        began = time.perf_counter()
        out = rt.forward(f"p{attempt}", torch.arange(prompt.numel()), input_ids=prompt)
        prefill.append(time.perf_counter() - began)
        rt.close_session(f"p{attempt}")
    print(f"prefill of {args.prompt} tokens: median {statistics.median(prefill) * 1e3:.1f} ms of 3", flush=True)
    out = rt.forward("s", torch.arange(prompt.numel()), input_ids=prompt)
    position, times = prompt.numel(), []
    for _ in range(args.steps):
        token = torch.tensor([int(out.argmax())])
        began = time.perf_counter()
        out = rt.forward("s", torch.tensor([position]), input_ids=token)
        times.append(time.perf_counter() - began)
        position += 1
    print(f"quantization={args.quantization} dtype={args.dtype}: median {statistics.median(times) * 1e3:.2f} ms "
          f"per decode step over {args.steps} (p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.2f})", flush=True)
    if args.verify > 1:
        drafts, verifies = torch.arange(200, 200 + args.verify), []
        for _ in range(15):
            began = time.perf_counter()
            rt.forward("s", torch.arange(position, position + args.verify), input_ids=drafts, all_logits=True)
            verifies.append(time.perf_counter() - began)
            rt.truncate_session("s", position)
        print(f"verify of {args.verify} positions: median {statistics.median(verifies) * 1e3:.1f} ms of 15 "
              f"({statistics.median(verifies) / statistics.median(times):.2f} decode steps)", flush=True)
    if args.batch:
        from openhydra.runtime.batching import _Pending, forward_batch

        lean, per_arm = rt._lean, {"lean layers": [], "transformers' layers": []}
        for i in range(args.batch):
            rt.forward(f"b{i}", torch.arange(prompt.numel() + i), input_ids=torch.arange(100, 100 + prompt.numel() + i))
        at = [prompt.numel() + i for i in range(args.batch)]
        for _ in range(3):
            for arm in per_arm:
                rt._lean = lean if arm == "lean layers" else None  # None: the layers' own forward (lean_usable)
                for _ in range(16):
                    items = [_Pending(f"b{i}", at[i], torch.tensor([200 + i]), None, False) for i in range(args.batch)]
                    began = time.perf_counter()
                    forward_batch(rt, items, rows=8)
                    per_arm[arm].append(time.perf_counter() - began)
                    at = [a + 1 for a in at]
        rt._lean = lean
        print(f"batched step of {args.batch} sessions: " + ", ".join(
            f"{arm} {statistics.median(v) * 1e3:.1f} ms" for arm, v in per_arm.items()), flush=True)
    with torch.profiler.profile() as prof:
        for _ in range(10):
            out = rt.forward("s", torch.tensor([position]), input_ids=torch.tensor([int(out.argmax())]))
            position += 1
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
