"""Weights cast once into the model cache and mapped (runtime/cast_store.py) against cast in memory at every load.

    OMP_NUM_THREADS=1 python bench/bench_cast_store.py [--trials 7] [--steps 32] [--processes 2] [--dtype bfloat16]

The embedded SmolLM2 (a float32 checkpoint) served in ``--dtype`` (bfloat16 by default: what ``hardware=cpu`` picks on a
CPU with native bf16), 1 thread, in three parts:

1. **Speed.** Two whole-model ``ShardRuntime``s in one process, one reading its weights from a cast file (views of its
   mapping: page cache), one casting in memory (private anonymous memory). Each trial times ``--steps`` greedy decode
   steps on each, arms alternating which goes first; both must give the same greedy tokens (checked) and the same
   parameters bit for bit (checked).
2. **Load time.** Loading the span each way, alternated (``--trials`` each), the cast file already written; and the
   first load that writes it.
3. **Memory.** ``--processes`` fresh interpreters per arm, each loading the whole model and decoding 8 tokens, all
   alive at once: each one's PSS split into mapped weight files and anonymous memory (runtime/residency.py), and the
   arm's sum. Mapped, the processes share one copy of the weights; cast in memory, each holds its own.

Prints the machine banner (load average, CPU flags, versions) and the medians, with a plot of both beside the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import finish_plot, print_table, run_interleaved, step_ab  # noqa: E402

CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from pathlib import Path
from openhydra.runtime import cast_store
from openhydra.runtime.shard import ShardRuntime
cast_store.configure(Path(sys.argv[2]) if sys.argv[2] != "-" else None)
rt = ShardRuntime(sys.argv[1], dtype=getattr(torch, sys.argv[3]))
out = rt.forward("s", torch.arange(16), input_ids=torch.arange(100, 116))
for i in range(8):
    out = rt.forward("s", torch.tensor([16 + i]), input_ids=torch.tensor([int(out.argmax())]))
print("ready", flush=True)
sys.stdin.read()
"""


def memory_arm(model_dir: Path, casts: Path | None, dtype: str, processes: int) -> list[dict[str, float]]:
    """PSS parts (MiB) of ``processes`` children loading the whole model, measured while all are alive."""
    from openhydra.runtime.residency import smaps_breakdown

    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(model_dir), str(casts) if casts else "-", dtype],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
                for _ in range(processes)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise SystemExit(f"a child failed to load (exit {child.wait()})")
        parts = []
        for child in children:
            b = smaps_breakdown(child.pid)
            parts.append({"pss": b["total"].pss / 2**20, "weights": b["weights"].pss / 2**20,
                          "anonymous": b["anonymous"].pss / 2**20, "rss": b["total"].rss / 2**20})
        return parts
    finally:
        for child in children:
            child.stdin.close()
            child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_cast_store.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    import torch

    torch.set_num_threads(1)
    from openhydra.runtime import cast_store
    from openhydra.runtime.residency import tensor_residency
    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="bench-cast-store-"))
    casts = work / "casts"
    try:
        def load(root: Path | None) -> tuple[ShardRuntime, float]:
            cast_store.configure(root)
            began = time.perf_counter()
            rt = ShardRuntime(model_dir, dtype=dtype)
            return rt, time.perf_counter() - began

        _, first_write_s = load(casts)
        mapped, _ = load(casts)
        private, _ = load(None)
        held = {"mapped": tensor_residency(mapped.modules), "in memory": tensor_residency(private.modules)}
        print(f"SmolLM2 {args.dtype}: first load, writing the cast file: {first_write_s:.2f} s; weights mapped "
              f"{held['mapped'].mapped_bytes / 2**20:.0f} MiB / private {held['mapped'].private_bytes / 2**20:.0f} MiB "
              f"(cast file) vs mapped {held['in memory'].mapped_bytes / 2**20:.0f} / private "
              f"{held['in memory'].private_bytes / 2**20:.0f} MiB (in memory)")
        a, b = mapped.modules.state_dict(), private.modules.state_dict()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), "parameters differ"
        names = ("cast file, mapped", "cast in memory")
        steps, m, per_trial = step_ab({names[0]: mapped, names[1]: private}, torch.arange(100, 142), args.steps,
                                      args.trials)
        print(f"\ndecode step, mapped / in memory = {m[names[0]] / m[names[1]]:.3f} (per-trial median "
              f"{per_trial:.3f}); the same 16 greedy tokens and the same parameters bit for bit")
        del mapped, private, a, b

        loads = run_interleaved({names[0]: lambda: load(casts)[1] * 1e3, names[1]: lambda: load(None)[1] * 1e3},
                                args.trials, unit="ms")
        print_table(loads, metric="median ms to load the whole model")

        gc.collect()  # the runtimes above (reference cycles): this process must not share the children's pages
        assert str(casts) not in Path("/proc/self/maps").read_text(), "the bench process still maps the cast file"
        memory = {names[0]: memory_arm(model_dir, casts, args.dtype, args.processes),
                  names[1]: memory_arm(model_dir, None, args.dtype, args.processes)}
        print(f"\n{args.processes} processes at once, each the whole model in {args.dtype} (MiB):")
        print("| arm | process | RSS | PSS | of it mapped weight files | anonymous |\n|---|---|---|---|---|---|")
        for name, parts in memory.items():
            for i, p in enumerate(parts):
                print(f"| {name} | {i} | {p['rss']:.0f} | {p['pss']:.0f} | {p['weights']:.0f} | {p['anonymous']:.0f} |")
            print(f"| {name} | **sum** | | **{sum(p['pss'] for p in parts):.0f}** | "
                  f"{sum(p['weights'] for p in parts):.0f} | {sum(p['anonymous'] for p in parts):.0f} |")
        saved = sum(p["pss"] for p in memory[names[1]]) - sum(p["pss"] for p in memory[names[0]])
        print(f"\nPSS of the {args.processes} processes: {saved:.0f} MiB less with the cast file")
        from openhydra.testing.machine import load_average

        print(f"load average at the end: {load_average()}")
        if args.json:
            Path(args.json).write_text(json.dumps({"steps_ms": steps, "loads_ms": loads, "memory_mib": memory,
                                                   "first_write_s": first_write_s}, indent=1))
        plot(steps, loads, memory, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(steps: dict, loads: dict, memory: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, data, label in ((axes[0], steps, "ms per decode step"), (axes[1], loads, "ms to load")):
        for i, values in enumerate(data.values()):
            ax.scatter([i] * len(values), values, alpha=0.6)
            ax.hlines(statistics.median(values), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(data)), list(data), fontsize=8)
        ax.set_ylabel(label)
    ax = axes[2]
    for i, parts in enumerate(memory.values()):
        bottom = 0.0
        for j, p in enumerate(parts):
            ax.bar(i, p["weights"], bottom=bottom, color="tab:blue", edgecolor="white",
                   label="mapped weight files" if i == j == 0 else None)
            ax.bar(i, p["anonymous"], bottom=bottom + p["weights"], color="tab:orange", edgecolor="white",
                   label="anonymous" if i == j == 0 else None)
            bottom += p["weights"] + p["anonymous"]
    ax.set_xticks(range(len(memory)), list(memory), fontsize=8)
    fig.suptitle(f"SmolLM2 {args.dtype}, 1 thread: weights cast once and mapped vs cast in memory at each load")
    finish_plot(fig, ax, args.plot, xlabel="", ylabel=f"PSS of {args.processes} processes (MiB)",
                title=f"{args.processes} processes at once")


if __name__ == "__main__":
    main()
