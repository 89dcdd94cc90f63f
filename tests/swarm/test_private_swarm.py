"""A private swarm at the node level: members (same join secret, proofs of work required) form a pipeline;
a stranger with the wrong secret announcing the same span is ignored by every member, and sees none of them."""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = pytest.mark.slow

ADMISSION = ["privacy.pow_difficulty_bits=10", "privacy.region=eu-west"]


def _peers(node: NodeProcess) -> list[tuple[int, int]]:
    status = httpx.get(node.url + "/v1/network/status", timeout=10).json()["swarm"]
    return sorted(tuple(p["span"]) for p in status.get("peers", []))


def test_members_form_a_pipeline_and_a_stranger_is_ignored(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        def node(start: int, end: int, secret: str) -> NodeProcess:
            return NodeProcess([*swarm_node_overrides(model, dht.url, start, end, tmp_path / f"{start}{secret[:3]}"),
                                *ADMISSION, f"privacy.swarm_secret='{secret}'"])

        members = [node(0, 4, "our-swarm-join-secret-2026"), node(4, 8, "our-swarm-join-secret-2026")]
        stranger = node(4, 8, "a-guess-at-the-secret-26")
        nodes = [*members, stranger]
        try:
            start_all(nodes)
            # the stranger's record is in the DHT (it announced), but no member lets it in
            records = httpx.get(f"{dht.url}/v1/peers", params={"model_id": model.name}, timeout=10).json()["peers"]
            assert len(records) == 3 and all(r["geo_proof"] and r["swarm_tag"] for r in records)
            for member in members:
                assert _peers(member) == [(0, 4), (4, 8)]
            assert _peers(stranger) == [(4, 8)]  # it sees only itself
            client = openai.OpenAI(base_url=members[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
            reply = client.chat.completions.create(model=model.name, max_tokens=8, temperature=0,
                                                   messages=[{"role": "user", "content": "Hi"}])
            assert reply.choices[0].message.content
            # the stranger cannot run a pipeline through the members' peers: it has no route at all
            bad = httpx.post(stranger.url + "/v1/chat/completions", timeout=60,
                             json={"model": model.name, "max_tokens": 4,
                                   "messages": [{"role": "user", "content": "Hi"}]})
            assert bad.status_code == 503 and bad.json()["error"]["code"] == "no_route"
        finally:
            for n in nodes:
                n.stop()
