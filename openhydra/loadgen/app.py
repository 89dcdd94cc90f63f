"""``openhydra-bench``: the load generator as a Hydra app (conf/loadgen_app.yaml).

    openhydra-bench url=http://127.0.0.1:8080/v1 concurrency=8 duration_s=60 out_dir=/tmp/bench
    openhydra-bench num_requests=32 max_tokens=128 label=int8
    openhydra-bench -m concurrency=1,2,4,8 out_dir=/tmp/sweep     (a sweep; one sub-folder per run)

Prints a table and one JSON summary; with ``out_dir`` it also writes report.json, report.md and
report.png. A config error ends with one line naming the key, exit code 2; an unreachable target
ends with one line and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from openhydra.config.load import conf_dir
from openhydra.loadgen.config import LoadgenConfig


def load_config(cfg: DictConfig | dict) -> LoadgenConfig:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data.pop("hydra", None)
    try:
        return LoadgenConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "config"
        print(f"openhydra-bench: config error: {loc}: {first['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def run(cfg: DictConfig) -> dict:
    from openhydra.loadgen import report
    from openhydra.loadgen.metrics import summarize
    from openhydra.loadgen.runner import LoadgenError, run_load

    settings = load_config(cfg)
    try:
        records, elapsed, model, coalesced = asyncio.run(run_load(settings))
    except LoadgenError as exc:
        print(f"openhydra-bench: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    summary = summarize(records, elapsed, model=model, concurrency=settings.concurrency, label=settings.label,
                        coalesced=coalesced)
    print(report.table(summary), flush=True)
    if settings.out_dir:
        for path in report.write(summary, records, Path(settings.out_dir).expanduser()):
            print(f"wrote {path}", flush=True)
    print(json.dumps(summary.to_dict()), flush=True)
    return summary.to_dict()


def main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="loadgen_app")(run)()


if __name__ == "__main__":
    main()
