"""SIGKILL the peer serving the middle span while a stream runs: the coordinator bans it, replays the
session on a replacement, and the client's greedy stream is identical to the run without a fault.
With no replacement left, the client gets a typed 503 with Retry-After and the node stays up."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from openhydra.testing.failover import MESSAGES, fault_trial, stream
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = pytest.mark.slow

SPANS = [(0, 3), (3, 5), (3, 5), (3, 5), (3, 5), (5, 8)]  # three kills, and a survivor for the last one
MIDDLE = (3, 5)
MAX_TOKENS = 300  # long enough that the stream is still running when the kill lands


@pytest.fixture(scope="module")
def swarm(tiny_model_dirs, tmp_path_factory):
    model_dir = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        nodes = [NodeProcess(swarm_node_overrides(model_dir, dht.url, a, b, tmp_path_factory.mktemp(f"n{i}")))
                 for i, (a, b) in enumerate(SPANS)]
        try:
            start_all(nodes)
            yield model_dir.name, nodes
        finally:
            with ThreadPoolExecutor(len(nodes)) as pool:  # six SIGTERM waits at once, not one after another
                list(pool.map(NodeProcess.stop, nodes))


def _status(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()["swarm"]


@pytest.fixture(scope="module")
def expected(swarm) -> str:
    model, nodes = swarm
    clean = stream(nodes[0], model, MAX_TOKENS)
    assert clean.error is None and clean.completion_tokens == MAX_TOKENS
    assert len(set(clean.text.split())) > 5  # a real, varied continuation, not a degenerate repeat
    return clean.text


@pytest.mark.parametrize("kill_at", [2, 120, 270], ids=["early", "middle", "late"])
def test_sigkill_mid_stream_fails_over_and_output_is_unchanged(swarm, expected, kill_at):
    model, nodes = swarm
    coordinator = nodes[0]
    alive = [n for n in nodes[1:5] if n.proc is not None and n.proc.poll() is None]
    trial = fault_trial(coordinator, alive, MIDDLE, model, MAX_TOKENS, kill_at, signal.SIGKILL)
    assert trial.victim is not None, f"no session to kill at token {kill_at} in {trial.missed + 1} streams"
    trial.victim.proc.wait(timeout=30)
    assert trial.error is None and trial.text == expected
    assert trial.times[-1] - trial.times[0] < 60  # recovered within seconds, not a client timeout
    assert trial.failovers >= 1, f"killed at coordinator step {trial.fault_step} of {MAX_TOKENS + 1}"
    assert _status(coordinator)["pipeline"]["replay_mismatches"] == 0


def test_no_replacement_gives_typed_503_with_retry_after(swarm):
    model, nodes = swarm
    coordinator = nodes[0]
    for node in nodes[1:5]:  # whatever middle peers are still alive
        node.kill()
    started = time.monotonic()
    response = httpx.post(coordinator.url + "/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0})
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "no_route" and "3" in error["message"]
    assert elapsed < 30
    assert httpx.get(coordinator.url + "/health").status_code == 200
    # a stream that cannot start ends with an error event and [DONE], never a hang
    with httpx.stream("POST", coordinator.url + "/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": MESSAGES, "max_tokens": 4, "stream": True}) as r:
        body = r.read().decode()
    assert r.status_code in (200, 503)
    if r.status_code == 200:
        assert '"error"' in body and body.rstrip().endswith("data: [DONE]")
