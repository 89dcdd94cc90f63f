"""The compaction/ config group composes and validates (CompactionConfig, extra='forbid')."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pydantic import ValidationError

from openhydra.runtime.compaction import CompactionConfig

CONF = Path(__file__).resolve().parents[2] / "conf"
OPTIONS = sorted(p.stem for p in (CONF / "compaction").glob("*.yaml"))


def compose_option(name: str, overrides: list[str] | None = None) -> CompactionConfig:
    # compose the group option as a primary config of the compaction/ directory
    with initialize_config_dir(config_dir=str(CONF / "compaction"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides or [])
    return CompactionConfig.from_mapping(cfg)


def test_every_option_validates() -> None:
    assert OPTIONS == ["auto", "off", "phase1", "phase2", "phase3", "phase4"]
    phases = {name: compose_option(name) for name in OPTIONS}
    assert not phases["off"].enabled
    assert (phases["phase1"].phase, phases["phase1"].fit) == (1, False)
    assert phases["phase2"].fit and phases["phase2"].mode == "prefill"
    assert phases["phase3"].budgets_path == "bench/data/budgets/smollm2-135m_r0.5.json"
    assert (phases["phase4"].mode, phases["auto"].mode) == ("auto", "auto")
    assert phases["auto"].threshold_tokens == 4096


def test_instantiate_builds_the_validated_model() -> None:
    with initialize_config_dir(config_dir=str(CONF / "compaction"), version_base="1.3"):
        cfg = compose(config_name="phase2", overrides=["ratio=0.25"])
    built = instantiate(cfg)
    assert isinstance(built, CompactionConfig) and built.ratio == 0.25


def test_bad_values_are_rejected_with_the_key_named() -> None:
    with pytest.raises(ValidationError, match="ratio"):
        CompactionConfig(mode="prefill", ratio=1.5)
    with pytest.raises(ValidationError, match="method"):
        CompactionConfig(mode="prefill", method="random")
    with pytest.raises(ValidationError, match="extra_key"):
        CompactionConfig.model_validate({"mode": "prefill", "extra_key": 1})
    with pytest.raises(ValidationError, match="budgets_path"):
        CompactionConfig(mode="prefill", phase=3)
    with pytest.raises(ValidationError, match="mode=auto is phase 4"):
        CompactionConfig(mode="auto", phase=2)
