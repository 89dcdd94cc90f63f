"""One node's streaming decode with its steps run back to back (serving.decode_ahead=2, the default) against the
old lockstep (decode_ahead=0: the event loop asks for each step once it has handled the last).

Two real node processes on the embedded SmolLM2-135M, identical but for ``serving.decode_ahead``, 1 torch thread
each, driven through the streaming OpenAI API with the same prompt and length; trials interleaved (the first arm
alternates), medians and the median of per-trial ratios printed with the machine's load.

    OMP_NUM_THREADS=1 python bench/bench_token_stream.py --hardware cpu_int4 --trials 9 --tokens 64 [--before COMMIT]

``--before COMMIT`` adds a third arm: the same node run from a git worktree of an earlier commit (the engine before
router/token_stream.py asked for every step through ``run_in_executor``, which the lockstep arm only imitates).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_api_vs_generate import api_decode_rate  # noqa: E402
from common import medians, plot_trials, print_table, run_interleaved, worktree  # noqa: E402

ARMS = {"lockstep (decode_ahead=0)": 0, "back to back (decode_ahead=2)": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default="cpu_int4", help="the hardware= preset of both nodes")
    parser.add_argument("--trials", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--before", default=None, metavar="COMMIT",
                        help="also run the node of an earlier commit (a git worktree of it), a third arm")
    parser.add_argument("--plot", default=None, help="PNG path (default docs/img/bench_token_stream_<hw>.png)")
    args = parser.parse_args()
    from openhydra.testing import TEST_CACHE_ROOT
    from openhydra.testing.machine import announce
    from openhydra.testing.processes import NodeProcess, start_all

    announce()
    from openhydra.runtime.source import embedded_model_dir

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    model = model_dir.name
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    work = Path(tempfile.mkdtemp(prefix="bench-token-stream-"))
    common_args = ["model=local", f"model.path={model_dir}", f"hardware={args.hardware}",
                   "api.rate_limit_requests=100000"]
    nodes = {}
    with contextlib.ExitStack() as stack:
        if args.before:
            tree = stack.enter_context(worktree(args.before, work))
            nodes[f"before ({args.before})"] = NodeProcess([*common_args, f"node.data_dir={work / 'b'}"], threads=1,
                                                           env={"PYTHONPATH": str(tree)}, cwd=tree)
        nodes.update({name: NodeProcess([*common_args, f"serving.decode_ahead={ahead}",
                                         f"node.data_dir={work / str(ahead)}"], threads=1)
                      for name, ahead in ARMS.items()})
        try:
            start_all(list(nodes.values()))
            for node in nodes.values():
                api_decode_rate(node.url, model, messages, 8)  # warm-up
            arms = {name: (lambda url=node.url: api_decode_rate(url, model, messages, args.tokens))
                    for name, node in nodes.items()}
            rates = run_interleaved(arms, args.trials)
        finally:
            for node in nodes.values():
                node.stop()
    med = medians(rates)
    print_table(rates)
    new = list(ARMS)[1]
    for old in [name for name in rates if name != new]:
        ratio = med[new] / med[old]
        per_trial = statistics.median(n / o for n, o in zip(rates[new], rates[old], strict=True))
        print(f"back to back / {old} = {ratio:.3f} (median of per-trial ratios {per_trial:.3f}); "
              f"{1000 / med[old] - 1000 / med[new]:.2f} ms less per token")
    print(f"[hardware={args.hardware}, 1 thread per node, tokens={args.tokens}, trials={args.trials}]")
    plot = args.plot or str(REPO / "docs" / "img" / f"bench_token_stream_{args.hardware}.png")
    first = next(iter(rates))
    plot_trials(rates, f"SmolLM2-135M {args.hardware}: back to back / {first} = {med[new] / med[first]:.2f}", plot)


if __name__ == "__main__":
    sys.exit(main())
