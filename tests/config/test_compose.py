"""Every option of every group composes and validates; recipes compose; targets bind to their signatures."""

from __future__ import annotations

import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import OmegaConf

from openhydra.config.load import GROUPS, ConfigError, conf_dir, group_options, validate
from openhydra.runtime.backend import BackendUnavailable, make_backend

# Options that need a value the user must supply.
REQUIRED = {
    ("model", "local"): ["model.path=/models/some-folder"],
    ("shard", "layers"): ["shard.end=8"],
    ("shard", "index"): ["shard.total=4"],
    ("speculative", "draft"): ["model.draft=smollm2-135m"],
}
ALL_OPTIONS = [(g, o) for g in GROUPS for o in group_options(g)]
RECIPES = group_options("recipe")


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"group {group} has no options"


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_every_option_composes_and_validates(group, option):
    cfg = composed([f"{group}={option}", *REQUIRED.get((group, option), [])])
    node = validate(cfg)
    assert getattr(node, group) is not None
    target = OmegaConf.select(cfg, f"{group}._target_")
    if target:  # the target exists and accepts exactly the keys the option sets (torchtune-style bind)
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg[group], resolve=True).items() if k != "_target_"}
        signature = inspect.signature(get_method(target))
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            signature.bind(**kwargs)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe, monkeypatch):
    monkeypatch.setenv("OPENHYDRA_SWARM_SECRET", "x" * 16)  # private-swarm reads its join secret from the env
    node = validate(composed([f"+recipe={recipe}"]))
    assert node.model.tier


def test_recipes_exist_for_operators():
    assert {"laptop", "offline-demo", "gpu-shard", "private-swarm", "bootstrap", "auditor"} <= set(RECIPES)
    # instantiated one by one, and the bootstrap host run, in tests/operators/test_recipes.py


@pytest.mark.parametrize("option", ["auto", "cpu", "m1", "m2", "m3", "m4"])
def test_cpu_capable_hardware_options_instantiate_here(option):
    cfg = composed([f"hardware={option}"])
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.hardware).items() if k != "_target_"}
    backend = make_backend(**kwargs)
    assert backend.device == "cpu"
    if option.startswith("m"):
        assert backend.note and "MLX" in backend.note  # says why it is not MLX


@pytest.mark.parametrize("option", ["cuda", "rocm"])
def test_gpu_options_fail_clearly_without_a_gpu(option):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = composed([f"hardware={option}"])
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.hardware).items() if k != "_target_"}
    with pytest.raises(BackendUnavailable, match="hardware=cpu"):
        make_backend(**kwargs)


def test_shard_spans():
    node = validate(composed(["shard=index", "shard.index=1", "shard.total=4"]))
    assert node.shard.span(32) == (8, 16)
    node = validate(composed(["shard=layers", "shard.start=15", "shard.end=30"]))
    assert node.shard.span(30) == (15, 30)
    with pytest.raises(ValueError, match="past the model"):
        node.shard.span(20)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["api.port=99999"], "api.port"),
        (["action=dance"], "'serve', 'check', 'promote', 'demote' or 'dht'"),
        (["shard=layers", "shard.start=9", "shard.end=3"], "shard.end must be > shard.start"),
        (["model=local"], "model.path"),
        (["node.peer_id=alice"], "derived from the identity key"),
        (["api.bearer_token=hunter2"], "api.bearer_token: must be at least 16 characters"),
    ],
)
def test_invalid_values_fail_validation_with_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        validate(composed(overrides))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_a_wrong_secret_is_named_but_not_echoed():
    with pytest.raises(ConfigError) as err:
        validate(composed(["api.bearer_token=hunter2-short"]))
    assert "api.bearer_token" in str(err.value) and "hunter2" not in str(err.value)
