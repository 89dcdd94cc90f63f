"""Quantization on the CPU: memory, decode tok/s and agreement with fp32 for fp32 / bf16 / int8 / NF4.

    OMP_NUM_THREADS=1 python bench/bench_quant.py [--model-dir DIR] [--trials 5] [--tokens 24]

All four arms are ShardRuntimes of the whole model (SmolLM2-135M by default) in one process, 1
thread, decoding the same prompt greedily, interleaved (run_interleaved alternates the order).
Memory: parameter bytes the runtime holds, and RSS growth after loading + one step, measured in a
fresh child process per arm. Agreement: teacher-forced top-1 (the fp32 greedy continuation fed to
each arm; the share of positions whose argmax equals fp32's). int8 = weight-only int8 with bf16
activations; int4 = 4-bit groups of 32 (runtime/quant_cpu.py) with fp32 activations outside the kernel;
nf4 = bitsandbytes NF4 with bf16 compute.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import greedy_tok_s, medians, plot_trials, print_table, run_interleaved, whole_model_bench

ARMS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
        "int4": ("float32", "int4"), "nf4": ("bfloat16", "nf4")}
PROMPT = "The capital of France is Paris. The capital of Germany is"


def _rss_child(model_dir: str, dtype: str, quantization: str, queue: mp.Queue) -> None:
    import gc

    import psutil
    import torch

    torch.set_num_threads(1)
    from openhydra.runtime.quantize import require_method  # noqa: F401 - import cost outside the delta
    from openhydra.runtime.shard import ShardRuntime

    if quantization == "nf4":
        import bitsandbytes  # noqa: F401
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    rt = ShardRuntime(model_dir, dtype=getattr(torch, dtype), quantization=quantization)
    rt.forward("m", torch.arange(8), input_ids=torch.arange(100, 108))
    gc.collect()
    queue.put({"param_bytes": rt.loaded_bytes, "rss_delta": proc.memory_info().rss - before})


def rss_of(model_dir: str, dtype: str, quantization: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_rss_child, args=(model_dir, dtype, quantization, queue))
    child.start()
    result = queue.get(timeout=600)
    child.join()
    return result


def main() -> None:
    args, model_dir = whole_model_bench(__doc__, tokens=24, plot="docs/img/bench_quant.png")
    import torch
    from transformers import AutoTokenizer

    from openhydra.runtime.local_pipeline import greedy_generate
    from openhydra.runtime.shard import ShardRuntime

    memory = {name: rss_of(str(model_dir), dtype, q) for name, (dtype, q) in ARMS.items()}
    runtimes = {name: ShardRuntime(model_dir, dtype=getattr(torch, dtype), quantization=q)
                for name, (dtype, q) in ARMS.items()}
    prompt = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"])

    continuation = greedy_generate([runtimes["fp32"]], prompt, 32, session_id="ref")
    seq = torch.cat([prompt, torch.tensor(continuation)])
    picks = {}
    for name, rt in runtimes.items():
        picks[name] = rt.forward("tf", torch.arange(seq.numel()), input_ids=seq, all_logits=True)[prompt.numel() - 1:]
        picks[name] = picks[name].argmax(-1)
        rt.close_session("tf")
    agreement = {name: (picks[name] == picks["fp32"]).float().mean().item() for name in runtimes}
    for rt in runtimes.values():
        rt.close_session("ref")

    arms = {name: partial(greedy_tok_s, rt, prompt, args.tokens, warm=True) for name, rt in runtimes.items()}
    rates = run_interleaved(arms, args.trials)
    print_table(rates, "median tok/s (prefill + decode of the tokens)")
    med = medians(rates)
    print("\n| arm | params MB | RSS growth MB | top-1 agreement with fp32 | tok/s ÷ bf16 |\n|---|---|---|---|---|")
    for name in runtimes:
        m = memory[name]
        print(f"| {name} | {m['param_bytes'] / 1e6:.0f} | {m['rss_delta'] / 1e6:.0f} | {agreement[name]:.3f} | "
              f"{med[name] / med['bf16']:.2f} |")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_trials(rates, f"{model_dir.name}: quantization, 1 thread (interleaved)", args.plot, ylabel="tok/s")
    print(json.dumps({"medians": med, "memory": memory, "agreement": agreement}))


if __name__ == "__main__":
    main()
