"""bf16 on the low-bit library (hardware.matmul=library, hardware=cpu_fast) against PyTorch's bf16 matmul.

    OMP_NUM_THREADS=1 python bench/bench_bf16_library.py [--model-dir DIR] [--trials 5] [--tokens 32]

Whole-model ShardRuntimes of the embedded SmolLM2-135M in one process, 1 thread, interleaved trial by trial:
bf16 with PyTorch's matmuls (hardware=cpu on a CPU with native bf16), bf16 on the library, and fp32 for reference.
Per trial and arm: the median decode step (``--tokens`` greedy steps after a 16-token prompt), a speculative verify
of 5 positions (median of 9, rolled back each time), and prefills of 42 and 400 tokens. Then the share of the
memory-bandwidth roofline (bench_roofline.py's method: bytes the step reads x steps per second / copy bandwidth),
and quality against fp32 on the held-out text (bench/data/heldout.txt): next-token agreement and perplexity of
teacher-forced one-position decode steps (the path decoding takes; a prefill of more than 64 rows runs PyTorch's
matmul on the library arm too).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_roofline import copy_bandwidth, kv_bytes_per_token
from common import finish_plot, median_step_ms, run_interleaved, whole_model_bench

ARMS = {"bf16 pytorch": ("bfloat16", "pytorch"), "bf16 library": ("bfloat16", "library"),
        "fp32": ("float32", "pytorch")}
HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"


def verify_ms(rt, prompt, positions: int = 5, repeats: int = 9) -> float:
    """A verify of ``positions`` drafted tokens after ``prompt`` (all their logits), rolled back each time."""
    import torch

    rt.forward("v", torch.arange(prompt.numel()), input_ids=prompt)
    drafts = torch.arange(200, 200 + positions)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        rt.forward("v", torch.arange(prompt.numel(), prompt.numel() + positions), input_ids=drafts, all_logits=True)
        times.append(time.perf_counter() - began)
        rt.truncate_session("v", prompt.numel())
    rt.close_session("v")
    return statistics.median(times) * 1e3


def prefill_ms(rt, tokens: int) -> float:
    import torch

    ids = torch.arange(100, 100 + tokens)
    began = time.perf_counter()
    rt.forward("p", torch.arange(tokens), input_ids=ids)
    elapsed = time.perf_counter() - began
    rt.close_session("p")
    return elapsed * 1e3


def quality(runtimes: dict, ids) -> dict[str, dict[str, float]]:
    """Teacher-forced one-position steps over ``ids``: each arm's next-token choice against fp32's, and its
    perplexity of the text."""
    import torch

    picks, nll = {}, {}
    for name, rt in runtimes.items():
        rt.forward("q", torch.arange(1), input_ids=ids[:1])
        chosen, losses = [], []
        for i in range(1, ids.numel()):
            logits = rt.forward("q", torch.tensor([i]), input_ids=ids[i : i + 1])[-1].float()
            if i + 1 < ids.numel():
                chosen.append(int(logits.argmax()))
                losses.append(float(torch.nn.functional.cross_entropy(logits[None], ids[i + 1 : i + 2])))
        rt.close_session("q")
        picks[name], nll[name] = chosen, losses
    return {name: {"agreement_with_fp32": sum(a == b for a, b in zip(picks[name], picks["fp32"], strict=True))
                   / len(picks["fp32"]), "perplexity": math.exp(statistics.fmean(nll[name]))} for name in runtimes}


def main() -> None:
    args, model_dir = whole_model_bench(__doc__, tokens=32, plot="docs/img/bench_bf16_library.png")
    import torch
    from transformers import AutoTokenizer

    from openhydra.runtime import lowbit
    from openhydra.runtime.shard import ShardRuntime

    if lowbit.kernel() is None:
        sys.exit("no low-bit library on this machine (no AVX2/AVX-512 VNNI or no C compiler): nothing to compare")
    runtimes = {name: ShardRuntime(model_dir, dtype=getattr(torch, d), matmul=m) for name, (d, m) in ARMS.items()}
    assert runtimes["bf16 library"].numerics == "pytorch-bf16-lowbit1"
    prompt = torch.arange(100, 116)
    measures = {"decode step ms": lambda rt: median_step_ms(rt, "d", prompt, args.tokens),
                "verify of 5 ms": lambda rt: verify_ms(rt, prompt),
                "prefill 42 ms": lambda rt: prefill_ms(rt, 42),
                "prefill 400 ms": lambda rt: prefill_ms(rt, 400)}
    arms = {f"{name} | {what}": (lambda rt=rt, f=f: f(rt)) for name, rt in runtimes.items() for what, f in
            measures.items()}
    arms["copy GB/s"] = lambda: copy_bandwidth() / 1e9
    rates = run_interleaved(arms, args.trials, unit="")
    med = {k: statistics.median(v) for k, v in rates.items()}
    bandwidth = med["copy GB/s"] * 1e9
    print(f"\nmemory bandwidth (copy, 1 thread): {bandwidth / 1e9:.1f} GB/s")
    print("\n| arm | " + " | ".join(measures) + " | decode: share of roofline |\n|---|" + "---|" * (len(measures) + 1))
    report: dict = {"bandwidth_gb_s": bandwidth / 1e9, "arms": {}}
    for name, rt in runtimes.items():
        per_token = rt.loaded_bytes + kv_bytes_per_token(rt, prompt.numel() + args.tokens // 2)
        share = (1e3 / med[f"{name} | decode step ms"]) * per_token / bandwidth
        cells = [f"{med[f'{name} | {what}']:.1f}" for what in measures]
        print(f"| {name} | " + " | ".join(cells) + f" | {share:.2f} |")
        report["arms"][name] = {what: med[f"{name} | {what}"] for what in measures} | {"roofline_share": share}
    base, library = report["arms"]["bf16 pytorch"], report["arms"]["bf16 library"]
    print("\nlibrary ÷ pytorch, time (below 1: faster): " + ", ".join(
        f"{what} {library[what] / base[what]:.2f}" for what in measures))
    text = HELDOUT.read_text()
    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"][:200])
    scores = quality(runtimes, ids)
    print(f"\nquality over {ids.numel()} tokens of {HELDOUT.name} (teacher-forced decode steps):")
    print("| arm | next token = fp32's | perplexity |\n|---|---|---|")
    for name, score in scores.items():
        print(f"| {name} | {score['agreement_with_fp32']:.3f} | {score['perplexity']:.3f} |")
    report["quality"] = scores
    _plot(report, measures, model_dir.name, args.plot)
    print(json.dumps(report))


def _plot(report: dict, measures: dict, model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(report["arms"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [report["arms"][name][what] for what in measures]
        ax.bar([x + i * width for x in range(len(measures))], values, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(measures))], list(measures), fontsize=8)
    ax.set_yscale("log")
    finish_plot(fig, ax, path, xlabel="", ylabel="ms (median, log scale)",
                title=f"{model}: bf16 on the library vs PyTorch, 1 thread")


if __name__ == "__main__":
    main()
