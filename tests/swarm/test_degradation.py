"""Coverage loss with degradation: when the swarm no longer covers the requested model, the coordinator
serves the nearest smaller model that a complete chain of peers covers, and says so in
X-OpenHydra-Degradation-Reason. With nothing covered, the client gets a typed 503 with Retry-After and
the node stays up."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "List three colours and a number."}]


@pytest.fixture(scope="module")
def swarm(tiny_model_dirs, tmp_path_factory):
    big, small = tiny_model_dirs["llama"], tiny_model_dirs["qwen3"]
    with DhtProcess() as dht:
        # The killed peers' records must expire fast (6 s); the coordinator, never killed, keeps a 60 s TTL
        # (re-announced every 2 s all the same), so an announce delayed on a loaded CI machine cannot make its own
        # record lapse: once, at load ~4, it was missing from a lookup and the reason read "has no peers".
        coordinator = NodeProcess(
            [*swarm_node_overrides(big, dht.url, 0, 4, tmp_path_factory.mktemp("c"), ttl_s=60.0),
             f"model.fallback=['{small}']"]
        )
        tail = NodeProcess(swarm_node_overrides(big, dht.url, 4, 8, tmp_path_factory.mktemp("t")))
        fallback = NodeProcess(swarm_node_overrides(small, dht.url, 0, 8, tmp_path_factory.mktemp("f")))
        nodes = [coordinator, tail, fallback]
        try:
            start_all(nodes)
            yield big, small, nodes
        finally:
            with ThreadPoolExecutor(len(nodes)) as pool:  # the SIGTERM waits at once, not one after another
                list(pool.map(NodeProcess.stop, nodes))


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _complete(node: NodeProcess) -> bool:
    status = httpx.get(node.url + "/v1/network/status", timeout=10).json()["swarm"]
    return bool(status["pipeline"]["coverage"]["complete"])


def _chat(node: NodeProcess, model: str) -> httpx.Response:
    return httpx.post(node.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0})


def test_coverage_loss_degrades_to_the_nearest_covered_model_then_503(swarm):
    big, small, (coordinator, tail, fallback) = swarm
    ref_big = Reference(big, torch.float32)
    ref_small = Reference(small, torch.float32)

    # Full coverage: the requested model is served, with no degradation header.
    assert httpx.get(coordinator.url + "/readyz", timeout=30).json() == {
        "status": "ready", "model": big.name, "route": "covered"}
    reply = _chat(coordinator, big.name)
    assert reply.status_code == 200, reply.text
    assert "x-openhydra-degradation-reason" not in reply.headers
    assert reply.json()["choices"][0]["message"]["content"] == ref_big.text(
        ref_big.greedy(ref_big.chat_ids(MESSAGES), 12))

    # Layers [4, 8) of the big model disappear: requests are served by the covered smaller model.
    tail.kill()
    _wait_until(lambda: not _complete(coordinator), 30, "the dead peer's record to expire")
    reply = _chat(coordinator, big.name)
    assert reply.status_code == 200, reply.text
    reason = reply.headers["x-openhydra-degradation-reason"]
    assert f"{big.name} has no peer for layers [4, 8)" in reason and small.name in reason
    body = reply.json()
    expected = ref_small.text(ref_small.greedy(ref_small.chat_ids(MESSAGES), 12))
    assert body["choices"][0]["message"]["content"] == expected  # really computed by the fallback swarm
    ready = httpx.get(coordinator.url + "/readyz", timeout=30)  # ready: a request is served, by the fallback
    assert ready.status_code == 200 and ready.json()["served_model"] == small.name, ready.text
    assert "no peer for layers [4, 8)" in ready.json()["degradation_reason"], ready.text

    # The official client, streaming, sees the same degraded answer.
    client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.chat.completions.with_raw_response.create(
        model=big.name, messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    assert small.name in stream.headers["x-openhydra-degradation-reason"]
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert text == expected

    # What the Ollama API says of the model now served: the fallback's own size, not a placeholder 0.
    show = httpx.post(coordinator.url + "/api/show", json={"model": big.name}, timeout=30).json()
    assert show["model_info"]["general.parameter_count"] == _checkpoint_parameters(small), show["model_info"]

    status = httpx.get(coordinator.url + "/v1/network/status", timeout=10).json()["swarm"]
    assert status["degradation"]["degraded_requests"] >= 2
    # degraded requests are settled too: the fallback peer earns for the layers it ran
    _wait_until(lambda: _credits(fallback) > 0, 30, "the fallback peer's settlement")

    # Nothing covered any more: a typed 503 with Retry-After, within a bounded time; the node stays up.
    fallback.kill()
    _wait_until(lambda: _chat_status(coordinator, big.name) == 503, 60, "a 503 once no model is covered")
    started = time.monotonic()
    reply = _chat(coordinator, big.name)
    assert reply.status_code == 503
    assert int(reply.headers["retry-after"]) > 0
    assert reply.json()["error"]["code"] == "no_route"
    assert time.monotonic() - started < 30
    assert httpx.get(coordinator.url + "/health", timeout=10).status_code == 200
    ready = httpx.get(coordinator.url + "/readyz", timeout=30)  # not ready: no request would be served
    assert ready.status_code == 503 and ready.json()["status"] == "no_route", ready.text
    assert ready.json()["holes"] == [[4, 8]], ready.text
    assert httpx.get(coordinator.url + "/readyz?scope=node", timeout=30).status_code == 200  # its own span is up
    # The log tells the story (the dead peers, the fallback), not one line per DHT lookup from httpx.
    log = coordinator.log_text()
    assert "HTTP Request:" not in log and "degraded" in log, log[-3000:]


def _checkpoint_parameters(folder) -> int:
    """Every tensor's element count, from the safetensors header (the tiny models tie their head: stored once)."""
    import math

    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118


def _credits(node: NodeProcess) -> int:
    return httpx.get(node.url + "/v1/account/balance", timeout=10).json()["micro"]["credits"]


def _chat_status(node: NodeProcess, model: str) -> int:
    return _chat(node, model).status_code
