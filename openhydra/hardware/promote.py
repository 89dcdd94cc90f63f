"""Auto-promotion: which catalog model this machine should serve, and the override file that says so.

Pure logic over three inputs: a :class:`~openhydra.hardware.detect.HardwareProfile`, the model catalog
(``conf/model/*.yaml`` through :func:`openhydra.catalog.load_catalog`) and the swarm's layer coverage
per model (:class:`openhydra.router.coverage.CoverageReport`, built from discovery records).

Memory math, per catalog entry: weights = parameters x bytes per weight, where the bytes follow the
tier's quantization as this backend can run it (int4 -> NF4 0.5 B, int8 1 B, anything else the 16-bit
runtime dtype, 2 B; MLX has no quantization here, so 2 B). Serving needs weights x (1 + overhead) plus a
fixed overhead (runtime, caches, activations). A model fits *whole* when that is within the budget; it
fits *as a shard* when the fraction of its layers that fits is at least ``1 / peers`` of the catalog's
plan (a 27B planned as 4 x 16 GB needs a quarter per node). A plan must also keep the measured
bandwidth's decode estimate (bandwidth / bytes read per token) above ``min_tokens_per_s``.

Choice: among the plans that fit, models the swarm lacks come first (uncovered layers, or fewer than
``target_replicas`` peers on some layer), then the larger tier, then whole before shard, then more
parameters. The result is written as ``local/auto.yaml`` in the user's config dir: the optional
``local`` entry of conf/config.yaml's defaults list, composed by the next start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field

from openhydra.config.schema import ModelConfig
from openhydra.discovery.records import PeerAnnouncement
from openhydra.hardware.detect import GIB, HardwareProfile
from openhydra.router.coverage import CoverageReport, LayerCoverageMap

TIER_RANK = {"local": 0, "embedded": 1, "basic": 2, "standard": 3, "advanced": 4, "frontier": 5}
_QUANTIZATION = {"int4": ("nf4", 0.5), "int8": ("int8", 1.0)}  # catalog quantization -> (hardware setting, bytes)
OVERRIDE_NAME = "auto.yaml"


class PromotionPolicy(BaseModel):
    """Tunables of the memory math (bytes, fractions, tokens/s)."""

    model_config = ConfigDict(extra="forbid")

    overhead_fraction: float = Field(0.2, ge=0)  # extra over the weights: KV cache, activations, fragmentation
    overhead_bytes: int = Field(512 << 20, ge=0)  # fixed: Python, torch, tokenizer, gRPC buffers
    reserve_bytes: int = Field(1 * GIB, ge=0)  # RAM left to the OS and other programs (CPU and MLX only)
    gpu_usable_fraction: float = Field(0.9, gt=0, le=1)  # of a discrete GPU's memory
    target_replicas: int = Field(2, ge=1)  # a layer with fewer peers than this counts as lacking
    min_tokens_per_s: float = Field(2.0, ge=0)  # estimated decode rate through the span, at least


class Plan(BaseModel):
    """How this machine could serve one catalog model."""

    model_config = ConfigDict(extra="forbid")

    option: str  # catalog option name (conf/model/<option>.yaml)
    model_id: str  # the name peers announce
    tier: str
    params_b: float
    quantization: str  # hardware.quantization: none | int8 | nf4
    weight_bytes: int  # the whole model's weights at that quantization
    need_bytes: int  # to serve it whole
    budget_bytes: int
    fraction: float  # of the layers that fits (1.0: whole)
    whole: bool
    fits: bool
    est_tokens_per_s: float  # measured bandwidth / bytes read per token for the span
    swarm_lacks: bool
    swarm_note: str
    why_not: str | None = None


class Recommendation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: Plan
    candidates: list[Plan]  # every catalog entry considered, best first
    hardware: str  # the profile's one-line summary

    @property
    def shard(self) -> dict:
        if self.plan.whole:
            return {"mode": "full"}
        return {"mode": "auto", "max_fraction": round(self.plan.fraction, 4)}

    def describe(self) -> str:
        p = self.plan
        span = "the whole model" if p.whole else f"a shard of up to {p.fraction:.0%} of its layers"
        return (f"{p.option} ({p.model_id}, {p.tier} tier, {p.params_b:g}B, quantization={p.quantization}): "
                f"{span}; needs {p.need_bytes / GIB:.1f} GiB whole, budget {p.budget_bytes / GIB:.1f} GiB, "
                f"~{p.est_tokens_per_s:.1f} tok/s; swarm: {p.swarm_note}")


def memory_budget(profile: HardwareProfile, policy: PromotionPolicy) -> int:
    """Bytes this node may fill with one model."""
    if profile.backend in ("cuda", "rocm") and profile.accelerator_memory_bytes:
        return int(profile.serving_memory_bytes * policy.gpu_usable_fraction)
    return max(0, profile.serving_memory_bytes - policy.reserve_bytes)


def weight_format(model: ModelConfig, backend: str) -> tuple[str, float]:
    """(hardware.quantization, bytes per weight) for serving ``model`` on ``backend``."""
    if backend != "mlx" and model.quantization in _QUANTIZATION:
        return _QUANTIZATION[model.quantization]
    return "none", 2.0


def swarm_need(report: CoverageReport | None, target_replicas: int) -> tuple[bool, str]:
    """(does the swarm lack this model, a short note)."""
    if report is None or report.peers == 0:
        return True, "no peers serve it"
    if report.holes:
        missing = sum(b - a for a, b in report.holes)
        return True, f"{missing} of {report.total_layers} layers uncovered"
    thin = min(report.counts)
    if thin < target_replicas:
        return True, f"complete, but some layers have only {thin} peer(s)"
    return False, f"complete with at least {thin} peers per layer"


def plan_for(option: str, model: ModelConfig, profile: HardwareProfile, report: CoverageReport | None,
             policy: PromotionPolicy) -> Plan | None:
    if model.params_b is None or model.tier not in TIER_RANK:
        return None
    from openhydra.catalog import api_name

    quantization, bpw = weight_format(model, profile.backend)
    weights = int(model.params_b * 1e9 * bpw)
    scaled = weights * (1 + policy.overhead_fraction)
    need = int(scaled + policy.overhead_bytes)
    budget = memory_budget(profile, policy)
    fraction = max(0.0, min(1.0, (budget - policy.overhead_bytes) / scaled)) if scaled else 1.0
    whole = need <= budget
    layers = report.total_layers if report is not None and report.total_layers else model.num_layers
    if layers and not whole:  # whole layers only
        fraction = math.floor(fraction * layers) / layers
    lacks, note = swarm_need(report, policy.target_replicas)
    rate = profile.memory_bandwidth_gbs * 1e9 / max(1.0, weights * (1.0 if whole else fraction))
    why_not = None
    if not whole and fraction < 1.0 / model.peers:
        why_not = (f"{fraction:.0%} of it fits; the catalog plans {model.peers} peer(s), "
                   f"so a node needs at least {1 / model.peers:.0%}")
    elif profile.memory_bandwidth_gbs > 0 and rate < policy.min_tokens_per_s:
        why_not = f"~{rate:.1f} tok/s from {profile.memory_bandwidth_gbs:g} GB/s is below {policy.min_tokens_per_s:g}"
    return Plan(option=option, model_id=api_name(model), tier=model.tier, params_b=model.params_b,
                quantization=quantization, weight_bytes=weights, need_bytes=need, budget_bytes=budget,
                fraction=1.0 if whole else round(fraction, 4), whole=whole, fits=why_not is None,
                est_tokens_per_s=round(rate, 2), swarm_lacks=lacks, swarm_note=note, why_not=why_not)


def _rank(plan: Plan) -> tuple:
    return (plan.fits, plan.swarm_lacks, TIER_RANK[plan.tier], plan.whole, plan.params_b)


def recommend(profile: HardwareProfile, catalog: Mapping[str, ModelConfig],
              coverage: Mapping[str, CoverageReport], policy: PromotionPolicy | None = None) -> Recommendation | None:
    """The best plan for this machine, or None when no catalog model fits at all.

    ``coverage`` is keyed by the announced model id (``api_name`` of the entry).
    """
    from openhydra.catalog import api_name

    policy = policy or PromotionPolicy()
    plans = [p for option, model in catalog.items()
             if (p := plan_for(option, model, profile, coverage.get(api_name(model)), policy)) is not None]
    plans.sort(key=_rank, reverse=True)
    if not plans or not plans[0].fits:
        return None
    return Recommendation(plan=plans[0], candidates=plans, hardware=profile.summary())


def is_promotion(rec: Recommendation, current: ModelConfig) -> bool:
    """Is the recommendation a step up from what the node serves now (a larger tier, or more parameters)?"""
    now = (TIER_RANK.get(current.tier, 0), current.params_b or 0.0)
    return (TIER_RANK[rec.plan.tier], rec.plan.params_b) > now


def swarm_coverage(records: Iterable[PeerAnnouncement], now: float | None = None) -> dict[str, CoverageReport]:
    """Per-model layer coverage (keyed by announced model id) from discovery records."""
    by_model: dict[str, list[PeerAnnouncement]] = {}
    for record in records:
        by_model.setdefault(record.model_id, []).append(record)
    return {model_id: LayerCoverageMap(group, model_id=model_id, now=now).coverage()
            for model_id, group in by_model.items()}


# -- the override file ---------------------------------------------------------------------------------

def override_path(config_dir: Path) -> Path:
    return Path(config_dir) / "local" / OVERRIDE_NAME


_DECIDED_BY_PROMOTION = {"model", "shard", "hardware", "hardware.quantization", "hardware.device", "hardware.backend",
                         "hardware.dtype"}


def chosen_over_promotion(overrides: list[str]) -> list[str]:
    """The command-line overrides that choose what a promotion decides (the model, its span, its quantization).

    With any of them the saved promotion is not composed at all (cli.py adds ``~local``): its quantization and span
    size belong to the model it chose, and applied to another (``model=X`` beats its ``override /model``, but its
    ``hardware.quantization`` would still apply) they give neither what was asked nor what it promised. Any
    ``model.*`` or ``shard.*`` key counts (``model.path=``, ``shard.start=``). ``hardware=auto`` asks for what
    promotion does, so it does not count.
    """
    chosen = []
    for text in overrides:
        raw, _, value = text.partition("=")
        key = raw.lstrip("+~")
        if key == "hardware" and value == "auto":
            continue
        if key in _DECIDED_BY_PROMOTION or key.startswith(("model.", "shard.")):
            chosen.append(text)
    return chosen


def render_override(rec: Recommendation, reason: str = "auto-promotion") -> str:
    p = rec.plan
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    shard = rec.shard
    lines = [
        "# @package _global_",
        f"# Written by openhydra-node ({reason}) at {stamp}. The next start composes it (the optional",
        "# `local: auto` entry of conf/config.yaml). Step down: openhydra-node --demote; undo: delete this file.",
        f"# hardware: {rec.hardware}",
        f"# choice: {rec.describe()}",
        "defaults:",
        f"  - override /model: {p.option}",
        f"  - override /shard: {'full' if p.whole else 'auto'}",
        "",
        "hardware:",
        f"  quantization: {p.quantization}",
    ]
    if not p.whole:
        lines += ["shard:", f"  max_fraction: {shard['max_fraction']}"]
    return "\n".join(lines) + "\n"


def write_override(rec: Recommendation, config_dir: Path, reason: str = "auto-promotion") -> Path:
    path = override_path(config_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_override(rec, reason))
    tmp.replace(path)  # atomic: a start never composes half a file
    return path


def current_override(config_dir: Path) -> str | None:
    """The catalog option the override promotes to, or None when there is no override."""
    path = override_path(config_dir)
    if not path.exists():
        return None
    for entry in OmegaConf.load(path).get("defaults", []) or []:
        text = str(entry)
        if "/model" in text:  # {'override /model': 'qwen9b'}
            return str(next(iter(entry.values()))) if hasattr(entry, "values") else text.split(":")[-1].strip()
    return None


def demote(profile: HardwareProfile, catalog: Mapping[str, ModelConfig], coverage: Mapping[str, CoverageReport],
           config_dir: Path, base_option: str, policy: PromotionPolicy | None = None) -> tuple[str, Path | None]:
    """Step the override one tier down (the best plan below the current one), or remove it.

    Returns (what happened, the override path or None when it was removed). ``base_option`` is the model
    the main config serves without an override: stepping down to it (or below) removes the file.
    """
    current = current_override(config_dir)
    path = override_path(config_dir)
    if current is None or current not in catalog:
        if path.exists():
            path.unlink()
            return f"removed {path} (it named no catalog model)", None
        return "no override to demote; the node serves the main config's model", None
    rec = recommend(profile, catalog, coverage, policy)
    now = catalog[current]
    below = [p for p in (rec.candidates if rec else [])
             if p.fits and (TIER_RANK[p.tier], p.params_b) < (TIER_RANK[now.tier], now.params_b or 0.0)]
    base = catalog.get(base_option)
    base_key = (TIER_RANK[base.tier], base.params_b or 0.0) if base else (0, 0.0)
    below = [p for p in below if (TIER_RANK[p.tier], p.params_b) > base_key]
    below.sort(key=lambda p: (TIER_RANK[p.tier], p.params_b, p.whole), reverse=True)  # the next one down
    if not below:
        path.unlink()
        return f"removed {path}: back to the main config's model ({base_option})", None
    step = Recommendation(plan=below[0], candidates=below, hardware=profile.summary())
    write_override(step, config_dir, reason=f"demoted from {current}")
    return f"demoted {current} -> {step.plan.option}: {step.describe()}", path
