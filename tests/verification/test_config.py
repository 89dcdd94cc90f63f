"""The verification/ group: every option composes and validates; bad values name the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pydantic import ValidationError

from openhydra.config.load import ConfigError, conf_dir, validate
from openhydra.verification.config import VerificationConfig


@pytest.fixture(scope="module")
def composed():
    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=["node.data_dir=/tmp/openhydra-test", "hardware=cpu", *overrides])

    return make


@pytest.mark.parametrize(("option", "rate", "enabled"), [("off", 0.10, False), ("default", 0.10, True),
                                                         ("paranoid", 0.5, True)])
def test_options_compose_and_validate(composed, option: str, rate: float, enabled: bool) -> None:
    cfg = composed(f"verification={option}")
    validate(cfg)
    v = VerificationConfig.model_validate(OmegaConf.to_container(cfg.verification))
    assert (v.sample_rate, v.enabled) == (rate, enabled)
    if option == "paranoid":  # extends default, changes a few keys
        assert (v.vote_peers, v.audit_rate, v.reputation.floor, v.tolerance.float32) == (5, 0.5, 0.62, 0.001)


def test_fault_override_and_bad_values(composed) -> None:
    cfg = composed("verification=default", "verification.fault.mode=perturb", "verification.fault.magnitude=0.2")
    v = VerificationConfig.model_validate(OmegaConf.to_container(cfg.verification))
    assert (v.fault.mode, v.fault.magnitude) == ("perturb", 0.2)
    with pytest.raises(ConfigError, match=r"verification\.sample_rate"):
        validate(composed("verification=default", "verification.sample_rate=1.5"))
    with pytest.raises(ConfigError, match=r"verification\.fault\.mode"):
        validate(composed("verification=default", "verification.fault.mode=lie"))
    with pytest.raises(ValidationError, match="odd"):
        VerificationConfig(vote_peers=4)
