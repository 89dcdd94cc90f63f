"""openhydra-node's Hydra launcher: a ``-m`` sweep whose jobs serve runs them all at once (openhydra/sweep.py).

Hydra finds launchers only in the ``hydra_plugins`` namespace package; conf/config.yaml makes this one the default
(``hydra/launcher: openhydra``). A sweep of jobs that end (``action=check``, ``promote``) runs them one after another,
exactly as Hydra's basic launcher does. Kept light: Hydra imports this module on every start.
"""

# No "from __future__ import annotations": Hydra runs this module before it is in sys.modules, where a dataclass
# with string annotations cannot look its module up.
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class OpenHydraLauncherConf:
    _target_: str = "hydra_plugins.openhydra_launcher.openhydra_launcher.OpenHydraLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="openhydra", node=OpenHydraLauncherConf,
                             provider="openhydra")


class OpenHydraLauncher(BasicLauncher):
    """Jobs that serve run at once, each in its own process; other sweeps run as with Hydra's basic launcher."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from openhydra.sweep import LONG_RUNNING, Job, collision_overrides, run_jobs, shared_identity

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        loader = self.hydra_context.config_loader
        configs = [loader.load_sweep_config(self.config, list(overrides)) for overrides in job_overrides]
        serving = [cfg.get("action") in LONG_RUNNING for cfg in configs]
        if not any(serving):
            return super().launch(job_overrides, initial_job_idx)
        if not all(serving):
            print(f"openhydra-node: config error: a sweep's jobs either all serve ({' or '.join(LONG_RUNNING)}: "
                  "they run at once) or none does (they run one after another); this one mixes them",
                  file=sys.stderr)
            raise SystemExit(2)

        from openhydra.preload import fork_unsafe_because, freeze, preload

        jobs, returns = [], []
        # a job started as a fresh process (where forking is unsafe) searches the launcher's --config-dir folders too
        flags = [f"--config-dir={source.path}" for source in self.config.hydra.runtime.config_sources
                 if source.provider == "command-line" and source.schema == "file"]
        for n, (overrides, cfg, extra) in enumerate(zip(job_overrides, configs, collision_overrides(configs),
                                                        strict=True)):
            idx = initial_job_idx + n
            if extra:  # composed again only where a port or data dir moved
                cfg = loader.load_sweep_config(self.config, [*overrides, *extra])
            with open_dict(cfg):
                cfg.hydra.job.id = idx
                cfg.hydra.job.num = idx
            shown = " ".join(filter_overrides(list(overrides)))
            moved = f"  (and {' '.join(extra)}: the jobs would share them otherwise)" if extra else ""
            log.info(f"\t#{idx} : {shown}{moved}")
            jobs.append(Job(index=idx, overrides=[*overrides, *extra], main=self._job_main(cfg), flags=flags))
            returns.append(JobReturn(overrides=[*overrides, *extra], cfg=cfg, status=JobStatus.COMPLETED))
        clash = shared_identity([ret.cfg for ret in returns])
        if clash is not None:
            print(f"openhydra-node: config error: {clash}", file=sys.stderr)
            raise SystemExit(2)
        unsafe = fork_unsafe_because()
        if unsafe is None:
            log.info("importing what the jobs share (torch, transformers, the node's modules: a few seconds)")
            preload()  # what every job imports, once, shared copy-on-write by the forked jobs
            freeze()
            unsafe = fork_unsafe_because()  # an import that started a thread
        if unsafe is not None:
            log.info(f"starting {len(jobs)} jobs as separate processes ({unsafe}): they share no imported modules")
        else:
            log.info(f"starting {len(jobs)} jobs, forked from this process (they share its imported modules)")
        statuses = run_jobs(jobs, fork=unsafe is None)
        failed = [job for job, status in zip(jobs, statuses, strict=True) if status != 0]
        if failed:
            print(f"openhydra-node: {len(failed)} of {len(jobs)} job(s) failed: "
                  + ", ".join(f"#{job.index} (status {job.status})" for job in failed), file=sys.stderr)
            raise SystemExit(1)
        return returns

    def _job_main(self, cfg):
        def main() -> int:
            ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=cfg,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            if ret.status == JobStatus.FAILED:
                raise ret._return_value
            return 0

        return main
