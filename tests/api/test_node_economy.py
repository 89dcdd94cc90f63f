"""A node with the barter economy settles every request it serves and shows the balance."""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.testing.processes import NodeProcess


@pytest.fixture(scope="module")
def barter_node(tiny_model_dirs, tmp_path_factory):
    data = tmp_path_factory.mktemp("barter")
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "economy=barter",
                 "privacy=encrypted", f"node.data_dir={data}"]
    with NodeProcess(overrides) as node:
        yield node, data


def _credits(node) -> float:
    body = httpx.get(node.url + "/v1/account/balance", timeout=10).json()
    assert body["enabled"] is True
    return body["micro"]["credits"]


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
