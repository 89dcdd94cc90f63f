"""Rebuilding an evicted session: its decode steps replayed one by one vs in runs (one verify by position each).

    OMP_NUM_THREADS=1 python bench/bench_replay.py [--prompt 64] [--steps 192] [--trials 5] [--dtype float32]
        [--batched]

The embedded SmolLM2 in one ShardRuntime behind a LocalPipeline (router/pipeline.py), 1 thread: a session fed a
``--prompt``-token prompt and ``--steps`` greedy decode steps, then evicted (other sessions fill the runtime's store)
and rebuilt by the pipeline's replay, timed; per trial the two arms alternate order: ``REPLAY_RUN`` 1 (each decode
step replayed as the step it was, the first version) and the default (consecutive steps in runs of up to 256). After
each replay the session's next token is checked against the one the undisturbed session gave, and the rebuilt caches
of the two arms are compared bit for bit. Prints the median replay time per arm and their ratio, the load average and
the machine; a plot beside the table. docs/benchmarks.md, "Replaying an evicted session".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import medians, plot_trials, print_table, run_interleaved

from openhydra.testing.machine import announce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=192)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batched", action="store_true", help="continuous batching on (serving=batched)")
    parser.add_argument("--plot", default="docs/img/bench_replay.png")
    args = parser.parse_args()
    announce()
    torch.set_num_threads(1)
    from openhydra.router.pipeline import LocalPipeline
    from openhydra.runtime.batching import DecodeBatcher
    from openhydra.runtime.sampling import SamplingParams
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    greedy = SamplingParams()
    rt = ShardRuntime(embedded_model_dir(TEST_CACHE_ROOT), dtype=getattr(torch, args.dtype), max_sessions=2)
    if args.batched:
        rt.batcher = DecodeBatcher(rt, max_batch=8, window_ms=2.0)
    pipe = LocalPipeline(rt)
    prompt = [int(t) for t in torch.arange(100, 100 + args.prompt) % rt.vocab_size]
    session, out = "s", [pipe.step("s", prompt, 0, greedy, 0)]
    for k in range(1, args.steps + 1):
        out.append(pipe.step(session, [out[-1]], len(prompt) + k - 1, greedy, k))
    position = len(prompt) + args.steps
    expected = pipe.step(session, [out[-1]], position, greedy, args.steps + 1)  # the next token, undisturbed
    pipe.truncate(session, position)  # (cut it again: each trial rebuilds to here and takes that step)
    caches: dict[str, list[torch.Tensor]] = {}

    def rebuild(run: int, name: str) -> float:
        for j in range(3):  # other coordinators' sessions: ours is evicted
            with torch.inference_mode():
                rt.forward(f"other{j}", torch.arange(3), input_ids=torch.tensor([7, 8, 9 + j]))
        assert rt.session_length(session) == 0
        pipe.REPLAY_RUN = run
        began = time.perf_counter()
        pipe._replay(session)
        seconds = time.perf_counter() - began
        assert rt.session_length(session) == position
        layer = rt._sessions.get(session).cache.layers
        caches[name] = [torch.cat([lay.keys, lay.values]) for lay in layer]
        token = pipe.step(session, [out[-1]], position, greedy, args.steps + 1)
        assert token == expected, (name, token, expected)
        pipe.truncate(session, position)
        return seconds * 1e3

    arms = {"one step at a time (REPLAY_RUN 1)": lambda: rebuild(1, "one"),
            f"runs (REPLAY_RUN {LocalPipeline.REPLAY_RUN})": lambda: rebuild(LocalPipeline.REPLAY_RUN, "runs")}
    times = run_interleaved(arms, args.trials, unit="ms")
    same = all(torch.equal(a, b) for a, b in zip(caches["one"], caches["runs"], strict=True))
    print_table(times, metric=f"median ms to replay {args.prompt} + {args.steps} positions")
    one, runs = medians(times).values()
    ratios = [a / b for a, b in zip(*times.values(), strict=True)]
    print(f"\none at a time / runs: {one / runs:.2f}x (per-trial median {statistics.median(ratios):.2f}x); "
          f"{args.dtype}, {'batched' if args.batched else 'plain'}; caches bit-identical: {same}; "
          f"next token as undisturbed: True")
    if rt.batcher is not None:
        rt.batcher.close()
    plot_trials(times, f"replay of {args.prompt}+{args.steps} positions, SmolLM2 {args.dtype}"
                       f"{' batched' if args.batched else ''}", args.plot, ylabel="ms")
    if not same:
        raise SystemExit("the two replays built different caches")


if __name__ == "__main__":
    main()
