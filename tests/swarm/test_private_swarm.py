"""Admission at the node level. A private swarm: members (same join secret, proofs of work required) form a
pipeline; a stranger with the wrong secret announcing the same span is ignored by every member, and sees none
of them. An open swarm with the default config: only identities that did the join proof of work are routed to."""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.crypto.config import OPEN_SWARM_POW_BITS
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until

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


def _chat(node: NodeProcess, model: str) -> httpx.Response:
    return httpx.post(node.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})


def test_an_open_swarm_by_default_routes_only_identities_that_did_the_work(tiny_model_dirs, tmp_path):
    """No swarm secret and no pow_difficulty_bits override (the shipped default, ``auto``): every record must carry
    a fresh 20-bit proof for its own peer id. A peer announcing without one (it asks for none itself) is dropped
    and never routed to; a peer with the default config does the work, and the pipeline runs through it."""
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        def node(start: int, end: int, name: str, pow_bits: int | None) -> NodeProcess:
            return NodeProcess(swarm_node_overrides(model, dht.url, start, end, tmp_path / name), pow_bits=pow_bits)

        coordinator, workless = node(0, 4, "coord", None), node(4, 8, "workless", 0)
        nodes = [coordinator, workless]
        try:
            start_all(nodes)

            def admission() -> dict:
                return httpx.get(coordinator.url + "/v1/network/status", timeout=10).json()["privacy"]["admission"]

            wait_until(lambda: _peers(coordinator) == [(0, 4)] and admission()["records_rejected"] > 0, 60, 0.5,
                       "the coordinator dropping the record without a proof")
            records = httpx.get(f"{dht.url}/v1/peers", params={"model_id": model.name}, timeout=10).json()["peers"]
            by_span = {(r["start"], r["end"]): r for r in records}
            assert by_span[(4, 8)].get("geo_proof") is None and by_span[(0, 4)]["geo_proof"]  # both announced
            assert "admission  open swarm, proof of work 20 bits per identity" in coordinator.log_text()  # banner
            status = admission()
            assert status["pow_setting"] == "auto" and not status["private_swarm"]
            assert status["pow_difficulty_bits"] == OPEN_SWARM_POW_BITS and status["proofs_solved"] >= 1
            refused = _chat(coordinator, model.name)  # the only [4, 8) peer did no work: no route at all
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_route"

            worker = node(4, 8, "worker", None)
            nodes.append(worker)
            worker.start().wait_ready()
            wait_until(lambda: _peers(coordinator) == [(0, 4), (4, 8)], 60, 0.5, "the worker's record admitted")
            reply = _chat(coordinator, model.name)
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
            assert _peers(coordinator) == [(0, 4), (4, 8)]  # the workless peer is still out
        finally:
            for n in nodes:
                n.stop()
