"""bf16 against fp32 on this CPU, on a real model: does hardware.dtype=auto pick the faster one?

    OMP_NUM_THREADS=1 python bench/bench_cpu_dtype.py [--model-dir smollm2|tiny|DIR] [--trials 5]
        [--prompt 128] [--tokens 16] [--quantization none|int8|int4]

In one process and one thread, interleaved trial by trial (the order alternates): prefill of a
``--prompt``-token prompt (tokens/s) and greedy decode of ``--tokens`` tokens (tokens/s, prefill excluded)
by a whole-model ShardRuntime in float32 and in bfloat16. Prints the automatic choice
(openhydra/hardware/dtype.py, with its own matmul measurement), the medians side by side with the
bf16/fp32 ratios, and the load average before and after. ``--quantization int4`` (or int8) compares the two
dtypes of the rest of the layer under CPU int4/int8 weights (the kernels compute in bf16 either way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_model_dir

from openhydra.testing.machine import announce, load_average

DTYPES = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="smollm2")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result

    import torch

    torch.set_num_threads(1)
    from openhydra.hardware.dtype import cpu_dtype_choice
    from openhydra.runtime.shard import ShardRuntime

    print(f"load average before: {load_average()}")
    choice = cpu_dtype_choice("auto", 1, args.quantization)
    print(f"hardware.dtype=auto here -> {choice.line()}")
    model_dir = Path(bench_model_dir(args.model_dir))
    runtimes = {d: ShardRuntime(model_dir, dtype=getattr(torch, d), quantization=args.quantization) for d in DTYPES}
    prompt = torch.arange(100, 100 + args.prompt)  # [S] token ids

    def run(dtype: str) -> tuple[float, float]:
        rt = runtimes[dtype]
        started = time.perf_counter()
        logits = rt.forward("b", torch.arange(prompt.numel()), input_ids=prompt)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(args.tokens):
            token = logits[-1:].argmax(-1)  # [1]
            logits = rt.forward("b", torch.tensor([prompt.numel() + i]), input_ids=token)
        decode_s = time.perf_counter() - started
        rt.close_session("b")
        return prompt.numel() / prefill_s, args.tokens / decode_s

    run("float32"), run("bfloat16")  # warm up both
    rates: dict[str, dict[str, list[float]]] = {d: {"prefill": [], "decode": []} for d in DTYPES}
    for trial in range(args.trials):
        for dtype in DTYPES if trial % 2 == 0 else reversed(DTYPES):
            prefill, decode = run(dtype)
            rates[dtype]["prefill"].append(prefill)
            rates[dtype]["decode"].append(decode)
            print(f"trial {trial} {dtype:8s} prefill {prefill:8.1f} tok/s  decode {decode:6.2f} tok/s", flush=True)

    med = {d: {k: statistics.median(v) for k, v in rates[d].items()} for d in DTYPES}
    print(f"\n{model_dir.name}, quantization={args.quantization}, 1 thread, prompt {args.prompt} tokens, decode "
          f"{args.tokens} tokens, medians of {args.trials}")
    print("| phase | fp32 tok/s | bf16 tok/s | bf16 / fp32 speed |\n|---|---|---|---|")
    for phase in ("prefill", "decode"):
        f32, b16 = med["float32"][phase], med["bfloat16"][phase]
        print(f"| {phase} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f} |")
    print(f"load average after: {load_average()}")
    print(json.dumps({"choice": choice.dtype, "reason": choice.reason, "medians_tok_s": med}))


if __name__ == "__main__":
    main()
