"""``peer.advertise_host`` + ``peer.reply_port``: nodes reached at another address than the one they bind (a
router forwarding ports, a container host, a relay). Two node processes bind 127.0.0.1 and advertise 127.0.0.2,
where a userspace relay forwards each of their ports back; everything the swarm sends them must cross it."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from openhydra.sim.relay import LinkSpec, RelayThread
from openhydra.testing.processes import DhtProcess, NodeProcess, free_port, start_all, swarm_node_overrides
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

ADVERTISED = "127.0.0.2"
PROMPT = [{"role": "user", "content": "Name a river and a mountain."}]


def test_nodes_announce_and_are_reached_at_their_advertised_host(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    reference = Reference(model_dir, torch.float32)
    expected = reference.text(reference.greedy(reference.chat_ids(PROMPT), 16))
    ports = {name: (free_port(), free_port()) for name in ("a", "b")}  # (peer.port, peer.reply_port)
    relay = RelayThread(ADVERTISED, [p for pair in ports.values() for p in pair], lambda s, d: LinkSpec(0.0))
    try:
        with DhtProcess() as dht:
            nodes = [
                NodeProcess([*swarm_node_overrides(model_dir, dht.url, start, end, tmp_path / name),
                             f"peer.port={ports[name][0]}", f"peer.reply_port={ports[name][1]}",
                             f"peer.advertise_host={ADVERTISED}"])
                for name, (start, end) in (("a", (0, 4)), ("b", (4, 8)))
            ]
            try:
                start_all(nodes)
                status = httpx.get(nodes[0].url + "/v1/network/status", timeout=10).json()["swarm"]
                assert status["peer"]["grpc_address"] == f"{ADVERTISED}:{ports['a'][0]}"
                assert sorted(p["grpc_address"] for p in status["peers"]) == sorted(
                    f"{ADVERTISED}:{peer_port}" for peer_port, _ in ports.values())
                client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
                reply = client.chat.completions.create(model=model_dir.name, messages=PROMPT, max_tokens=16,
                                                       temperature=0)
                assert reply.choices[0].message.content == expected
            finally:
                for node in nodes:
                    node.stop()
        seen = relay.relay.by_port
        # a's coordinator stepped into both peers (its own too: routes name the advertised address), b's
        # peer delivered the results to a's reply port, and nothing else reached b's reply port.
        assert seen[ports["a"][0]] >= 1 and seen[ports["b"][0]] >= 1 and seen[ports["a"][1]] >= 1, dict(seen)
        assert seen[ports["b"][1]] == 0, dict(seen)
    finally:
        relay.close()


@pytest.mark.parametrize("bad", ["203.0.113.7:50051", "http://example.org", "", "two words"])
def test_an_advertised_host_with_a_port_or_scheme_is_refused_with_the_reason(bad):
    from pydantic import ValidationError

    from openhydra.config.schema import PeerSection

    with pytest.raises(ValidationError, match="not a host name or address"):
        PeerSection(advertise_host=bad)
    assert PeerSection(advertise_host="[2001:db8::1]").advertise_host == "[2001:db8::1]"
    assert PeerSection(advertise_host="node.example.org").advertise_host == "node.example.org"
