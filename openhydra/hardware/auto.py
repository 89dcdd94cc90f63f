"""Auto-promotion wired to a running node or the CLI: detect, look the catalog up in discovery, write.

The decisions live in :mod:`openhydra.hardware.promote` (pure); this module only gathers its inputs
(the detected profile, the catalog, one discovery lookup per catalog model) and logs what it did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from openhydra.config.schema import ModelConfig
from openhydra.hardware.detect import HardwareProfile, detect
from openhydra.hardware.promote import (
    Recommendation,
    chosen_over_promotion,
    demote,
    is_promotion,
    recommend,
    swarm_coverage,
    write_override,
)
from openhydra.router.coverage import CoverageReport

log = logging.getLogger("openhydra.promotion")


class SwarmUnknown(RuntimeError):
    """No lookup answered: what the swarm serves is unknown, so nothing may be recommended from it."""


async def lookup_coverage(discovery, catalog: dict[str, ModelConfig], timeout_s: float = 10.0
                          ) -> dict[str, CoverageReport]:
    """Layer coverage of every catalog model, from one lookup each (a failed lookup counts as no peers; when every
    lookup fails, :class:`SwarmUnknown`: an unreachable DHT is not an empty swarm)."""
    from openhydra.catalog import api_name

    names = sorted({api_name(model) for model in catalog.values()})
    answers = await asyncio.gather(*(asyncio.wait_for(discovery.lookup(n), timeout_s) for n in names),
                                   return_exceptions=True)
    if names and all(isinstance(answer, BaseException) for answer in answers):
        raise SwarmUnknown(f"none of the {len(names)} lookups answered (first: {answers[0]!r})")
    records = []
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("promotion: lookup of %s failed (%s); counting it as unserved", name, answer)
            continue
        records.extend(answer)
    return swarm_coverage(records)


def promote_once(current: ModelConfig, catalog: dict[str, ModelConfig], coverage: dict[str, CoverageReport],
                 config_dir: Path, profile: HardwareProfile | None = None, by_hand: bool = False,
                 obtainable: Callable[[str], bool] | None = None, chosen: list[str] | None = None
                 ) -> tuple[Recommendation | None, Path | None]:
    """Recommend and, when it is a step up from ``current``, write the override. ``obtainable(model_id)`` (the
    automatic path passes one): whether its weights can be had at all; a model neither the hub nor the swarm can
    give is not written, since the next start could only fall back. ``chosen``: the command line's overrides that
    choose what a promotion decides; with any, nothing is written (the next start with them would not compose it)."""
    profile = profile or detect()
    log.info("hardware: %s", profile.summary())
    rec = recommend(profile, catalog, coverage)
    if rec is None:
        log.info("promotion: no catalog model fits this machine; keeping %s", current.name)
        return None, None
    if not is_promotion(rec, current):
        log.info("promotion: keeping %s (the best fit is %s)", current.name, rec.describe())
        return rec, None
    if chosen:
        log.info("promotion: %s fits; not written: the command line chooses %s, and a start with it serves what it "
                 "names (start without it, or run openhydra-node --promote, to take this one)", rec.describe(),
                 " ".join(chosen))
        return rec, None
    if obtainable is not None and not obtainable(rec.plan.model_id):
        log.info("promotion: %s fits, but not written: the model hub is unreachable, no peer serves it and no "
                 "copy of it was downloaded on this machine, so the next start could not load it", rec.describe())
        return rec, None
    path = write_override(rec, config_dir, reason="openhydra-node --promote" if by_hand else "auto-promotion")
    log.info("promotion: %s -> %s; wrote %s (the next start serves it)", current.name, rec.describe(), path)
    return rec, path


def demote_once(catalog: dict[str, ModelConfig], coverage: dict[str, CoverageReport], config_dir: Path,
                base_option: str, profile: HardwareProfile | None = None) -> tuple[str, Path | None]:
    profile = profile or detect()
    message, path = demote(profile, catalog, coverage, config_dir, base_option)
    log.info("demotion: %s", message)
    return message, path


def base_model_option() -> str:
    """The model option conf/config.yaml picks without an override (the base swarm's model)."""
    from omegaconf import OmegaConf

    from openhydra.config.load import conf_dir

    for entry in OmegaConf.load(conf_dir() / "config.yaml").get("defaults", []):
        if hasattr(entry, "get") and entry.get("model"):
            return str(entry.get("model"))
    return "qwen0.8b"


def run_action(action: str, cfg) -> int:
    """``openhydra-node action=promote|demote`` (or --promote / --demote): decide, write, print, exit code."""
    from openhydra.catalog import load_catalog
    from openhydra.config.load import user_config_dir
    from openhydra.discovery.config import DiscoveryConfig

    catalog = load_catalog()
    discovery_cfg = DiscoveryConfig.model_validate(cfg.discovery)
    coverage: dict[str, CoverageReport] = {}
    if discovery_cfg.mode != "off":
        discovery = discovery_cfg.build()

        async def gather() -> dict[str, CoverageReport]:
            await discovery.start()
            try:
                return await lookup_coverage(discovery, catalog, timeout_s=discovery_cfg.timeout_s * 2)
            finally:
                await discovery.stop()

        coverage = asyncio.run(gather())
    else:
        print("openhydra-node: discovery is off: deciding from the hardware alone (add discovery=http ... to "
              "take the swarm's coverage into account)")
    config_dir = user_config_dir()
    if action == "demote":
        message, _ = demote_once(catalog, coverage, config_dir, base_model_option())
        print(f"openhydra-node: {message}")
        return 0
    rec, path = promote_once(cfg.model, catalog, coverage, config_dir, by_hand=True)
    if rec is None:
        print("openhydra-node: no catalog model fits this machine; nothing written")
        return 1
    if path is None:
        print(f"openhydra-node: keeping {cfg.model.name}: the best fit here is {rec.describe()}")
        return 0
    print(f"openhydra-node: promoted to {rec.describe()}\n  wrote {path} (the next start composes it)")
    return 0


def _obtainable(model_id: str, coverage: dict[str, CoverageReport], probe_timeout_s: float,
                hf_id: str | None = None, cache_root: Path | None = None) -> bool:
    """Weights for ``model_id`` can be had: some peer serves it (and shares its span's weights), the hub answers,
    or a whole copy downloaded earlier is in the cache (``hf_id`` under ``cache_root``: an offline machine)."""
    report = coverage.get(model_id)
    if report is not None and report.peers > 0:
        return True
    from openhydra.runtime.source import downloaded_snapshot, hub_reachable

    if hub_reachable(timeout_s=probe_timeout_s):
        return True
    return bool(hf_id and cache_root is not None and downloaded_snapshot(hf_id, cache_root)[0] is not None)


def _command_line() -> list[str]:
    """The overrides this node was started with (Hydra's task overrides), or none outside Hydra (tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def maybe_promote_node(node) -> None:
    """After a node is ready: with hardware=auto in a swarm, recommend and maybe write, in the background."""
    cfg = node.cfg
    hardware = cfg.hardware
    if not (cfg.node.auto_promote and hardware.backend == "auto" and hardware.device == "auto"):
        return
    if not node.in_swarm or node.discovery is None or node.background is None or cfg.model.tier == "local":
        return
    if cfg.action != "serve":  # action=check builds and tries the node: it must not rewrite the user's config
        return
    chosen = chosen_over_promotion(_command_line())  # the next start with these would not compose one (cli.py)

    def work() -> None:
        from openhydra.catalog import api_name, load_catalog
        from openhydra.config.load import user_config_dir

        try:
            catalog = load_catalog()
            coverage = node.background.run(lookup_coverage(node.discovery, catalog), timeout=60)
            hub_ids = {api_name(entry): entry.hf_id for entry in catalog.values()}
            cache_root = Path(cfg.node.model_cache_dir).expanduser()

            def obtainable(model_id: str) -> bool:
                return _obtainable(model_id, coverage, cfg.node.hub_probe_timeout_s, hub_ids.get(model_id),
                                   cache_root)

            promote_once(cfg.model, catalog, coverage, user_config_dir(), chosen=chosen, obtainable=obtainable)
        except Exception as exc:  # a recommendation must never take the node down
            log.warning("promotion skipped: %s: %s", type(exc).__name__, exc)

    import threading

    threading.Thread(target=work, name="auto-promotion", daemon=True).start()
