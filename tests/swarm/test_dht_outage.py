"""A DHT outage does not stop a swarm whose peers are up (discovery/own_view.py): the coordinator routes over its
last good lookup's unexpired records and its own span, answers exactly as before, and goes back to the DHT when it
comes back. Real node processes and a real DHT server process, killed with SIGKILL and restarted on its port."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import torch

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name two rivers."}]
TOKENS = 10
TTL_S = 120.0  # the outage is shorter than the records' lifetime (the product's default is 180 s)
SPANS = [(0, 4), (4, 8)]


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _swarm(node: NodeProcess) -> dict:
    """The coordinator's swarm status; reading it runs a lookup once the last one is 2 s old."""
    reply = httpx.get(node.url + "/v1/network/status", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["swarm"]


def _announced_spans(dht: DhtProcess, model: str) -> set[tuple[int, int]]:
    reply = httpx.get(f"{dht.url}/v1/peers", params={"model_id": model}, timeout=5)
    return {(r["start"], r["end"]) for r in reply.json()["peers"]} if reply.status_code == 200 else set()


def test_a_dht_outage_neither_stops_nor_changes_the_answers(tiny_model_dirs, tmp_path_factory):
    model = tiny_model_dirs["llama"]
    ref = Reference(model, torch.float32)
    expected = ref.text(ref.greedy(ref.chat_ids(MESSAGES), TOKENS))
    with DhtProcess() as dht:
        nodes = [NodeProcess(swarm_node_overrides(model, dht.url, start, end, tmp_path_factory.mktemp(f"n{start}"),
                                                  ttl_s=TTL_S)) for start, end in SPANS]
        coordinator = nodes[0]
        try:
            start_all(nodes)
            client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)

            def answer(stream: bool = False) -> str:
                reply = client.chat.completions.create(model=model.name, messages=MESSAGES, max_tokens=TOKENS,
                                                       temperature=0, stream=stream)
                if stream:
                    return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
                return reply.choices[0].message.content

            _wait_until(lambda: _swarm(coordinator)["pipeline"]["coverage"]["complete"], 60, "full coverage")
            assert answer() == expected

            port = dht.port
            dht.__exit__(None, None, None)  # SIGKILL: every lookup and announce fails from here on
            _wait_until(lambda: _swarm(coordinator)["discovery"]["lookups_without_dht"] > 0, 60,
                        "a lookup that finds no DHT")
            assert answer(stream=True) == expected
            assert answer() == expected
            _wait_until(lambda: _swarm(coordinator)["discovery"]["lookups_without_dht"] > 1, 60,
                        "a second lookup without the DHT")
            status = _swarm(coordinator)
            assert status["pipeline"]["coverage"]["complete"], status["pipeline"]["coverage"]
            assert {tuple(p["span"]) for p in status["peers"]} == set(SPANS)
            assert status["discovery"]["dht"] == "unreachable", status["discovery"]
            assert answer() == expected
            metrics = httpx.get(coordinator.url + "/metrics", timeout=10).text
            counted = [line for line in metrics.splitlines()
                       if line.startswith('openhydra_discovery_lookups_total{outcome="without_dht"}')]
            assert counted and float(counted[0].split()[-1]) >= 2, counted

            with DhtProcess(port=port) as again:  # back, empty: the nodes' announcers fill it again
                _wait_until(lambda: _announced_spans(again, model.name) == set(SPANS), 60,
                            "both nodes to announce to the restarted DHT")
                answered = _swarm(coordinator)["discovery"]["lookups"]
                _wait_until(lambda: _swarm(coordinator)["discovery"]["lookups"] > answered, 60,
                            "a lookup the restarted DHT answers")
                assert answer() == expected
                status = _swarm(coordinator)
                assert status["pipeline"]["coverage"]["complete"] and status["discovery"]["dht"] == "reachable"
        finally:
            for node in nodes:
                node.stop()
