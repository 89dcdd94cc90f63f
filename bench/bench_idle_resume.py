"""What a hop's Python costs when its CPU was idle just before: the same work hot, after sleeping, after spinning.

    python bench/bench_idle_resume.py [--calls 200] [--sleeps-ms 0.1,1,3,10]

In a pipeline each peer waits while the others compute, then handles a step. The work measured here is what a peer
does first with an arriving step: parse a tensor message, decode it and check it is finite (``peer/wire.py``). It is
timed back to back (hot), after ``time.sleep`` of each length (the CPU may go idle: a C-state, or on a virtual machine
a halted vCPU the host gives to someone else), and after spinning for 3 ms (busy the whole time). The medians and
their ratio to hot are printed with the machine's load. A ratio far above 1 after sleeping but not after spinning
means the caches (and predictors) were lost while idle: every hop pays its Python at that price (docs/benchmarks.md,
"One event loop per node").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import finish_plot  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--sleeps-ms", default="0.1,1,3,10")
    parser.add_argument("--rounds", type=int, default=3, help="every condition this many times, interleaved")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_idle_resume.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    import torch

    torch.set_num_threads(1)
    from openhydra.peer.proto import peer_pb2 as pb
    from openhydra.peer.wire import FLOAT_DTYPES, decode_tensor, encode_tensor

    wire = encode_tensor(torch.randn(1, 576)).SerializeToString()  # one SmolLM2 hidden state, as a step carries it

    def work() -> None:
        hidden = decode_tensor(pb.Tensor.FromString(wire), shape=(1, 576), dtypes=FLOAT_DTYPES)
        if not bool(torch.isfinite(hidden).all()):
            raise AssertionError("not finite")

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    conditions = {"hot": None}
    for ms in (float(v) for v in args.sleeps_ms.split(",")):
        conditions[f"after {ms:g} ms asleep"] = lambda s=ms / 1e3: time.sleep(s)
    conditions["after 3 ms spinning"] = lambda: spin(0.003)
    medians: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(args.rounds):
        for name, before in conditions.items():
            times = []
            for _ in range(args.calls):
                if before is not None:
                    before()
                began = time.perf_counter()
                work()
                times.append(time.perf_counter() - began)
            medians[name].append(statistics.median(times) * 1e6)
    hot = statistics.median(medians["hot"])
    print("\n| condition | median us per call (per round) | ÷ hot |")
    print("|---|---|---|")
    for name, values in medians.items():
        print(f"| {name} | {statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)}) | "
              f"{statistics.median(values) / hot:.1f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(medians)
    ax.bar(range(len(names)), [statistics.median(medians[n]) for n in names], color="tab:blue",
           label=f"median of {args.rounds} rounds x {args.calls} calls")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    finish_plot(fig, ax, args.plot, xlabel="what the CPU did just before", ylabel="us per call (median)",
                title="decode + finite check of one hidden state, by what came before")


if __name__ == "__main__":
    main()
