"""``openhydra-sim``: the swarm simulator as a Hydra app (conf/sim_app.yaml + the conf/sim/ group).

    openhydra-sim                                   # 1,000 peers, one simulated hour
    openhydra-sim sim=large out_dir=/tmp/sim10k plots=true
    openhydra-sim experiment=coverage_curve sim.peers=1000 out_dir=docs/img plots=true
    openhydra-sim -m sim.churn_per_hour=0.1,1,4 sim=ci    # a sweep

Prints one JSON report; with ``out_dir`` it also writes report.json (and PNGs with plots=true).
A config error ends with one line naming the key, exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from openhydra.config.load import conf_dir
from openhydra.sim.config import SimConfig


def load_sim_config(cfg: DictConfig | dict) -> SimConfig:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    try:
        return SimConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in ("sim", *first["loc"]))
        print(f"openhydra-sim: config error: {loc}: {first['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def run(cfg: DictConfig) -> dict[str, object]:
    sim_cfg = load_sim_config(cfg.sim)
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else None
    seed = int(cfg.seed)
    if cfg.experiment == "coverage_curve":
        from openhydra.sim.curve import coverage_curve

        curve = coverage_curve(sim_cfg, sim_cfg.peers, seed=seed)
        report: dict[str, object] = curve.to_dict()
        last_auto, last_random = curve.auto[-1], curve.random[-1]
        report["summary"] = {"peers": sim_cfg.peers, "auto_evenness": round(last_auto.evenness, 4),
                             "random_evenness": round(last_random.evenness, 4),
                             "auto_complete_after": next((p.joined for p in curve.auto if p.holes == 0), None),
                             "random_complete_after": next((p.joined for p in curve.random if p.holes == 0), None)}
        if out_dir is not None and cfg.plots:
            from openhydra.sim.plots import plot_curve

            plot_curve(curve, out_dir / "scale_coverage_curve.png")
    elif cfg.experiment == "swarm":
        from openhydra.sim.engine import Simulation

        sim = Simulation(sim_cfg, seed=seed)
        sim.run()
        report = sim.report()
        if out_dir is not None and cfg.plots:
            from openhydra.sim.plots import plot_run

            main_model = next(iter(sim_cfg.request_mix))
            title = (f"{sim_cfg.peers} peers, churn {sim_cfg.churn_per_hour:.0%}/h, "
                     f"{sim_cfg.horizon_s / 60:.0f} simulated min, seed {seed}")
            plot_run(sim.metrics, title, out_dir / f"scale_run_{sim_cfg.peers}.png", main_model)
    else:
        print(f"openhydra-sim: config error: experiment: expected swarm or coverage_curve, got {cfg.experiment!r}",
              file=sys.stderr)
        raise SystemExit(2)
    text = json.dumps(report, indent=1 if cfg.experiment == "swarm" else None, default=str)
    if cfg.experiment == "coverage_curve":
        text = json.dumps(report["summary"], indent=1)
    print(text, flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"report_{cfg.experiment}_{sim_cfg.peers}.json").write_text(json.dumps(report, default=str))
    return report


def main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="sim_app")(run)()


if __name__ == "__main__":
    main()
