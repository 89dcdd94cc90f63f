"""The economy/ config group: every option composes, validates and builds the right object."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pydantic import ValidationError

from openhydra.crypto.identity import Identity
from openhydra.economy import Economy, EconomyConfig, EconomyDisabled, OffEconomy, build_settlement
from openhydra.economy.factory import build_economy

CONF = Path(__file__).resolve().parents[2] / "conf"
OPTIONS = ["off", "barter", "hydra", "postgres"]


def _compose(option: str, *extra: str) -> dict:
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"economy={option}", *extra])
    return OmegaConf.to_container(cfg.economy, resolve=True)  # type: ignore[return-value]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_validates(option: str, tmp_path: Path) -> None:
    raw = _compose(option, f"node.data_dir={tmp_path}")
    cfg = EconomyConfig.model_validate(raw)
    assert cfg.target == "openhydra.economy.factory.build_economy"
    assert cfg.mode == {"off": "off", "barter": "barter", "hydra": "hydra", "postgres": "hydra"}[option]
    if option != "off":
        assert (cfg.decay_per_day, cfg.tokens_per_credit, cfg.supply_cap) == (0.05, 1000, 69_000_000)
        assert (cfg.channel_ttl_s, cfg.max_channels_per_peer, cfg.sqlite_synchronous) == (900, 8, "FULL")


def test_barter_ledger_lives_in_the_node_data_dir(tmp_path: Path) -> None:
    raw = _compose("barter", f"node.data_dir={tmp_path}")
    assert EconomyConfig.model_validate(raw).resolved_db_url() == f"sqlite:///{tmp_path / 'ledger.db'}"
    economy = instantiate(raw, identity=Identity.generate())
    assert isinstance(economy, Economy) and economy.enabled and economy.mode == "barter"
    assert (tmp_path / "ledger.db").exists()
    economy.close()


def test_default_data_dir_is_home_openhydra() -> None:
    raw = _compose("barter")
    expected = os.environ.get("OPENHYDRA_HOME", "~/.openhydra")
    assert raw["data_dir"] == expected
    assert EconomyConfig.model_validate(raw).resolved_db_url().endswith("/ledger.db")


def test_hydra_option_builds_the_token_economy(tmp_path: Path) -> None:
    node = Identity.generate()
    economy = instantiate(_compose("hydra", f"node.data_dir={tmp_path}"), identity=node)
    assert economy.hydra_enabled and economy.peer_id == node.peer_id
    economy.settle(build_settlement("r1", "m", 3000, [(node, 1)]))
    assert economy.stake(2_000_000) == 2_000_000
    assert economy.stake_of(node.peer_id) == 2_000_000
    assert economy.slash(node.peer_id, 500_000, "failed audit") == 500_000
    assert economy.status()["hydra"]["staked"] == 1.5
    economy.close()


def test_barter_has_no_stake_to_slash(tmp_path: Path) -> None:
    node = Identity.generate()
    economy = instantiate(_compose("barter", f"node.data_dir={tmp_path}"), identity=node)
    assert economy.slash(node.peer_id, 10, "failed audit") == 0
    assert economy.stake_of(node.peer_id) == 0
    with pytest.raises(EconomyDisabled):
        economy.stake(1)
    economy.close()


def test_off_records_nothing(tmp_path: Path) -> None:
    node = Identity.generate()
    economy = instantiate(_compose("off", f"node.data_dir={tmp_path}"), identity=node)
    assert isinstance(economy, OffEconomy) and economy.enabled is False
    assert economy.settle(build_settlement("r1", "m", 3000, [(node, 1)])) is None
    assert economy.balance(node.peer_id).credits == 0
    assert economy.status() == {"enabled": False, "mode": "off"}
    assert economy.slash(node.peer_id, 5, "x") == 0 and economy.stake_of(node.peer_id) == 0
    for refused in (lambda: economy.stake(1), lambda: economy.open_channel("p", 1)):
        with pytest.raises(EconomyDisabled):
            refused()
    assert list(tmp_path.iterdir()) == []


def test_postgres_without_url_says_which_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OPENHYDRA_PG_URL", raising=False)
    raw = _compose("postgres", f"node.data_dir={tmp_path}")
    assert raw["db_url"] is None and raw["backend"] == "postgres"
    with pytest.raises(ValueError, match=r"economy\.db_url"):
        build_economy(Identity.generate(), **{k: v for k, v in raw.items() if k != "_target_"})


@pytest.mark.skipif(not os.environ.get("OPENHYDRA_TEST_PG_URL"), reason="OPENHYDRA_TEST_PG_URL not set")
def test_postgres_option_builds_on_a_server(tmp_path: Path) -> None:
    url = os.environ["OPENHYDRA_TEST_PG_URL"]
    economy = instantiate(_compose("postgres", f"economy.db_url={url}"), identity=Identity.generate())
    assert economy.ledger.backend == "postgresql" and economy.status()["backend"] == "postgresql"
    economy.close()


@pytest.mark.parametrize(
    "change,key",
    [
        ({"decay": 0.1}, "decay"),
        ({"decay_per_day": 1.5}, "decay_per_day"),
        ({"tokens_per_credit": 0}, "tokens_per_credit"),
        ({"max_channels_per_peer": 0}, "max_channels_per_peer"),
        ({"sqlite_synchronous": "OFF"}, "sqlite_synchronous"),
        ({"db_url": "mysql://x"}, "db_url"),
    ],
)
def test_bad_keys_are_named(change: dict, key: str) -> None:
    raw = {"_target_": "openhydra.economy.factory.build_economy", "hydra": True, **change}
    with pytest.raises(ValidationError, match=key):
        EconomyConfig.model_validate(raw)
