"""Every recipe composes, validates and instantiates (build.py, as `openhydra-node +recipe=NAME` does);
the bootstrap recipe runs as a real DHT-only host that nodes announce to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import torch
from hydra import compose, initialize_config_dir

from openhydra.build import build_node
from openhydra.config.load import ConfigError, conf_dir, group_options, validate
from openhydra.runtime.backend import BackendUnavailable
from openhydra.testing.processes import NodeProcess, free_port
from openhydra.testing.wait import wait_until

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


def wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        return httpx.get(url + "/health", timeout=2).status_code == 200

    wait_until(up, timeout_s, 0.2, f"{url}/health", ignore=httpx.HTTPError)


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own waits (host up, SmolLM2 node ready, promotion line) are longer than 300 s
def test_bootstrap_host_serves_a_node_that_auto_promotes(smollm2_dir, tmp_path, monkeypatch):
    """+recipe=bootstrap as the swarm's only DHT; a hardware=auto node (SmolLM2, a catalog model served from
    a local folder) announces to it, recommends a model for this machine from the real detection and the
    DHT's coverage, logs it, and writes the override when it is a step up. Ctrl-C ends both cleanly."""
    port = free_port()
    config_dir = tmp_path / "user-config"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENHYDRA_CONFIG_DIR": str(config_dir)}
    boot_log = tmp_path / "bootstrap.log"  # a file, not a pipe read only at the end (a full pipe blocks the host)
    with open(boot_log, "wb") as log_file:
        bootstrap = subprocess.Popen([sys.executable, "-m", "openhydra.cli", "+recipe=bootstrap",
                                      f"api.port={port}", "discovery=dual", f"node.data_dir={tmp_path / 'dht'}"],
                                     stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dht = f"http://127.0.0.1:{port}"
    node = NodeProcess(["model=smollm2-135m", f"model.path={smollm2_dir}", "hardware=auto", "discovery=http",
                        f"discovery.http.urls=[{dht}]", "peer.port=0", f"node.data_dir={tmp_path / 'node'}"],
                       env={"OPENHYDRA_CONFIG_DIR": str(config_dir)}, log_path=tmp_path / "node.log")
    try:
        wait_up(dht, bootstrap)
        node.start().wait_ready(240)
        records = httpx.get(dht + "/v1/peers", params={"model_id": "openhydra-smollm2-135m"}).json()["peers"]
        assert len(records) == 1 and (records[0]["start"], records[0]["end"]) == (0, 30)
        wait_until(lambda: "promotion:" in node.log_text(), 180, 0.5, "the node's promotion line in its log")
        log = node.log_text()
        assert "hardware: cpu (" in log and "GFLOP/s matmul" in log, log[-3000:]
        line = next(x for x in log.splitlines() if "promotion:" in x)
        written = config_dir / "local" / "auto.yaml"
        if "wrote" in line:  # a step up from SmolLM2 fits this machine: the next start composes it
            option = written.read_text().split("override /model: ")[1].split()[0]
            monkeypatch.setenv("OPENHYDRA_CONFIG_DIR", str(config_dir))
            assert validate(composed([])).model.name == validate(composed([f"model={option}"])).model.name
        else:  # keeping what it serves; or not written: model= chosen on the command line, and no hub here
            assert ("keeping" in line or "not written" in line) and not written.exists(), line
        node.proc.send_signal(signal.SIGINT)
        assert node.proc.wait(timeout=60) == 0, node.log_text()[-3000:]
        assert httpx.get(dht + "/v1/peers", params={"model_id": "openhydra-smollm2-135m"}).json()["peers"] == []
    finally:
        node.stop()
        bootstrap.send_signal(signal.SIGINT)
        bootstrap.wait(timeout=60)
        out = boot_log.read_text(errors="replace")
    assert bootstrap.returncode == 0, out[-2000:]
    assert "OpenHydra DHT bootstrap host" in out and dht in out and "Traceback" not in out
    assert "kademlia   /ip4/127.0.0.1/tcp/" in out and "/p2p/" in out  # discovery=dual: a Kademlia peer too
