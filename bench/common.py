"""What every A/B benchmark here shares: interleaved trials, medians, a plot beside the table."""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def worktree(commit: str, parent: Path) -> Iterator[Path]:
    """A detached git worktree of ``commit`` under ``parent`` (removed after): nodes started there with
    ``NodeProcess(..., cwd=tree, env={"PYTHONPATH": str(tree)})`` run that commit's code beside this one's."""
    tree = parent / f"before-{commit}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False,
                       capture_output=True)


def run_interleaved(arms: dict[str, Callable[[], float]], trials: int, unit: str = "tok/s") -> dict[str, list[float]]:
    """Run every arm once per trial, alternating which goes first, and print each measurement."""
    rates: dict[str, list[float]] = {name: [] for name in arms}
    width = max(len(name) for name in arms)
    for trial in range(trials):
        order = list(arms) if trial % 2 == 0 else list(reversed(arms))
        for name in order:
            value = arms[name]()
            rates[name].append(value)
            print(f"trial {trial} {name:{width}s} {value:8.2f} {unit}", flush=True)
    return rates


def medians(rates: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in rates.items()}


def print_table(rates: dict[str, list[float]], metric: str = "median decode tok/s") -> None:
    print(f"\n| arm | {metric} | runs |\n|---|---|---|")
    for name, value in medians(rates).items():
        print(f"| {name} | {value:.2f} | {', '.join(f'{r:.1f}' for r in rates[name])} |")


def plot_trials(rates: dict[str, list[float]], title: str, path: str | Path, ylabel: str = "decode tok/s") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in rates.items():
        ax.plot(range(len(values)), values, "o-", label=name)
    ax.set_xlabel("trial (interleaved)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def finish_plot(fig, ax, path: str | Path, *, xlabel: str, ylabel: str, title: str, dpi: int = 120) -> None:
    """Label a log-scale figure (grid on both tick kinds, legend) and write it to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    print(f"plot: {path}")


def spawn_ready(args: list[str], timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """``python ARGS`` with 1 torch thread; waits for its ``READY <address>`` line and returns (process, address)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    from openhydra.testing.processes import ready_fields

    fields = ready_fields(proc, timeout_s)
    if fields is not None:
        return proc, fields[0]
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def bench_model_dir(name: str | None) -> str:
    """``--model-dir``: ``tiny`` (default: the tests' 8-layer random llama, compute ~1 ms), ``smollm2`` (the embedded
    real weights) or a folder."""
    if name not in (None, "tiny", "smollm2"):
        return name
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT
    from openhydra.testing.tiny import build_tiny_model

    smollm2 = embedded_model_dir(TEST_CACHE_ROOT)
    if name == "smollm2":
        return str(smollm2)
    return str(build_tiny_model("llama", TEST_CACHE_ROOT / "tiny-v2" / "tiny-llama-8l", smollm2, 8))


def machine_banner() -> str:
    """One line for every result: load average, CPU model and its SIMD flags, core count, key versions."""
    from openhydra.testing.machine import machine_banner as banner

    return banner()


def runtime_pair(quantization: str, switch: str, stand_in: Callable) -> tuple:
    """For in-process A/B benches of one load-time choice: two ShardRuntimes of the embedded SmolLM2, fp32 with
    ``quantization`` on the low-bit kernel, 1 torch thread: the first as the node loads it, the second with
    ``openhydra.runtime.shard.<switch>`` replaced by ``stand_in`` while it loads (the code before that choice). Exits
    where this machine has no low-bit kernel. The caller announces the machine first."""
    import torch

    torch.set_num_threads(1)
    from openhydra.runtime import lowbit, shard
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    if lowbit.kernel() is None:
        sys.exit("no low-bit kernel on this machine: nothing to compare")
    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    current = ShardRuntime(model_dir, dtype=torch.float32, quantization=quantization)
    original = getattr(shard, switch)
    setattr(shard, switch, stand_in)
    try:
        before = ShardRuntime(model_dir, dtype=torch.float32, quantization=quantization)
    finally:
        setattr(shard, switch, original)
    return current, before


def step_arms(runtimes: dict, prompt, steps: int) -> dict[str, Callable[[], float]]:
    """``run_interleaved`` arms: each runtime's :func:`median_step_ms` after ``prompt``, a fresh session per call."""
    sessions = itertools.count()
    return {name: (lambda rt=rt: median_step_ms(rt, f"t{next(sessions)}", prompt, steps))
            for name, rt in runtimes.items()}


def step_ab(runtimes: dict, prompt, steps: int, trials: int) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """Two runtimes of one model, A/B: first checks they give the same 16 greedy tokens after ``prompt``, then times
    ``steps`` decode steps on each per trial (interleaved, alternating which goes first) and prints the table.
    Returns the per-trial ms per step, their medians, and the median per-trial ratio first ÷ second."""
    import torch

    tokens = {}
    for name, rt in runtimes.items():
        out, seq = rt.forward("check", torch.arange(prompt.numel()), input_ids=prompt), []
        for i in range(16):
            seq.append(int(out.argmax()))
            out = rt.forward("check", torch.tensor([prompt.numel() + i]), input_ids=torch.tensor([seq[-1]]))
        rt.close_session("check")
        tokens[name] = seq
    first, second = list(runtimes)
    assert tokens[first] == tokens[second], tokens
    rates = run_interleaved(step_arms(runtimes, prompt, steps), trials, unit="ms/step")
    print_table(rates, metric="median ms per decode step")
    per_trial = statistics.median(a / b for a, b in zip(rates[first], rates[second], strict=True))
    return rates, medians(rates), per_trial


def median_step_ms(runtime, session_id: str, prompt, steps: int) -> float:
    """The median of ``steps`` greedy one-position decode steps (``runtime.forward``), in ms, after ``prompt``; the
    session is closed after."""
    import torch

    out = runtime.forward(session_id, torch.arange(prompt.numel()), input_ids=prompt)
    times = []
    for i in range(steps):
        token = torch.tensor([int(out.argmax())])
        began = time.perf_counter()
        out = runtime.forward(session_id, torch.tensor([prompt.numel() + i]), input_ids=token)
        times.append(time.perf_counter() - began)
    runtime.close_session(session_id)
    return statistics.median(times) * 1e3


def whole_model_bench(doc: str, *, plot: str, trials: int = 5, **counts: int) -> tuple[argparse.Namespace, Path]:
    """For in-process benchmarks of a model's runtimes or weights on one thread: parse ``--model-dir``, ``--trials``,
    ``--plot`` and an integer option per ``counts`` (``tokens=32``: ``--tokens``, default 32), print the machine
    banner (and the load at exit), pin torch to one thread; returns the arguments and the model folder (the embedded
    SmolLM2 unless ``--model-dir`` names one)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--trials", type=int, default=trials)
    for name, default in counts.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--plot", default=plot)
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    import torch

    torch.set_num_threads(1)
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    return args, Path(args.model_dir) if args.model_dir else embedded_model_dir(TEST_CACHE_ROOT)


def greedy_tok_s(runtime, prompt, tokens: int, warm: bool = False) -> float:
    """``tokens`` greedy tokens of ``runtime`` (a whole-model span) after ``prompt``'s prefill, per second of both
    (``warm``: one greedy token first, untimed, in a session of its own)."""
    from openhydra.runtime.local_pipeline import greedy_generate

    if warm:
        greedy_generate([runtime], prompt, 1, session_id="warm")
        runtime.close_session("warm")
    started = time.perf_counter()
    greedy_generate([runtime], prompt, tokens, session_id="timed")
    elapsed = time.perf_counter() - started
    runtime.close_session("timed")
    return tokens / elapsed
