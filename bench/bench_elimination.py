"""How long a liar that dodges audits survives the elimination, and how often an honest peer is failed instead.

    python bench/bench_elimination.py [--trials 200] [--plot docs/img/bench_elimination.png]

A simulated swarm (openhydra/sim/elimination.py): spans served by 3, 3 and 2 peers, the cheapest routed first,
one liar on the first span lying in a fraction of the user sessions it serves (``rate``) and never in audits. A
fraction of user sessions is audited (``audited``: 1.0, and 0.27, what the default ``sample_rate`` 0.1 per hop
gives a 3-hop chain: 1 - 0.9^3). For each (rate, audited): the share of trials in which the liar was failed within
the session budget, the median and 90th percentile of sessions until then, and how many honest peers were failed
(the target: 0). Also two liars on different spans (rates 0.5 and 0.5), where only the liars may be failed.
Deterministic (seeded); no processes, so the load average does not matter (printed anyway).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import finish_plot  # noqa: E402

from openhydra.sim.elimination import simulate  # noqa: E402
from openhydra.testing.machine import announce  # noqa: E402

SPANS = [["liar", "h0b", "h0c"], ["h1a", "h1b", "h1c"], ["h2a", "h2b"]]
RATES = (1.0, 0.5, 0.2, 0.05)
AUDITED = (1.0, 0.27)
BUDGET = 3000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    print(f"load average {os.getloadavg()}; {args.trials} trials per row, budget {BUDGET} user sessions", flush=True)
    rows = []
    print("\n| liar's lie rate per user session | sessions audited | failed within budget | median sessions | "
          "p90 sessions | honest peers failed |\n|---|---|---|---|---|---|")
    for rate in RATES:
        for audited in AUDITED:
            until, wrong = [], 0
            for seed in range(args.trials):
                _, convictions = simulate(SPANS, {"liar": rate}, BUDGET, seed, audited=audited)
                wrong += sum(1 for _, c in convictions if c.peer_id != "liar")
                until += [n for n, c in convictions if c.peer_id == "liar"][:1]
            until.sort()
            med = statistics.median(until) if until else float("nan")
            p90 = until[max(0, int(0.9 * len(until)) - 1)] if until else float("nan")
            rows.append((rate, audited, len(until) / args.trials, med, p90, wrong))
            print(f"| {rate} | {audited} | {len(until)}/{args.trials} | {med:.0f} | {p90:.0f} | {wrong} |", flush=True)
    wrong = 0
    for seed in range(args.trials):
        _, convictions = simulate(SPANS, {"liar": 0.5, "h1b": 0.5}, BUDGET, seed, audited=0.27)
        wrong += sum(1 for _, c in convictions if c.peer_id not in ("liar", "h1b"))
    print(f"\ntwo liars (liar, h1b) at 0.5, 27% audited: honest peers failed in {args.trials} trials: {wrong}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for audited in AUDITED:
            pts = [(r[0], r[3]) for r in rows if r[1] == audited]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{audited:.0%} of sessions audited")
        ax.set_xscale("log")
        ax.set_yscale("log")
        honest = all(r[5] == 0 for r in rows) and wrong == 0
        finish_plot(fig, ax, args.plot, xlabel="liar's lie rate per user session",
                    ylabel="median user sessions until it is failed",
                    title=f"Elimination of an audit-dodging liar ({args.trials} trials"
                          + ("; 0 honest peers failed)" if honest else ")"))


if __name__ == "__main__":
    main()
