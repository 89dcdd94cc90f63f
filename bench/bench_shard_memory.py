"""Resident memory of a ShardRuntime per span vs the full model, each loaded in a fresh process.

    python bench/bench_shard_memory.py [--model-dir DIR] [--dtype float32|bfloat16] [--splits 0:10,10:20]

Prints, per span: parameter bytes the shard holds, RSS growth (psutil, in a fresh child process per
span) right after loading and after one 8-token step (which touches every weight page), and both as
a fraction of the full model [0, L). MB = 1e6 bytes.
Defaults to the embedded SmolLM2-135M (converted once into the test cache).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp

from openhydra.testing import TEST_CACHE_ROOT


def _measure(model_dir: str, start: int, end: int | None, dtype_name: str, queue: mp.Queue) -> None:
    import gc

    import psutil
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.shard_layers import load_text_config

    # Import the modeling code before the baseline, so the delta is weights (+ one step's activations).
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(load_text_config(model_dir))
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    rt = ShardRuntime(model_dir, start, end, dtype=getattr(torch, dtype_name))
    loaded = proc.memory_info().rss
    # One 8-token step touches every weight page (fp32 tensors may be zero-copy views of the mmapped file).
    positions = torch.arange(8)
    if rt.is_first:
        rt.forward("bench", positions, input_ids=torch.arange(100, 108))
    else:
        rt.forward("bench", positions, hidden_states=torch.randn(8, rt.hidden_size))
    gc.collect()
    after = proc.memory_info().rss
    queue.put(
        {
            "span": f"[{rt.start},{rt.end})",
            "param_bytes": rt.loaded_bytes,
            "rss_after_load": loaded - before,
            "rss_delta": after - before,
        }
    )


def measure(model_dir: str, start: int, end: int | None, dtype_name: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(model_dir, start, end, dtype_name, queue))
    proc.start()
    result = queue.get(timeout=300)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--splits", default="0:10,10:20,20:30")
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    model_dir = args.model_dir
    if model_dir is None:
        from openhydra.runtime.source import embedded_model_dir

        cache = TEST_CACHE_ROOT
        model_dir = str(embedded_model_dir(cache))
    full = measure(model_dir, 0, None, args.dtype)
    rows = [full]
    for part in args.splits.split(","):
        a, b = (int(x) for x in part.split(":"))
        rows.append(measure(model_dir, a, b, args.dtype))
    print(f"model {model_dir} dtype {args.dtype}")
    print(f"{'span':>10} {'param MB':>9} {'RSS load':>8} {'RSS step':>8} {'params/full':>11} {'RSS/full':>9}")
    for row in rows:
        print(
            f"{row['span']:>10} {row['param_bytes'] / 1e6:9.1f} {row['rss_after_load'] / 1e6:8.1f} "
            f"{row['rss_delta'] / 1e6:8.1f} "
            f"{row['param_bytes'] / full['param_bytes']:11.3f} {row['rss_delta'] / full['rss_delta']:9.3f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
