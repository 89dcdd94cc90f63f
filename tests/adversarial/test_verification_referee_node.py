"""A liar on a span it shares with one honest peer, in a swarm of real node processes (encrypted, and onion).

Without a third peer, every vote on that span was a 1-1 tie: both peers disputed, nobody failed, and the honest one
paid as much as the liar. The coordinator's referee (verification/referee.py) now loads the span itself, serves it
on a port of its own with this node's keys (the client encrypts to its signed static key, which no announcement
carries; under onion the referee is one layer of the replay's onion), and votes. The liar is failed and routed
around, the honest peer is never disputed, and the user's text is what the honest swarm produced.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["Name a colour.", "Count to five.", "Say hello."]
MAX_REQUESTS = 24  # paranoid audits each hop of half the requests: P(the liar's span never audited) = 0.5^24


def _ask(client: openai.OpenAI, model: str, prompt: str) -> str:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content


def _status(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()


def _peer_id_of(coordinator: NodeProcess, node: NodeProcess) -> str | None:
    address = ((_status(node).get("swarm") or {}).get("peer") or {}).get("grpc_address")
    peers = (_status(coordinator).get("swarm") or {}).get("peers") or []
    return next((p["peer_id"] for p in peers if address and p["grpc_address"] == address), None)


@pytest.mark.parametrize("privacy", ["encrypted", "onion"])
def test_a_two_peer_span_liar_is_failed_by_the_referee_vote(tiny_model_dirs, tmp_path, privacy) -> None:
    model_dir = tiny_model_dirs["llama"]
    model = model_dir.name
    with DhtProcess() as dht:
        def node(name: str, start: int, end: int, *extra: str) -> NodeProcess:
            return NodeProcess([*swarm_node_overrides(model_dir, dht.url, start, end, tmp_path / name),
                                f"privacy={privacy}", *extra])

        coordinator = node("coordinator", 0, 4, "verification=paranoid")
        honest = node("honest", 4, 8)
        liar = node("liar", 4, 8, "verification.fault.mode=perturb", "verification.fault.magnitude=1.0")
        nodes = [coordinator, honest]
        try:
            start_all(nodes)
            client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)
            expected = {p: _ask(client, model, p) for p in PROMPTS}  # the honest swarm's answers
            honest_id = _peer_id_of(coordinator, honest)
            start_all([liar])
            nodes.append(liar)
            wait_until(lambda: _peer_id_of(coordinator, liar) is not None, 120, 0.2,
                       "the liar's announcement in the coordinator's peer list")
            liar_id = _peer_id_of(coordinator, liar)
            assert honest_id and liar_id and honest_id != liar_id

            def liar_routable() -> bool:
                return _status(coordinator)["reputation"]["peers"].get(liar_id, {}).get("routable", True)

            for i in range(MAX_REQUESTS):
                _ask(client, model, PROMPTS[i % len(PROMPTS)])
                if not liar_routable():
                    break
            wait_until(lambda: not liar_routable(), 120, 0.2, "the coordinator to exclude the liar")
            rep = _status(coordinator)["reputation"]
            referee = rep["verification"]["referee"]
            print(f"\nreferee {referee}; liar {rep['peers'][liar_id]['audits']}, "
                  f"honest {rep['peers'].get(honest_id, {}).get('audits')}")
            assert rep["peers"][liar_id]["audits"]["fail"] >= 1, rep
            honest_audits = rep["peers"][honest_id]["audits"]
            assert honest_audits["fail"] == 0 and honest_audits["dispute"] == 0, rep
            assert rep["peers"][honest_id]["routable"], rep
            assert referee["loads"] >= 1 and referee["loaded_span"] == [4, 8] and referee["failures"] == 0, referee
            metrics = httpx.get(coordinator.url + "/metrics", timeout=10).text
            decided = next(line for line in metrics.splitlines()
                           if line.startswith('openhydra_verification_referee_total{result="decided"}'))
            assert float(decided.split()[-1]) >= 1, decided  # an encrypted replay through the referee answered
            for prompt in PROMPTS:  # the liar is routed around: the honest swarm's text
                assert _ask(client, model, prompt) == expected[prompt]
        finally:
            for n in nodes:
                n.stop()
