"""The `openhydra-node` command line as a user meets it: help, --cfg, one-line errors, -m sweeps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def node_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENHYDRA_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "openhydra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_groups_and_options():
    out = node_cli("--help")
    assert out.returncode == 0
    for line in ("hardware: auto, cpu, cpu_int4, cpu_int8, cuda, cuda_int8, cuda_nf4, m1, m2, m3, m4, rocm",
                 "model: llama3.1-8b, local, qwen0.8b", "shard: auto, full",
                 "economy:", "privacy:", "verification:", "compaction:", "discovery:", "api: default"):
        assert line in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = node_cli("hardware=cpu", "model=smollm2-135m", "api.port=8081", "--cfg", "job")
    assert out.returncode == 0
    assert "port: 8081" in out.stdout and "SmolLM2-135M-Instruct" in out.stdout and "device: cpu" in out.stdout


def test_version():
    out = node_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("openhydra-node ")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["hardware=tpu"], ["hardware=tpu",
                            "allowed: auto, cpu, cpu_int4, cpu_int8, cuda, cuda_int8, cuda_nf4, m1, m2, m3, m4, rocm"]),
        (["model=gpt5"], ["model=gpt5", "qwen0.8b", "smollm2-135m"]),
        (["api.prot=1"], ["api.prot", "port"]),
        (["nonsense=1"], ["nonsense", "hardware"]),
        (["api.port=abc"], ["api.port", "integer"]),
        (["hardware.dtype=float8"], ["hardware.dtype", "bfloat16"]),
        (["shard=layers"], ["shard.end"]),
        (["-m", "hardware=cpu,tpu", "action=check"], ["hardware=tpu", "allowed"]),
    ],
)
def test_bad_overrides_end_with_one_clear_line(args, fragments):
    out = node_cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_multirun_sweep_runs_every_job(tiny_model_dirs, tmp_path):
    out = node_cli("-m", "action=check", "model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu",
                   "hardware.dtype=float32,bfloat16", f"node.data_dir={tmp_path}", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    checks = [line for line in out.stdout.splitlines() if line.startswith("check ok:")]
    assert len(checks) == 2
    assert "float32" in checks[0] and "bfloat16" in checks[1]
