"""``openhydra-bench`` against a real node process: the report's fields are present and consistent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from openhydra.loadgen.app import load_config
from openhydra.loadgen.config import LoadgenConfig
from openhydra.loadgen.metrics import RequestRecord, percentile, summarize
from openhydra.loadgen.runner import LoadgenError, run_load
from openhydra.runtime.mlx_backend import mlx_import_error
from openhydra.testing.processes import NodeProcess


def test_summary_follows_serving_benchmark_definitions():
    a = RequestRecord(started=0.0, ttft_s=0.1, e2e_s=0.5, chunk_times=[0.1, 0.2, 0.5], output_tokens=3)
    b = RequestRecord(started=0.1, ttft_s=0.3, e2e_s=0.4, chunk_times=[0.3, 0.4], output_tokens=2)
    failed = RequestRecord(started=0.2, error="APIConnectionError: boom")
    s = summarize([a, b, failed], 2.0, model="m", concurrency=2)
    assert (s.completed, s.failed, s.output_tokens) == (2, 1, 5)
    assert s.output_throughput == 2.5 and s.request_throughput == 1.0
    assert s.ttft_ms["p50"] == pytest.approx(200.0)  # median of 100 and 300 ms
    assert s.tpot_ms["mean"] == pytest.approx(150.0)  # (0.5-0.1)/2 = 200 ms and (0.4-0.3)/1 = 100 ms
    assert sorted(round(x, 3) for x in a.itls() + b.itls()) == [0.1, 0.1, 0.3]
    assert s.itl_ms["p99"] == pytest.approx(1000 * percentile([0.1, 0.3, 0.1], 99))
    assert s.errors == ["APIConnectionError: boom"]


def test_config_errors_and_unreachable_target_are_one_line(capsys):
    with pytest.raises(SystemExit) as bad:
        load_config({"concurrency": 0})
    assert bad.value.code == 2 and "concurrency" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config({"url": "ftp://x"})
    cfg = LoadgenConfig(url="http://127.0.0.1:9/v1", progress=False, duration_s=1)
    with pytest.raises(LoadgenError, match="cannot reach"):
        asyncio.run(run_load(cfg))


@pytest.mark.slow
def test_bench_against_a_real_node(tiny_model_dirs, tmp_path):
    # hardware=m1: the node serves through the MLX backend (mlx[cpu] here) when mlx is installed, else PyTorch.
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=m1", "hardware.dtype=float32",
                 f"node.data_dir={tmp_path}", "api.rate_limit_requests=100000", "peer.port=0"]
    with NodeProcess(overrides, log_path=tmp_path / "node.log") as node:
        out = subprocess.run(
            [sys.executable, "-m", "openhydra.loadgen.app", f"url={node.url}/v1", "concurrency=3", "duration_s=3",
             "max_tokens=12", f"out_dir={tmp_path / 'report'}", "label=tiny", "progress=false"],
            capture_output=True, text=True, timeout=120,
        )
        served_by_mlx = "loaded llama layers [0,8) of 8 on MLX" in node.log_text()
    assert served_by_mlx == (mlx_import_error() is None)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert "| TTFT |" in out.stdout and "output throughput" in out.stdout
    assert summary["failed"] == 0 and summary["completed"] >= 3
    assert summary["concurrency"] == 3 and summary["duration_s"] >= 3
    assert 0 < summary["output_tokens"] <= 12 * summary["completed"]
    assert summary["output_throughput"] == pytest.approx(summary["output_tokens"] / summary["duration_s"], rel=1e-2)
    for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        stats = summary[metric]
        assert 0 < stats["p50"] <= stats["p99"], (metric, stats)
    assert summary["ttft_ms"]["p50"] < summary["e2e_ms"]["p50"]
    assert summary["e2e_ms"]["p99"] < 1000 * summary["duration_s"] + 120_000
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["requests"]) == summary["completed"]
    assert (tmp_path / "report" / "report.png").stat().st_size > 10_000
