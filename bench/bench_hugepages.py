"""Decode step with the low-bit kernel's packed weights in 2 MiB pages (runtime/hugepages.py) against 4 KiB pages.

    OMP_NUM_THREADS=1 python bench/bench_hugepages.py [--quantization int4] [--trials 9] [--steps 48]
    OMP_NUM_THREADS=1 python bench/bench_hugepages.py --api [--hardware cpu_int4] [--trials 9] [--tokens 64]

Two ShardRuntimes of the embedded SmolLM2 (all 30 layers and the head) in one process, fp32 activations on the low-bit
kernel, 1 thread: one as the node loads it (packed weights carved from ``MADV_HUGEPAGE`` chunks), one loaded with
``OPENHYDRA_HUGEPAGES=0`` (plain torch allocations: the same bytes in 4 KiB pages). Each trial decodes ``--steps``
greedy tokens on each arm after the same 42-token prompt, arms alternating which goes first; the medians of the
per-trial median step times and their ratio are printed with the machine's load and the process's AnonHugePages,
beside a plot. Both arms must give the same tokens (checked).

``--api``: the same comparison as users see it: two node processes (``hardware=cpu_int4``, 1 thread), one started with
``OPENHYDRA_HUGEPAGES=0``, driven through the streaming OpenAI API with the same prompt and length, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import medians, plot_trials, print_table, run_interleaved, step_ab  # noqa: E402


def through_the_api(args: argparse.Namespace) -> None:
    import tempfile

    from bench_api_vs_generate import api_decode_rate

    from openhydra.runtime import hugepages
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT
    from openhydra.testing.processes import NodeProcess, start_all

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="bench-hugepages-"))
    common = ["model=local", f"model.path={model_dir}", f"hardware={args.hardware}", "api.rate_limit_requests=100000"]
    nodes = {name: NodeProcess([*common, f"node.data_dir={work / str(i)}"], threads=1, env={hugepages.ENV: value})
             for i, (name, value) in enumerate((("2 MiB pages", "1"), ("4 KiB pages", "0")))}
    try:
        start_all(list(nodes.values()))
        for node in nodes.values():
            api_decode_rate(node.url, model_dir.name, messages, 8)  # warm-up
        rates = run_interleaved({name: (lambda url=node.url: api_decode_rate(url, model_dir.name, messages,
                                                                             args.tokens))
                                 for name, node in nodes.items()}, args.trials)
    finally:
        for node in nodes.values():
            node.stop()
    print_table(rates)
    m = medians(rates)
    names = list(nodes)
    per_trial = statistics.median(a / b for a, b in zip(rates[names[0]], rates[names[1]], strict=True))
    print(f"\n2 MiB / 4 KiB pages = {m[names[0]] / m[names[1]]:.3f} (per-trial median {per_trial:.3f}); "
          f"[hardware={args.hardware}, 1 thread per node, tokens={args.tokens}, trials={args.trials}]")
    plot_trials(rates, f"SmolLM2 {args.hardware} through the API: 2 MiB / 4 KiB pages = "
                       f"{m[names[0]] / m[names[1]]:.2f}", args.plot)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8"])
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--api", action="store_true", help="two node processes through the API instead")
    parser.add_argument("--hardware", default="cpu_int4", help="--api: the nodes' hardware= preset")
    parser.add_argument("--tokens", type=int, default=64, help="--api: tokens per request")
    parser.add_argument("--plot", default=None, help="PNG path (default docs/img/bench_hugepages[_api].png)")
    args = parser.parse_args()
    args.plot = args.plot or str(REPO / "docs" / "img" / f"bench_hugepages{'_api' if args.api else ''}.png")
    from openhydra.testing.machine import announce

    announce()
    if args.api:
        through_the_api(args)
        return
    torch.set_num_threads(1)
    from openhydra.runtime import hugepages, lowbit
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    if lowbit.kernel() is None:
        sys.exit("no low-bit kernel on this machine: nothing to compare")
    if not hugepages.available():
        sys.exit("this OS offers no transparent huge pages: nothing to compare")
    model_dir = embedded_model_dir(TEST_CACHE_ROOT)

    def anon_huge_mib() -> float:
        return hugepages.anon_huge_bytes() / (1 << 20)

    before = anon_huge_mib()
    huge = ShardRuntime(model_dir, dtype=torch.float32, quantization=args.quantization)
    in_huge = anon_huge_mib() - before
    os.environ[hugepages.ENV] = "0"
    try:
        plain = ShardRuntime(model_dir, dtype=torch.float32, quantization=args.quantization)
    finally:
        del os.environ[hugepages.ENV]
    grew = anon_huge_mib() - before - in_huge
    thp = hugepages.THP_ENABLED.read_text().strip()
    print(f"low-bit kernel: {lowbit.isa()}; {args.quantization}, fp32, 1 thread; AnonHugePages +{in_huge:.0f} MiB "
          f"loading the huge-page arm, +{grew:.0f} MiB loading the other; THP: {thp}")
    names = ("2 MiB pages", "4 KiB pages")
    rates, m, ratio = step_ab({names[0]: huge, names[1]: plain}, torch.arange(100, 142), args.steps, args.trials)
    per_trial = 1 / ratio
    print(f"\nspeed-up {m[names[1]] / m[names[0]]:.3f}x (per-trial median {per_trial:.3f}x): "
          f"{m[names[1]] - m[names[0]]:.2f} ms per step; same 16 greedy tokens in both arms")
    plot_trials(rates, f"SmolLM2 {args.quantization} decode step: weights in 2 MiB vs 4 KiB pages", args.plot,
                ylabel="ms per step")


if __name__ == "__main__":
    main()
