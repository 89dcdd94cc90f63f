"""A prompt whose bytes alone prove it longer than the context gets a 400 at once on every route (before, a red
team's ~1 MiB prompts were tokenized first: ~1.3 s each on the event loop; tests/router/test_prompt_bound.py checks
the bound never refuses a prompt that fits)."""

from __future__ import annotations

import httpx


def test_the_api_answers_an_overlong_prompt_with_a_400(tiny_node) -> None:
    model = httpx.get(f"{tiny_node.url}/v1/models", timeout=30).json()["data"][0]["id"]
    text = "token " * 150_000  # 900 KB: under the body limit, far over tiny Llama's 4,096 positions
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
                       ("/v1/completions", {"prompt": text}),
                       ("/api/generate", {"prompt": text, "stream": False})):
        reply = httpx.post(f"{tiny_node.url}{path}", json={"model": model, **body}, timeout=60)
        assert reply.status_code == 400, (path, reply.text[:300])
        assert "at least" in reply.text and "context length is 4096" in reply.text, (path, reply.text[:300])
