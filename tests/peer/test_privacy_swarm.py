"""Node processes with ``privacy=onion`` (and ``encrypted``): greedy output through the OpenAI API equals
generate, nothing was rejected on the way, and a forged announcement in the DHT is never routed to."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.records import sign_record
from openhydra.discovery.base import DiscoveryError
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

SPLITS = [(0, 3), (3, 5), (5, 8)]
PROMPT = [{"role": "user", "content": "List three colours and a number."}]


def _forge(dht_url: str, model_id: str, victim_peer_id: str) -> None:
    """Announce [3,5) at a dead address under a real peer's id, signed with another identity: the DHT server
    refuses it (403); readers would drop it too (tests/adversarial/test_discovery_records.py)."""
    attacker = Identity.generate()
    record = PeerAnnouncement(peer_id=attacker.peer_id, model_id=model_id, start=3, end=5, total_layers=8,
                              grpc_address="127.0.0.1:9", announced_at=time.time(), ttl_s=600.0)
    forged = sign_record(record, attacker, StaticKeyPair.generate().signed_by(attacker))
    forged = forged.model_copy(update={"peer_id": victim_peer_id})

    async def announce() -> None:
        discovery = HttpDiscovery([dht_url])
        await discovery.start()
        try:
            with pytest.raises(DiscoveryError, match="HTTP 403"):
                await discovery.announce(forged)
        finally:
            await discovery.stop()

    asyncio.run(announce())


def _status_with_peers(node: NodeProcess, count: int) -> dict | None:
    status = httpx.get(node.url + "/v1/network/status", timeout=10).json()
    return status if len(status["swarm"]["peers"]) == count else None


@pytest.mark.parametrize("level", ["onion", "encrypted"])
def test_private_swarm_greedy_equals_generate(tiny_model_dirs, tmp_path, level):
    model_dir = tiny_model_dirs["qwen3"]
    reference = Reference(model_dir, torch.float32)
    expected = reference.text(reference.greedy(reference.chat_ids(PROMPT), 24))
    with DhtProcess() as dht:
        nodes = [NodeProcess([*swarm_node_overrides(model_dir, dht.url, a, b, tmp_path / f"n{a}"), f"privacy={level}"])
                 for a, b in SPLITS]
        try:
            start_all(nodes)
            # every node is ready; the first one's view of the swarm follows the DHT (its next lookup): wait for it
            status = wait_until(lambda: _status_with_peers(nodes[0], 3), timeout_s=60,
                                what="the first node seeing all three peers")
            peer_ids = [p["peer_id"] for p in status["swarm"]["peers"]]
            assert len(peer_ids) == 3 and all(p.startswith("12D3KooW") for p in peer_ids)
            if level == "onion":
                _forge(dht.url, model_dir.name, peer_ids[0])
            for node in (nodes[0], nodes[-1]):  # the last node embeds with a table it loads itself
                client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
                reply = client.chat.completions.create(model=model_dir.name, messages=PROMPT, max_tokens=24,
                                                       temperature=0)
                assert reply.choices[0].message.content == expected, (level, node.url)
            status = httpx.get(nodes[0].url + "/v1/network/status", timeout=10).json()
            addresses = {p["grpc_address"] for p in status["swarm"]["peers"]}
            assert "127.0.0.1:9" not in addresses and len(addresses) == 3
            assert status["swarm"]["pipeline"]["failovers"] == 0
            assert status["privacy"]["level"] == level
            assert status["privacy"]["crypto_rejections"] == {"peer": {}, "coordinator": {}}
            metrics = httpx.get(nodes[1].url + "/metrics", timeout=10).text
            assert 'openhydra_crypto_rejections_total{side="peer",reason="tampered"} 0' in metrics
        finally:
            for node in nodes:
                node.stop()
