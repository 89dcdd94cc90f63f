"""A real 3-peer swarm (node processes, HTTP DHT, tiny Llama split in three): each node coordinates with a
different `speculative` option; through the official OpenAI client their greedy outputs are identical, and
/v1/network/status and /metrics report the drafts, acceptance and truncations that really happened."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = pytest.mark.slow

SPANS = [(0, 3), (3, 5), (5, 8)]
MESSAGES = [{"role": "user", "content": "List three colours and a number."}]
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def swarm(tiny_model_dirs, tmp_path_factory):
    model_dir = tiny_model_dirs["llama"]
    options = [
        ["speculative=off"],
        ["speculative=prompt_lookup", "speculative.min_ngram=1"],
        ["speculative=draft", f"model.draft={tiny_model_dirs['qwen3']}"],  # same tokenizer, a different model
    ]
    with DhtProcess() as dht:
        nodes = [NodeProcess([*swarm_node_overrides(model_dir, dht.url, a, b, tmp_path_factory.mktemp(f"s{a}")),
                              *extra])
                 for (a, b), extra in zip(SPANS, options, strict=True)]
        try:
            start_all(nodes)
            yield model_dir.name, nodes
        finally:
            with ThreadPoolExecutor(len(nodes)) as pool:  # stop them together (each may wait for its peers)
                list(pool.map(NodeProcess.stop, nodes))


def _chat(node: NodeProcess, model: str) -> str:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == MAX_TOKENS
    return reply.choices[0].message.content


def _complete(node: NodeProcess, model: str, prompt: str, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
    return reply.choices[0].text


def test_speculative_coordinators_match_plain_greedy(swarm):
    model, (plain, lookup, draft) = swarm
    expected = _chat(plain, model)
    assert len(set(expected.split())) > 8
    assert _chat(lookup, model) == expected
    assert _chat(draft, model) == expected
    # a random model never repeats itself: give prompt lookup a prompt whose end occurred before
    head = "The committee met on Tuesday to review the budget"
    quoted = f"{head}{_complete(plain, model, head, 12)}\n{head}"
    assert _complete(lookup, model, quoted, 40) == _complete(plain, model, quoted, 40)
    status = {name: httpx.get(node.url + "/v1/network/status", timeout=10).json()
              for name, node in (("plain", plain), ("lookup", lookup), ("draft", draft))}
    assert "speculative" not in status["plain"]
    lookup_stats, draft_stats = status["lookup"]["speculative"], status["draft"]["speculative"]
    assert lookup_stats["mode"] == "prompt_lookup" and lookup_stats["drafted"] > 0
    assert draft_stats["mode"] == "draft" and 0 < draft_stats["accepted"] < draft_stats["drafted"]
    assert status["draft"]["swarm"]["pipeline"]["truncations"] > 0  # rejected drafts were cropped on every hop
    assert draft_stats["verify_steps"] + draft_stats["plain_steps"] < MAX_TOKENS  # fewer pipeline passes
    metrics = httpx.get(draft.url + "/metrics", timeout=10).text
    assert 'openhydra_speculative_draft_tokens_total{outcome="accepted"}' in metrics
