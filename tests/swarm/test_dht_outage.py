"""A DHT outage does not stop a swarm whose peers are up (discovery/own_view.py): the coordinator routes over its
last good lookup's unexpired records and its own span, answers exactly as before, and goes back to the DHT when it
comes back. Real node processes and a real DHT server process, killed with SIGKILL and restarted on its port,
three times over."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name two rivers."}]
TOKENS = 10
LONG_TOKENS = 48  # the stream during which the DHT dies
CYCLES = 3  # kills and restarts of the DHT
TTL_S = 120.0  # the outage is shorter than the records' lifetime (the product's default is 180 s)
SPANS = [(0, 4), (4, 8)]


def _swarm(node: NodeProcess) -> dict:
    """The coordinator's swarm status; reading it runs a lookup once the last one is 2 s old."""
    reply = httpx.get(node.url + "/v1/network/status", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["swarm"]


def _announced_spans(dht: DhtProcess, model: str) -> set[tuple[int, int]]:
    reply = httpx.get(f"{dht.url}/v1/peers", params={"model_id": model}, timeout=5)
    return {(r["start"], r["end"]) for r in reply.json()["peers"]} if reply.status_code == 200 else set()


def _answered_lookups(node: NodeProcess) -> float:
    """The node's DHT lookups so far, from /metrics (which, unlike the status, makes none)."""
    for line in httpx.get(node.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('openhydra_discovery_lookups_total{outcome="answered"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_dht_outage_neither_stops_nor_changes_the_answers(tiny_model_dirs, tmp_path_factory):
    """CYCLES times: the DHT is killed while a stream runs (after its first chunk), requests are served without it
    (streamed and not), then it comes back on its port and the nodes are seen through it again. Every answer of every
    cycle is counted; all must equal the reference."""
    model = tiny_model_dirs["llama"]
    ref = Reference(model, torch.float32)
    expected = ref.text(ref.greedy(ref.chat_ids(MESSAGES), TOKENS))
    expected_long = ref.text(ref.greedy(ref.chat_ids(MESSAGES), LONG_TOKENS))
    dht = DhtProcess().__enter__()
    port = dht.port
    nodes = [NodeProcess(swarm_node_overrides(model, dht.url, start, end, tmp_path_factory.mktemp(f"n{start}"),
                                              ttl_s=TTL_S)) for start, end in SPANS]
    coordinator = nodes[0]
    answers: dict[str, list[bool]] = {"while the DHT dies": [], "without the DHT": [], "after it is back": [],
                                      "without the DHT, through the node that had only been a peer": []}
    try:
        start_all(nodes)
        client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)
        peer_client = openai.OpenAI(base_url=nodes[1].url + "/v1", api_key="x", max_retries=0, timeout=120)

        def answer(stream: bool = False, client: openai.OpenAI = client) -> str:
            reply = client.chat.completions.create(model=model.name, messages=MESSAGES, max_tokens=TOKENS,
                                                   temperature=0, stream=stream)
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
            return reply.choices[0].message.content

        def discovery() -> dict:
            return _swarm(coordinator)["discovery"]

        wait_until(lambda: _swarm(coordinator)["pipeline"]["coverage"]["complete"], 60, 0.5, "full coverage")
        # The other node looks the swarm up by itself, with no request and nothing reading its status (which would
        # look up): a lookup after both records are in the DHT. Before refresh_if_idle it made none at all.
        wait_until(lambda: _announced_spans(dht, model.name) == set(SPANS), 60, 0.5, "both nodes announced")
        looked_up = _answered_lookups(nodes[1])
        wait_until(lambda: _answered_lookups(nodes[1]) > looked_up, 60, 0.5, "a lookup by the node that is only a peer")
        assert answer() == expected
        for _cycle in range(CYCLES):
            stream = client.chat.completions.create(model=model.name, messages=MESSAGES, max_tokens=LONG_TOKENS,
                                                    temperature=0, stream=True)
            text = ""
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if not text:  # the first token is out: the DHT dies now (SIGKILL), mid-stream
                        dht.__exit__(None, None, None)
                    text += chunk.choices[0].delta.content
            answers["while the DHT dies"].append(text == expected_long)
            without = discovery()["lookups_without_dht"]
            wait_until(lambda w=without: discovery()["lookups_without_dht"] > w, 60, 0.5, "a lookup without the DHT")
            answers["without the DHT"] += [answer(stream=True) == expected, answer() == expected]
            # The other node had never coordinated a request before the first outage (nothing read its status):
            # it still knows the swarm (discovery/own_view.py refresh_if_idle) and answers through it.
            answers["without the DHT, through the node that had only been a peer"].append(
                answer(client=peer_client) == expected)
            status = _swarm(coordinator)
            assert status["discovery"]["dht"] == "unreachable", status["discovery"]
            assert status["pipeline"]["coverage"]["complete"], status["pipeline"]["coverage"]
            assert {tuple(p["span"]) for p in status["peers"]} == set(SPANS)

            dht = DhtProcess(port=port).__enter__()  # back, empty: the nodes' announcers fill it again
            wait_until(lambda d=dht: _announced_spans(d, model.name) == set(SPANS), 60, 0.5,
                       "both nodes to announce to the restarted DHT")
            answered = discovery()["lookups"]
            wait_until(lambda a=answered: discovery()["lookups"] > a, 60, 0.5, "a lookup the restarted DHT answers")
            answers["after it is back"].append(answer() == expected)
            assert discovery()["dht"] == "reachable"
        print(f"\n{CYCLES} DHT kills and restarts: " + ", ".join(
            f"{phase}: {sum(ok)} of {len(ok)} answers exact" for phase, ok in answers.items()))
        assert all(all(ok) and len(ok) >= CYCLES for ok in answers.values()), answers
        metrics = httpx.get(coordinator.url + "/metrics", timeout=10).text
        counted = [line for line in metrics.splitlines()
                   if line.startswith('openhydra_discovery_lookups_total{outcome="without_dht"}')]
        assert counted and float(counted[0].split()[-1]) >= CYCLES, counted
    finally:
        for node in nodes:
            node.stop()
        dht.__exit__(None, None, None)
