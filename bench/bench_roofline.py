"""Decode against the memory-bandwidth roofline: tok/s x bytes read per token / measured bandwidth.

    OMP_NUM_THREADS=1 python bench/bench_roofline.py [--model-dir DIR] [--trials 5] [--tokens 32]

Single-stream decode is memory-bound: each token reads every weight of the layers and the head once.
In one process and one thread, interleaved trial by trial, this script measures
- decode tok/s of a ShardRuntime (the whole model; prefill excluded) for fp32, bf16 (PyTorch's matmul, and on the
  low-bit library: hardware.matmul=library), int8 and int4;
- bytes read per token: the runtime's parameter bytes (the embedding table counts once; when the head
  is tied it is read whole by the lm_head matmul, while the embedding lookup reads one row) plus the
  K/V cache read at the mean decode position;
- memory bandwidth with a copy benchmark (``dst.copy_(src)`` on 256 MB tensors, counted as read + write
  bytes, STREAM's convention), on the same thread;
and reports the fraction of the roofline: tok/s x bytes per token / bandwidth (1.0 = the physical limit).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_trials, run_interleaved, whole_model_bench

ARMS = {"fp32": ("float32", "none", "pytorch"), "bf16": ("bfloat16", "none", "pytorch"),
        "bf16 library": ("bfloat16", "none", "library"), "int8": ("bfloat16", "int8", "pytorch"),
        "int4": ("float32", "int4", "pytorch")}


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write), the best of ``repeats``."""
    import torch

    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / best


def kv_bytes_per_token(rt, position: int) -> int:
    """K and V of every layer for ``position`` cached tokens, read once by a decode step."""
    cfg = rt.shard_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = 2 * cfg.num_key_value_heads * head_dim * rt.dtype.itemsize * cfg.num_hidden_layers
    return per_position * position


def main() -> None:
    args, model_dir = whole_model_bench(__doc__, tokens=32, plot="docs/img/bench_roofline.png")
    import torch

    from openhydra.runtime.shard import ShardRuntime

    runtimes = {name: ShardRuntime(model_dir, dtype=getattr(torch, d), quantization=q, matmul=m)
                for name, (d, q, m) in ARMS.items()}
    prompt = torch.arange(100, 116)  # 16 prompt tokens

    def decode(name: str):
        def arm() -> float:
            rt = runtimes[name]
            logits = rt.forward("r", torch.arange(prompt.numel()), input_ids=prompt)
            started = time.perf_counter()
            for i in range(args.tokens):
                token = logits.argmax(-1)  # [1]
                logits = rt.forward("r", torch.tensor([prompt.numel() + i]), input_ids=token)
            elapsed = time.perf_counter() - started
            rt.close_session("r")
            return args.tokens / elapsed

        return arm

    arms = {name: decode(name) for name in runtimes}
    arms["copy GB/s"] = lambda: copy_bandwidth() / 1e9
    rates = run_interleaved(arms, args.trials, unit="")
    bandwidth = statistics.median(rates["copy GB/s"]) * 1e9
    mean_position = prompt.numel() + args.tokens / 2
    print(f"\nmemory bandwidth (copy, 1 thread): {bandwidth / 1e9:.1f} GB/s (median of {args.trials})")
    print("\n| arm | decode tok/s | MB read per token | ceiling tok/s | fraction of roofline |\n|---|---|---|---|---|")
    report = {"bandwidth_gb_s": bandwidth / 1e9, "arms": {}}
    for name, rt in runtimes.items():
        per_token = rt.loaded_bytes + kv_bytes_per_token(rt, int(mean_position))
        tok_s = statistics.median(rates[name])
        fraction = tok_s * per_token / bandwidth
        print(f"| {name} | {tok_s:.2f} | {per_token / 1e6:.1f} | {bandwidth / per_token:.1f} | {fraction:.2f} |")
        report["arms"][name] = {"tok_s": tok_s, "bytes_per_token": per_token, "fraction": fraction}
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_trials(rates, f"{model_dir.name}: decode tok/s and copy GB/s, 1 thread (interleaved)", args.plot,
                ylabel="tok/s  |  GB/s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
