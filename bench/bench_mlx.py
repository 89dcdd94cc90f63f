"""MLX backend on this CPU against the PyTorch runtime: decode tok/s and greedy agreement, SmolLM2.

    OMP_NUM_THREADS=1 python bench/bench_mlx.py [--model-dir DIR] [--trials 5] [--tokens 32]

The whole model as one span per arm, all arms in one process, interleaved trial by trial (run_interleaved alternates
the order): PyTorch ``ShardRuntime`` and ``MlxShardRuntime`` (mlx[cpu] on Linux; Apple's GPU on a Mac), each in
fp32 and bf16. An arm's rate is ``--tokens`` greedy tokens after the prompt's prefill, divided by the time of both
(the prompt is 13 tokens). Agreement: the share of the ``--tokens`` greedy tokens equal to PyTorch fp32's. torch
runs one thread; MLX's CPU backend picks its own threads (it has no thread setting), so the comparison is not
thread for thread: the banner prints the cores. Writes a plot (``--plot``).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import greedy_tok_s, medians, plot_trials, print_table, run_interleaved, whole_model_bench

PROMPT = "The capital of France is Paris. The capital of Germany is"


def main() -> None:
    args, model_dir = whole_model_bench(__doc__, tokens=32, plot="docs/img/bench_mlx.png")
    import torch
    from transformers import AutoTokenizer

    from openhydra.runtime.local_pipeline import greedy_generate
    from openhydra.runtime.mlx_backend import MlxShardRuntime, mlx_import_error
    from openhydra.runtime.shard import ShardRuntime

    if (reason := mlx_import_error()) is not None:
        raise SystemExit(f"bench_mlx: MLX is not importable here: {reason}")
    runtimes = {
        "pytorch fp32": ShardRuntime(model_dir, dtype=torch.float32),
        "pytorch bf16": ShardRuntime(model_dir, dtype=torch.bfloat16),
        "mlx fp32": MlxShardRuntime(model_dir, dtype="float32"),
        "mlx bf16": MlxShardRuntime(model_dir, dtype="bfloat16"),
    }
    prompt = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"])
    tokens = {}
    for name, rt in runtimes.items():
        tokens[name] = greedy_generate([rt], prompt, args.tokens, session_id="ref")
        rt.close_session("ref")
    reference = tokens["pytorch fp32"]
    agreement = {name: sum(a == b for a, b in zip(t, reference, strict=True)) / len(reference)
                 for name, t in tokens.items()}

    rates = run_interleaved({name: partial(greedy_tok_s, rt, prompt, args.tokens) for name, rt in runtimes.items()},
                            args.trials)
    print_table(rates, "median tok/s (13-token prefill + decode)")
    med = medians(rates)
    print("\n| arm | tok/s ÷ pytorch fp32 | greedy tokens equal to pytorch fp32's |\n|---|---|---|")
    for name in runtimes:
        print(f"| {name} | {med[name] / med['pytorch fp32']:.2f} | {agreement[name]:.3f} |")
    plot_trials(rates, f"SmolLM2-135M, {args.tokens} greedy tokens: MLX (CPU) vs PyTorch", args.plot)


if __name__ == "__main__":
    main()
