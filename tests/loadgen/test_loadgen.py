"""``openhydra-bench`` against real node processes (an MLX + PyTorch swarm): the report's fields are consistent."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import openai
import pytest
import torch
from openai import OpenAI
from transformers import AutoTokenizer

from openhydra.loadgen.app import load_config
from openhydra.loadgen.config import LoadgenConfig
from openhydra.loadgen.metrics import RequestRecord, percentile, summarize
from openhydra.loadgen.runner import LoadgenError, run_load
from openhydra.runtime.local_pipeline import greedy_generate
from openhydra.runtime.mlx_backend import mlx_import_error
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until

PROMPT = "The capital of France is"


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
@pytest.mark.timeout(600)  # 2 nodes + the bench + a reference run: 224 s at load average 16 on 2 cores
def test_bench_against_a_mixed_swarm(tiny_model_dirs, tmp_path):
    """A real 2-process swarm over the HTTP DHT: an MLX node (hardware=m1; mlx[cpu] here, PyTorch where mlx is
    missing) holds layers [0,4), a PyTorch node [4,8). Both coordinate the same greedy text as one in-process
    runtime; then openhydra-bench drives the MLX node's OpenAI endpoint with 3 streams."""
    model_dir = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        mlx_overrides = [("hardware=m1" if o == "hardware=cpu" else o)
                         for o in swarm_node_overrides(model_dir, dht.url, 0, 4, tmp_path / "a")]
        torch_overrides = swarm_node_overrides(model_dir, dht.url, 4, 8, tmp_path / "b")
        nodes = [NodeProcess(mlx_overrides, log_path=tmp_path / "a.log"),
                 NodeProcess(torch_overrides, log_path=tmp_path / "b.log")]
        try:
            start_all(nodes)
            served_by_mlx = "loaded llama layers [0,4) of 8 on MLX" in nodes[0].log_text()
            texts = [_complete_when_covered(OpenAI(base_url=f"{n.url}/v1", api_key="x")) for n in nodes]
            out = subprocess.run(
                [sys.executable, "-m", "openhydra.loadgen.app", f"url={nodes[0].url}/v1", "concurrency=3",
                 "duration_s=3", "max_tokens=12", f"out_dir={tmp_path / 'report'}", "label=mixed", "progress=false"],
                capture_output=True, text=True, timeout=120,
            )
        finally:
            for node in nodes:
                node.stop()
    assert served_by_mlx == (mlx_import_error() is None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    expected = tokenizer.decode(greedy_generate([ShardRuntime(model_dir)], ids, 12))
    assert texts == [expected, expected]

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
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["requests"]) == summary["completed"]
    assert (tmp_path / "report" / "report.png").stat().st_size > 10_000


def _complete_when_covered(client, timeout_s: float = 120.0) -> str:
    """Greedy completion once the node has discovered the other span (announcements take a moment):
    retried while the node answers with an error status (503 no route), up to ``timeout_s``."""
    def complete() -> list[str]:
        return [client.completions.create(model="tiny-llama-8l", prompt=PROMPT, max_tokens=12,
                                          temperature=0).choices[0].text]

    return wait_until(complete, timeout_s, 0.5, "a completion through a fully covered swarm",
                      ignore=openai.APIStatusError)[0]


def test_requests_are_distinct_so_the_node_cannot_coalesce_them(tiny_model_dirs, tmp_path):
    """One node, greedy, one prompt, 3 streams: with the prompt as given, identical requests in flight are served by
    one generation (coalescing) and the summary says how many; with ``distinct_prompts`` (the default) every
    request is computed, so the throughput is the node's own."""
    node = NodeProcess(["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "discovery=off",
                        "peer.port=0", f"node.data_dir={tmp_path / 'data'}"], log_path=tmp_path / "node.log")
    base = dict(concurrency=3, num_requests=9, max_tokens=48, prompts=["Tell me about the sea."], progress=False)
    try:
        node.start().wait_ready()
        url = f"{node.url}/v1"
        *_, coalesced_as_given = asyncio.run(run_load(LoadgenConfig(url=url, distinct_prompts=False, **base)))
        records, elapsed, model, coalesced_distinct = asyncio.run(run_load(LoadgenConfig(url=url, **base)))
    finally:
        node.stop()
    assert coalesced_as_given >= 1, coalesced_as_given  # 3 rounds of 3 identical requests sent at once
    assert coalesced_distinct == 0
    assert len(records) == 9 and all(r.ok for r in records)
    summary = summarize(records, elapsed, model=model, concurrency=3, coalesced=coalesced_as_given)
    from openhydra.loadgen import report

    assert f"the node served {coalesced_as_given} requests during the run from another" in report.table(summary)
