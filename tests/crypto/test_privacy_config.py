"""The privacy/ config group: every option composes, validates and instantiates to a PrivacyConfig."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pydantic import ValidationError

from openhydra.config.load import conf_dir
from openhydra.crypto.config import OPEN_SWARM_POW_BITS, PrivacyConfig

OPTIONS = {"off": "off", "encrypted": "encrypted", "onion": "onion", "onion_dp": "onion_dp"}


@pytest.fixture
def hydra_conf() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_option_composes_and_instantiates(hydra_conf: None, option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENHYDRA_SWARM_SECRET", raising=False)
    cfg = compose(config_name="config", overrides=[f"privacy={option}", "node.data_dir=/srv/oh"])
    data = OmegaConf.to_container(cfg.privacy, resolve=True)
    parsed = PrivacyConfig.model_validate(data)
    assert parsed.level == OPTIONS[option]
    assert parsed.identity_file.as_posix() == "/srv/oh/identity.key"
    assert parsed.swarm_secret is None
    built = instantiate(cfg.privacy)
    assert isinstance(built, PrivacyConfig) and built == parsed


def test_levels_are_what_their_names_say(hydra_conf: None) -> None:
    def load(option: str) -> PrivacyConfig:
        cfg = compose(config_name="config", overrides=[f"privacy={option}"])
        return PrivacyConfig.model_validate(OmegaConf.to_container(cfg.privacy, resolve=True))

    off, enc, onion, dp = load("off"), load("encrypted"), load("onion"), load("onion_dp")
    assert not off.encrypt_activations and not off.onion and not off.dp_enabled
    assert enc.encrypt_activations and not enc.onion and not enc.dp_enabled
    assert onion.onion and not onion.dp_enabled
    assert dp.onion and dp.dp_enabled and dp.dp_clip > 0


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_an_open_swarm_asks_for_proof_of_work_by_default(hydra_conf: None, option: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every level's default derives the difficulty from the config alone (all nodes of a swarm agree): 20 bits
    without a swarm secret, none with one (the secret admits members); an explicit number wins either way."""
    def load(*overrides: str) -> PrivacyConfig:
        cfg = compose(config_name="config", overrides=[f"privacy={option}", *overrides])
        return PrivacyConfig.model_validate(OmegaConf.to_container(cfg.privacy, resolve=True))

    monkeypatch.delenv("OPENHYDRA_SWARM_SECRET", raising=False)
    assert load().pow_difficulty_bits == "auto" and load().pow_bits == OPEN_SWARM_POW_BITS == 20
    assert load("privacy.pow_difficulty_bits=12").pow_bits == 12
    assert load("privacy.pow_difficulty_bits=0").pow_bits == 0
    monkeypatch.setenv("OPENHYDRA_SWARM_SECRET", "a-private-swarm-secret")
    assert load().pow_bits == 0 and load("privacy.pow_difficulty_bits=16").pow_bits == 16
    assert PrivacyConfig().pow_bits == OPEN_SWARM_POW_BITS  # the schema's default is the shipped one


def test_swarm_secret_from_environment_and_hidden(hydra_conf: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENHYDRA_SWARM_SECRET", "a-private-swarm-secret")
    cfg = compose(config_name="config", overrides=["privacy=encrypted"])
    parsed = PrivacyConfig.model_validate(OmegaConf.to_container(cfg.privacy, resolve=True))
    assert parsed.swarm_secret is not None
    assert parsed.swarm_secret.get_secret_value() == "a-private-swarm-secret"
    assert "a-private-swarm-secret" not in repr(parsed) and "a-private-swarm-secret" not in str(parsed)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"encrypt_activations": False, "onion": True}, "onion=true needs"),
        ({"encrypt_activations": False, "dp_sigma": 0.1}, "dp_sigma > 0 needs"),
        ({"dp_sigma": -1}, "greater than or equal"),
        ({"pow_difficulty_bits": 99}, "less than or equal"),
        ({"pow_difficulty_bits": "lots"}, "auto"),
        ({"region": "Mars Base!"}, "pattern"),
        ({"swarm_secret": "short"}, "at least 16"),
        ({"encrypt": True}, "Extra inputs"),
        ({"_target_": "os.system"}, "_target_ must be"),
    ],
)
def test_invalid_settings_rejected(override: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PrivacyConfig.model_validate(override)
