"""Swarm simulation at 100 / 1,000 / 10,000 peers: route choice time, latency vs best, success.

Runs ``openhydra-sim`` for the ``sim=small``, ``sim=default`` and ``sim=large`` worlds (one simulated
hour each, 10%/h churn plus a busy peer replaced every minute), or reads their report JSON files from
``--reports DIR`` (what ``openhydra-sim sim=X out_dir=DIR`` wrote). Prints a table and writes
docs/img/scale_route_choice.png. The 10,000-peer run takes ~3 CPU minutes (longer on a shared box).

    python bench/bench_sim_scale.py [--reports /tmp/scale] [--options small default] [--no-plot]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from openhydra.config.load import conf_dir
from openhydra.sim.app import load_sim_config
from openhydra.sim.engine import Simulation

SIZES = {"small": 100, "default": 1000, "large": 10000}


def run(option: str, seed: int) -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="bench-sim"):
        cfg = load_sim_config(compose(config_name="sim_app", overrides=[f"sim={option}"]).sim)
    sim = Simulation(cfg, seed=seed)
    sim.run()
    return sim.report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=list(SIZES))
    parser.add_argument("--reports", help="read report_swarm_<peers>.json files from here instead of running")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs/img/scale_route_choice.png"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    rows = []
    cols = ("peers", "success_rate", "failed", "token_ms_p50", "best_token_ms_p50", "chosen_over_best_p99",
            "recovery_ms_p50", "recovery_ms_p99", "route_choice_cpu_ms_p50", "route_choice_cpu_ms_p99",
            "first_route_choice_cpu_ms_p99", "map_build_cpu_ms_p50")
    for option in args.options:
        if args.reports:
            r = json.loads((Path(args.reports) / f"report_swarm_{SIZES[option]}.json").read_text())
        else:
            r = run(option, args.seed)
        rows.append(r)
        print(" ".join(f"{c}={r[c]:.4g}" if isinstance(r[c], float) else f"{c}={r[c]}" for c in cols), flush=True)
    if not args.no_plot:
        from openhydra.sim.plots import plot_scale

        print(f"plot: {plot_scale(rows, Path(args.plot))}")


if __name__ == "__main__":
    main()
