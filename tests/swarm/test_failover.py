"""SIGKILL the peer serving the middle span while a stream runs: the coordinator bans it, replays the
session on a replacement, and the client's greedy stream is identical to the run without a fault.
With no replacement left, the client gets a typed 503 with Retry-After and the node stays up."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = pytest.mark.slow

SPANS = [(0, 3), (3, 5), (3, 5), (3, 5), (3, 5), (5, 8)]  # three kills, and a survivor for the last one
MESSAGES = [{"role": "user", "content": "List three colours and a number."}]
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


def _middle_peer_of_active_session(coordinator: NodeProcess, nodes: list[NodeProcess]) -> NodeProcess:
    status = _status(coordinator)
    (chain,) = status["pipeline"]["sessions"].values()
    by_peer = {p["peer_id"]: p for p in status["peers"]}
    middle = next(pid for pid in chain if by_peer[pid]["span"] == [3, 5])
    port = int(by_peer[middle]["api_address"].rsplit(":", 1)[1])
    return next(n for n in nodes if n.port == port)


@pytest.fixture(scope="module")
def expected(swarm) -> str:
    model, nodes = swarm
    client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
    text = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(set(text.split())) > 5  # a real, varied continuation, not a degenerate repeat
    return text


@pytest.mark.parametrize("kill_at", [2, 120, 270], ids=["early", "middle", "late"])
def test_sigkill_mid_stream_fails_over_and_output_is_unchanged(swarm, expected, kill_at):
    model, nodes = swarm
    coordinator = nodes[0]
    failovers_before = _status(coordinator)["pipeline"]["failovers"]
    client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    text, received, killed = "", 0, None
    started = time.monotonic()
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                received += 1
                if received == kill_at and killed is None:
                    killed = _middle_peer_of_active_session(coordinator, nodes)
                    killed.kill()
    assert killed is not None
    assert text == expected
    assert time.monotonic() - started < 60  # recovered within seconds, not a client timeout
    status = _status(coordinator)
    assert status["pipeline"]["failovers"] > failovers_before
    assert status["pipeline"]["replay_mismatches"] == 0


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
