"""The README's "three nodes from one command" (``openhydra-node -m ... shard.index=0,1,2``), as written there, with
the walk-through's substitutions (the tiny 8-layer Llama for SmolLM2, the test DHT's URL, free ports): three jobs
ready at once on consecutive API ports, one completion through the first with the ``openai`` client, which needs
all three spans, and Ctrl-C to the launcher ends every job."""

from __future__ import annotations

import itertools
import os
import signal

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, consecutive_free_ports, start_sweep
from openhydra.testing.wait import wait_until

from .conftest import sweep_command

pytestmark = pytest.mark.slow

JOBS = 3


@pytest.mark.timeout(600)
def test_the_readme_sweep_serves_three_spans_at_once(tiny_model_dirs, tmp_path):
    args = sweep_command()
    assert args[0] == "-m" and "shard.index=0,1,2" in args, args
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        overrides = []
        for arg in args:
            key = arg.partition("=")[0]
            if key == "model":
                overrides += ["model=local", f"model.path={model}"]
            else:
                overrides.append(arg)
        overrides += [f"discovery.http.urls=[{dht.url}]", "peer.port=0"]
        port = consecutive_free_ports(JOBS)
        launcher = NodeProcess(overrides, port=port, log_path=tmp_path / "sweep.log")
        try:
            start_sweep(launcher, JOBS, timeout_s=300)  # every job ready (a launcher that exits fails it, with its log)
            spans = [httpx.get(f"http://127.0.0.1:{port + k}/v1/network/status", timeout=10).json()["model"]["span"]
                     for k in range(JOBS)]
            assert spans[0][0] == 0 and spans[-1][1] == 8 and all(
                a[1] == b[0] for a, b in itertools.pairwise(spans))
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
            reply = wait_until(lambda: client.chat.completions.create(
                model=model.name, messages=[{"role": "user", "content": "Tell me about rivers."}], max_tokens=8,
                temperature=0), 120, 0.5, "a completion through all three jobs", ignore=openai.APIError)
            assert reply.usage.completion_tokens > 0
            os.kill(launcher.proc.pid, signal.SIGINT)
            assert launcher.proc.wait(timeout=60) == 0, launcher.log_text()[-3000:]
            assert launcher.log_text().count("shutdown complete") == JOBS
        finally:
            launcher.stop()
