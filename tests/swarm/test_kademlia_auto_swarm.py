"""Node-level swarms over the other discovery stacks, and shard=auto, with real node processes.

- Kademlia only: the first node's libp2p DHT bootstraps the second (initial_peers from its status); the
  second node uses shard=auto and takes the span the swarm lacks; both nodes then answer exactly.
- Dual stack: a coordinator that announces to and looks up in both DHTs builds a pipeline from one peer
  that only announces to Kademlia and one that only announces to the HTTP DHT (lookups are merged).
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "List three colours and a number."}]


def _with_discovery(overrides: list[str], *new: str) -> list[str]:
    return [o for o in overrides if not o.startswith(("discovery=", "discovery.http.urls"))] + list(new)


def _maddrs(node: NodeProcess) -> list[str]:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()["swarm"]["kademlia_maddrs"]


def _answer(node: NodeProcess, model: str) -> str:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def expected(tiny_model_dirs) -> str:
    ref = Reference(tiny_model_dirs["llama"], torch.float32)
    return ref.text(ref.greedy(ref.chat_ids(MESSAGES), 16))


def test_kademlia_swarm_with_shard_auto(tiny_model_dirs, tmp_path, expected):
    model = tiny_model_dirs["llama"]
    unused = "http://127.0.0.1:9"  # replaced below: no HTTP DHT in this swarm
    first = NodeProcess(_with_discovery(swarm_node_overrides(model, unused, 0, 4, tmp_path / "a"),
                                        "discovery=kademlia"))
    nodes = [first]
    try:
        start_all(nodes)
        (maddr, *_) = _maddrs(first)
        auto = _with_discovery(swarm_node_overrides(model, unused, 0, 8, tmp_path / "b"), "discovery=kademlia",
                               f"discovery.kademlia.initial_peers=['{maddr}']")
        auto = [o for o in auto if not o.startswith(("shard=", "shard.start", "shard.end"))]
        second = NodeProcess([*auto, "shard=auto", "shard.max_layers=4"])
        nodes.append(second)
        start_all([second])
        status = httpx.get(second.url + "/v1/network/status", timeout=10).json()["swarm"]
        assert status["peer"]["span"] == [4, 8]  # the layers the swarm lacked, found through Kademlia
        for node in nodes:
            assert _answer(node, model.name) == expected
    finally:
        for node in nodes:
            node.stop()


def test_dual_stack_merges_kademlia_and_http_peers(tiny_model_dirs, tmp_path, expected):
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        coordinator = NodeProcess(_with_discovery(swarm_node_overrides(model, dht.url, 0, 3, tmp_path / "c"),
                                                  "discovery=dual", f"discovery.http.urls=[{dht.url}]"))
        nodes = [coordinator]
        try:
            start_all(nodes)
            (maddr, *_) = _maddrs(coordinator)
            kad_only = NodeProcess(_with_discovery(swarm_node_overrides(model, dht.url, 3, 5, tmp_path / "k"),
                                                   "discovery=kademlia",
                                                   f"discovery.kademlia.initial_peers=['{maddr}']"))
            http_only = NodeProcess(swarm_node_overrides(model, dht.url, 5, 8, tmp_path / "h"))
            nodes += [kad_only, http_only]
            start_all([kad_only, http_only])
            assert _answer(coordinator, model.name) == expected
            status = httpx.get(coordinator.url + "/v1/network/status", timeout=10).json()["swarm"]
            assert sorted(tuple(p["span"]) for p in status["peers"]) == [(0, 3), (3, 5), (5, 8)]
        finally:
            for node in nodes:
                node.stop()
