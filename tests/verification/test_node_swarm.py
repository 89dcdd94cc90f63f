"""End to end with real node processes: a node started with `verification.fault.mode=perturb` lies;
the coordinator (verification=paranoid) catches it, shows it in /v1/network/status, stops routing to
it, and the user's text equals what the honest swarm produced before the liar joined."""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until

# 4 node processes on 2 cores: ~3 min at load average 15; its own waits (120 s each) fail first with a clear message.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["Name a colour.", "Count to five.", "Say hello."]
MAX_REQUESTS = 24  # paranoid samples each hop of half the requests: P(never audited) = 0.5^24


def _ask(client: openai.OpenAI, model: str, prompt: str) -> str:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content


def _reputation(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()["reputation"]


def _known_peers(node: NodeProcess) -> set[str]:
    swarm = httpx.get(node.url + "/v1/network/status", timeout=10).json().get("swarm") or {}
    return {p["peer_id"] for p in swarm.get("peers") or []}


def _liar_routable(node: NodeProcess) -> bool:
    return _reputation(node)["peers"].get("a-liar", {}).get("routable", True)


def test_faulty_node_is_caught_and_routed_around(tiny_model_dirs, tmp_path) -> None:
    model_dir = tiny_model_dirs["llama"]
    model = model_dir.name
    with DhtProcess() as dht:
        def node(name: str, start: int, end: int, *extra: str) -> NodeProcess:
            return NodeProcess([*swarm_node_overrides(model_dir, dht.url, start, end, tmp_path / name),
                                # readable peer names need unsigned records: privacy off
                                f"node.peer_id={name}", "privacy=off", *extra])

        coordinator = node("coordinator", 0, 4, "verification=paranoid")
        honest = [node("h-1", 4, 8), node("h-2", 4, 8)]
        liar = node("a-liar", 4, 8, "verification.fault.mode=perturb", "verification.fault.magnitude=1.0")
        nodes = [coordinator, *honest]
        try:
            start_all(nodes)
            client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=120)
            expected = {p: _ask(client, model, p) for p in PROMPTS}  # the honest swarm's answers
            start_all([liar])
            nodes.append(liar)
            wait_until(lambda: "a-liar" in _known_peers(coordinator), 120, 0.2,
                       "the liar's announcement in the coordinator's peer list")
            lied, served = 0, 0
            for i in range(MAX_REQUESTS):
                prompt = PROMPTS[i % len(PROMPTS)]
                lied += _ask(client, model, prompt) != expected[prompt]
                served += 1
                if not _liar_routable(coordinator):
                    break
            # Audits run off the request path: the last ones may still be queued when the requests end.
            wait_until(lambda: not _liar_routable(coordinator), 120, 0.2, "the coordinator to exclude the liar")
            rep = _reputation(coordinator)
            liar_row = rep["peers"]["a-liar"]
            # Convicted (tier 2: outvoted) or, drawn as the lone auditor of the honest pair, disputed: either way
            # excluded, and no honest peer pays for it.
            assert liar_row["routable"] is False, rep
            assert liar_row["audits"]["fail"] + liar_row["audits"]["dispute"] >= 1, rep
            assert all(rep["peers"][p]["audits"]["fail"] == 0 for p in ("h-1", "h-2") if p in rep["peers"]), rep
            assert set(liar_row["components"]) == {"verification", "uptime", "latency", "stake"}
            print(f"\nliar excluded after {served} requests ({lied} answers differed from the honest ones); "
                  f"score {liar_row['score']} < floor {rep['floor']}")
            for prompt in PROMPTS:
                assert _ask(client, model, prompt) == expected[prompt]
            assert all(rep["peers"][p]["routable"] for p in ("h-1", "h-2", "coordinator") if p in rep["peers"])
        finally:
            for n in nodes:
                n.stop()
