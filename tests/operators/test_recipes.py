"""Every recipe composes, validates and instantiates (build.py, as `openhydra-node +recipe=NAME` does);
the bootstrap recipe runs as a real DHT-only host that nodes announce to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from hydra import compose, initialize_config_dir

from openhydra.build import build_node
from openhydra.config.load import ConfigError, conf_dir, group_options, validate
from openhydra.runtime.backend import BackendUnavailable
from openhydra.testing.processes import free_port

RECIPES = group_options("recipe")
SECRET = "a-join-secret-of-the-test-swarm"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENHYDRA_SWARM_SECRET", SECRET)
    monkeypatch.setenv("OPENHYDRA_CONFIG_DIR", str(tmp_path / "user-config"))


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_the_operator_recipes_exist():
    assert {"laptop", "gpu-shard", "private-swarm", "bootstrap", "auditor", "offline-demo"} <= set(RECIPES)
    for name in RECIPES:
        text = (conf_dir() / "recipe" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_") and f"openhydra-node +recipe={name}" in text
        assert len(text.splitlines()) <= 30, f"{name} is not short"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_instantiates(recipe, tmp_path):
    overrides = [f"+recipe={recipe}", f"node.data_dir={tmp_path}"]
    raw = composed(overrides)
    cfg = validate(raw)
    if cfg.action == "dht":  # no node to build: the process test below runs it
        return
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        with pytest.raises(Exception, match="hardware=cpu") as err:
            build_node(cfg, raw)  # a clear message on a machine without the GPU the recipe wants
        assert isinstance(err.value.__cause__, BackendUnavailable)
        raw = composed([*overrides, "hardware=cpu"])
        cfg = validate(raw)
    node = build_node(cfg, raw)
    try:
        assert node.app is not None and node.backend is not None
        if cfg.discovery.get("mode") != "off":
            assert node.discovery is not None and node.in_swarm
    finally:
        node.shutdown()


def test_gpu_shard_is_the_spec_example():
    cfg = validate(composed(["+recipe=gpu-shard"]))
    assert cfg.model.hf_id == "meta-llama/Llama-3.1-8B" and cfg.model.num_layers == 32
    assert cfg.shard.span(cfg.model.num_layers) == (0, 8)  # shard 0 of 4 = layers 0-7
    assert cfg.hardware.backend == "torch" and cfg.hardware.device == "cuda"


def test_private_swarm_needs_its_secret(monkeypatch):
    cfg = validate(composed(["+recipe=private-swarm"]))
    assert cfg.privacy["swarm_secret"] == SECRET and cfg.discovery["mode"] == "http"
    assert cfg.shard.mode == "auto"
    monkeypatch.delenv("OPENHYDRA_SWARM_SECRET")
    with pytest.raises(ConfigError, match="OPENHYDRA_SWARM_SECRET"):
        validate(composed(["+recipe=private-swarm"]))


def test_auditor_checks_every_request():
    cfg = validate(composed(["+recipe=auditor"]))
    assert cfg.verification["enabled"] and cfg.verification["sample_rate"] == 1.0
    assert cfg.verification["audit_rate"] == 1.0 and cfg.economy["hydra"] is True


def test_bootstrap_host_serves_the_dht_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "openhydra.cli", "+recipe=bootstrap", f"api.port={port}",
                             f"node.data_dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise TimeoutError("the bootstrap host did not come up")
        record = {"peer_id": "peer-a", "model_id": "m", "start": 0, "end": 4, "total_layers": 4,
                  "grpc_address": "127.0.0.1:50051", "announced_at": time.time(), "ttl_s": 60.0}
        assert httpx.post(url + "/v1/announce", json=record).json()["ok"] is True
        peers = httpx.get(url + "/v1/peers", params={"model_id": "m"}).json()["peers"]
        assert [p["peer_id"] for p in peers] == ["peer-a"]
        assert "model" not in httpx.get(url + "/health").json()  # a DHT table, not a model server
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out[-2000:]
    assert "OpenHydra DHT bootstrap host" in out and f"http://127.0.0.1:{port}" in out
    assert "Traceback" not in out
