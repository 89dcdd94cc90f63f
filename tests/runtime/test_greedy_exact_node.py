"""Issue #15 end to end: on a real node with the default config (prefix cache on), asking "What is a lighthouse
for?" and then "What is a sextant?" under the same long system prompt gives the sextant answer a freshly
started node gives, token for token, through the official ``openai`` client."""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.testing.processes import NodeProcess

pytestmark = pytest.mark.slow

MODEL = "openhydra-smollm2-135m"
SYSTEM = (
    "You are a knowledgeable and patient assistant for a maritime museum. Visitors ask about the objects on "
    "display: navigation instruments, lights, charts and ship fittings. Answer in two or three clear sentences, "
    "say what the object does and how sailors used it, mention the century it came into use when you know it, "
    "avoid jargon, and never invent names, dates or sources. If you are not sure, say so plainly."
)


def _ask(url: str, question: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=40,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    )
    return reply.choices[0].message.content


def _node(tmp_path, name: str) -> NodeProcess:
    return NodeProcess([f"node.data_dir={tmp_path / name}", "api.rate_limit_requests=100000"], threads=1,
                       env={"HF_HUB_OFFLINE": "1"}, log_path=tmp_path / f"{name}.log")


def test_answer_does_not_depend_on_the_previous_request(smollm2_dir, tmp_path) -> None:
    with _node(tmp_path, "warm") as node:
        lighthouse = _ask(node.url, "What is a lighthouse for?")
        after_lighthouse = _ask(node.url, "What is a sextant?")
        status = httpx.get(node.url + "/v1/network/status", timeout=10).json()
        again = _ask(node.url, "What is a sextant?")
    assert lighthouse and after_lighthouse
    prefix = status["serving"]["prefix_cache"]
    assert prefix["hits"] >= 1 and prefix["reused_positions"] >= 64  # the system prompt really was reused
    with _node(tmp_path, "fresh") as fresh:
        cold = _ask(fresh.url, "What is a sextant?")
    assert after_lighthouse == cold
    assert again == cold  # the whole prompt cached this time, still the same answer
