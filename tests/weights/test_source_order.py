"""Where a node's weights come from when the swarm shares them (catalog.resolve_model with a swarm fetcher).

A node serving a shard (shard=auto after auto-promotion, or a layer range) takes a hub model's span from the
swarm before downloading the whole checkpoint from the hub; a whole-model node keeps the hub first; a node
whose own source fails falls to the swarm before degrading to a fallback model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from openhydra.catalog import resolve_model
from openhydra.config.schema import ModelConfig
from openhydra.runtime.source import ModelSourceError


class Recorder:
    """A swarm fetcher that answers with a given folder (or fails) and records that it was asked."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.calls: list[str] = []

    def __call__(self, entry: ModelConfig) -> tuple[Path, str]:
        self.calls.append(entry.name or entry.hf_id or "?")
        if self.folder is None:
            raise ModelSourceError("no peer shares it")
        return self.folder, "swarm:test"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub probe answers 'unreachable' at once


def test_a_shard_node_takes_a_hub_model_from_the_swarm_first(tmp_path: Path) -> None:
    model = ModelConfig(name="big", hf_id="example/big", tier="standard")
    swarm = Recorder(tmp_path)
    choice = resolve_model(model, tmp_path, swarm_fetch=swarm, prefer_swarm=True)
    assert swarm.calls == ["big"] and choice.path == tmp_path and choice.degradation_reason is None


def test_an_unreachable_source_falls_to_the_swarm_before_degrading(tmp_path: Path) -> None:
    model = ModelConfig(name="big", hf_id="example/big", tier="standard", fallback=["smollm2-135m"])
    swarm = Recorder(tmp_path)
    choice = resolve_model(model, tmp_path, swarm_fetch=swarm)
    assert swarm.calls == ["big"] and choice.api_name == "big" and choice.degradation_reason is None


def test_swarm_only_without_discovery_is_a_clear_error(tmp_path: Path) -> None:
    model = ModelConfig(name="big", source="swarm", tier="local")
    with pytest.raises(ModelSourceError, match="needs discovery"):
        resolve_model(model, tmp_path)


def test_no_sharing_peer_and_no_hub_asks_the_swarm_once_then_fails(tmp_path: Path) -> None:
    model = ModelConfig(name="big", hf_id="example/big", tier="standard")
    swarm = Recorder(None)
    with pytest.raises(ModelSourceError, match="unreachable"):
        resolve_model(model, tmp_path, swarm_fetch=swarm, prefer_swarm=True)
    assert swarm.calls == ["big"]
