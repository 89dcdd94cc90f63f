"""A node with the barter economy settles every request it serves and shows the balance."""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.testing.failover import metric
from openhydra.testing.processes import NodeProcess
from openhydra.testing.wait import wait_until


@pytest.fixture(scope="module")
def barter_node(tiny_model_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("barter")
    # no decay: the tests compare balances read seconds apart (5% a day takes a unit off a 114,000-micro balance
    # every ~15 s)
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "economy=barter",
                 "economy.decay_per_day=0", "privacy=encrypted", f"node.data_dir={data}"]
    with NodeProcess(overrides) as node:
        yield node, data


def _credits(node) -> float:
    body = httpx.get(node.url + "/v1/account/balance", timeout=10).json()
    assert body["enabled"] is True
    return body["micro"]["credits"]


def _settled_credits(node) -> float:
    """The balance once every token the node served is settled (settlement runs after the response is sent, so
    an earlier test's requests may still be settling)."""
    def settled() -> bool:
        served = sum(metric(node.url, name) for name in ("openhydra_prompt_tokens_total",
                                                          "openhydra_tokens_generated_total"))
        return served == metric(node.url, "openhydra_ledger_tokens_settled_total")

    wait_until(settled, 30, what="the settlements of every token the node served")
    return _credits(node)


def test_serving_earns_credits_in_proportion_to_tokens(barter_node):
    node, data = barter_node
    before = _credits(node)
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="tiny-llama-8l", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=20, temperature=0)
    tokens = reply.usage.total_tokens
    import time

    deadline = time.monotonic() + 10  # settlement runs off the request path
    while _credits(node) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    earned = _credits(node) - before
    # 1,000 tokens served = 1 credit (micro-units: 1 credit = 1,000,000), all layers served here
    assert earned == pytest.approx(tokens * 1000, rel=0.01)
    status = httpx.get(node.url + "/v1/network/status", timeout=10).json()
    assert status["economy"]["enabled"] is True
    assert (data / "ledger.db").exists() and (data / "identity.key").stat().st_mode & 0o077 == 0


def test_a_page_of_another_origin_cannot_spend_on_the_nodes_behalf(barter_node):
    """A web page the operator visits posts to the node on loopback: as ``text/plain`` a browser sends it without a
    preflight, and the node would run it (a chat spends the node's credits or free tier; on economy=hydra a stake or
    a channel moves its HYDRA). Refused with 403 unless the page's origin is listed; the node's own origin (its
    dashboard), SDKs and curl (no Origin) are served as before."""
    node, _ = barter_node
    body = '{"model": "tiny-llama-8l", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    url = node.url + "/v1/chat/completions"
    before = _settled_credits(node)
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
        refused = httpx.post(url, content=body, headers={"Content-Type": "text/plain", "Origin": origin}, timeout=30)
        assert refused.status_code == 403, (origin, refused.text)
        assert refused.json()["error"]["code"] == "origin_not_allowed"
    refused = httpx.post(node.url + "/api/chat", json={"model": "tiny-llama-8l", "messages": []},
                         headers={"Origin": "http://evil.example"}, timeout=30)
    assert refused.status_code == 403  # Ollama's routes too
    assert _credits(node) == before  # nothing ran, nothing was earned or spent
    own = node.url.rstrip("/")
    for headers in ({"Origin": own}, {}):
        served = httpx.post(url, content=body, headers={"Content-Type": "text/plain", **headers}, timeout=60)
        assert served.status_code == 200, served.text
    assert httpx.get(node.url + "/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200  # reads


def test_a_page_that_rebinds_its_name_to_the_node_is_refused(barter_node):
    """DNS rebinding: a page on rebind.attacker.example makes its own name resolve to 127.0.0.1, and the browser
    then sends its requests to the node as same-origin ones (Host and Origin both the attacker's name), past the
    cross-origin check above. A red team drained a HYDRA node this way (a channel to itself, a signed update, a
    close). The node answers only IP addresses, localhost and the names it is told (api/hosts.py)."""
    node, _ = barter_node
    port = node.url.rsplit(":", 1)[1]
    rebound = {"Host": f"rebind.attacker.example:{port}", "Origin": f"http://rebind.attacker.example:{port}"}
    body = '{"model": "tiny-llama-8l", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    before = _settled_credits(node)
    chat = httpx.post(node.url + "/v1/chat/completions", content=body, timeout=30,
                      headers={"Content-Type": "text/plain", **rebound})
    assert chat.status_code == 403 and chat.json()["error"]["code"] == "host_not_allowed", chat.text
    assert "api.allowed_hosts=[rebind.attacker.example]" in chat.json()["error"]["message"]
    balance = httpx.get(node.url + "/v1/account/balance", headers={"Host": rebound["Host"]}, timeout=10)
    assert balance.status_code == 403  # reads too: the page could read the answers (same origin to the browser)
    assert httpx.get(node.url + "/health", headers={"Host": rebound["Host"]}, timeout=10).status_code == 200
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"node.localhost:{port}"):
        assert httpx.get(node.url + "/v1/account/balance", headers={"Host": host}, timeout=10).status_code == 200
    assert _credits(node) == before
