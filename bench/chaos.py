"""Chaos run: steady streaming load through a replicated swarm while peers are SIGKILLed, SIGSTOPped (then
SIGCONTed) and restarted on a schedule, never leaving a span without a live replica.

The HTTP DHT, a coordinator (it holds only layer [0, 1), so it is never a hop) and 2 replicas of each of 3 spans,
every one a real node process. The expected text of each prompt is computed first on the swarm with no fault;
then ``--streams`` greedy streams (official ``openai`` client, temperature 0, ``ignore_eos``) run for
``--duration-s`` while a fault lands every ``--kill-every-s`` (±25 %). Reported: requests started, completed with
exactly the expected text, ended with a typed error, hung (no progress for > 60 s), wrong text, untyped errors;
stall p50/p95/max; load average, CPU and versions. Writes chaos-<time>.json, chaos-<time>.png and the node logs
(logs-<time>/) under ``--out-dir``. Exit status 1 when the run breaks the bar (any hang, wrong text or untyped
error; fewer than 99 % completed unless every other request got a typed error).

    python bench/chaos.py --duration-s 600 --streams 4 --kill-every-s 10 --seed 0
    python bench/chaos.py --model-dir tiny --duration-s 120        (the tests' 8-layer random llama)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import bench_model_dir  # noqa: E402

from openhydra.testing.chaos import ChaosConfig, ChaosReport, run_chaos  # noqa: E402
from openhydra.testing.chaos_load import Outcome  # noqa: E402
from openhydra.testing.machine import announce  # noqa: E402

EVENT_STYLE = {"kill": ("red", "-"), "stop": ("orange", "--"), "cont": ("green", ":"), "term": ("purple", "-"),
               "start": ("blue", "-."), "ready": ("blue", ":"), "start_failed": ("black", "-")}
OUTCOME_COLOR = {"ok": "tab:green", "typed_error": "tab:orange", "wrong_text": "tab:red", "hung": "black",
                 "untyped_error": "tab:purple"}


def print_report(report: ChaosReport) -> None:
    env = report.environment
    print("\n## chaos run")
    print(f"load average {env['load_average']} at the start, {env['load_average_end']} at the end; "
          f"{env['cpu_count']} CPUs: {env['cpu_model']} (flags: {' '.join(env['cpu_flags'])})")
    print(f"python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
          + f", commit {env['git_commit']}")
    cfg = report.config
    print(f"model {Path(cfg['model_dir']).name}, {cfg['streams']} streams x {cfg['duration_s']:.0f} s, "
          f"{cfg['max_tokens']} tokens per request, a fault every ~{cfg['kill_every_s']} s, seed {cfg['seed']}")
    print(f"faults: {report.event_counts}; fewest live replicas per span: {report.min_live}")
    print("\n| requests | count |\n|---|---|")
    print(f"| started | {report.started} |")
    for outcome in Outcome:
        print(f"| {outcome.value} | {report.count(outcome)} |")
    s = report.stalls
    print(f"\ncompleted with the expected text: {report.completed_fraction:.2%}")
    print(f"stall (largest gap without a token, per request): p50 {_s(s.p50_s)}, p95 {_s(s.p95_s)}, "
          f"max {_s(s.max_s)}")
    print(f"coordinator: {report.coordinator}")
    if report.errors:
        print(f"non-ok requests: {report.errors}")
    if report.coordinator_log:
        print(f"coordinator log ({len(report.coordinator_log)} lines on failures/bans/timeouts; the last 12):")
        for line in report.coordinator_log[-12:]:
            print("  " + line[:200])
    problems = report.problems()
    print("result: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def plot_report(report: ChaosReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([report.config["duration_s"], *(r.ended_s or 0 for r in report.requests)])
    bins = int(end) + 1
    per_second = [0] * bins
    for r in report.requests:
        for t in r.chunk_times_s:
            per_second[min(int(t), bins - 1)] += 1
    fig, (ax_rate, ax_stall) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    ax_rate.plot(range(bins), per_second, lw=1, color="tab:blue")
    ax_rate.set_ylabel("tokens/s (content chunks, all streams)")
    if report.coordinator_timeline:
        ax_failovers = ax_rate.twinx()
        ax_failovers.step([p["t_s"] for p in report.coordinator_timeline],
                          [p["failovers"] or 0 for p in report.coordinator_timeline], where="post", color="gray",
                          lw=1, alpha=0.8)
        ax_failovers.set_ylabel("coordinator failovers (cumulative, gray)", fontsize=8)
    for outcome, color in OUTCOME_COLOR.items():
        points = [(r.ended_s if r.ended_s is not None else end, r.stall_s) for r in report.requests
                  if r.outcome is not None and r.outcome.value == outcome]
        if points:
            ax_stall.scatter(*zip(*points, strict=True), s=12, color=color, label=f"{outcome} ({len(points)})")
    ax_stall.set_yscale("log")
    ax_stall.set_ylabel("request stall, s (at its end)")
    ax_stall.set_xlabel("seconds since the load started")
    seen: set[str] = set()
    for event in report.events:
        color, style = EVENT_STYLE.get(event.kind, ("gray", "-"))
        for ax in (ax_rate, ax_stall):
            ax.axvline(event.t_s, color=color, ls=style, lw=0.8, alpha=0.7,
                       label=event.kind if ax is ax_rate and event.kind not in seen else None)
        seen.add(event.kind)
    ax_rate.legend(loc="upper left", fontsize=7, ncol=len(seen) or 1)
    ax_stall.legend(loc="lower right", fontsize=7)
    cfg = report.config
    env = report.environment
    fig.suptitle(f"chaos: {Path(cfg['model_dir']).name}, {cfg['streams']} streams, fault every ~{cfg['kill_every_s']}"
                 f" s; ok {report.count(Outcome.OK)}/{report.started}, load {env['load_average'][0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--model-dir", default="smollm2",
                        help="smollm2 (default: the embedded SmolLM2-135M), tiny (8-layer random llama) or a folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-every-s", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "chaos")
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cfg = ChaosConfig(model_dir=Path(bench_model_dir(args.model_dir)), work_dir=args.out_dir / f"logs-{stamp}",
                      duration_s=args.duration_s, streams=args.streams, seed=args.seed,
                      kill_every_s=args.kill_every_s, max_tokens=args.max_tokens)
    report = run_chaos(cfg, progress=lambda line: print(line, flush=True))
    json_path = args.out_dir / f"chaos-{stamp}.json"
    json_path.write_text(report.model_dump_json(indent=1))
    plot_path = args.out_dir / f"chaos-{stamp}.png"
    plot_report(report, plot_path)
    print_report(report)
    print(f"report: {json_path}\nplot: {plot_path}\nnode logs: {cfg.work_dir}")
    sys.exit(1 if report.problems() else 0)


if __name__ == "__main__":
    main()
