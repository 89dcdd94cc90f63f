"""The README's local-swarm walk-through, as a newcomer follows it: start the DHT and three nodes (the
``readme_swarm`` fixture runs README.md's own commands, see conftest.py), chat through the first node
with the ``openai`` client, open the dashboard, and see every node's earnings increase."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def _credits(url: str) -> int:
    return httpx.get(url + "/v1/account/balance", timeout=10).json()["micro"]["credits"]


def test_readme_walkthrough(readme_swarm):
    nodes, after = readme_swarm.nodes, readme_swarm.after
    assert len({str(d) for d in readme_swarm.data_dirs}) == 3  # each node its own identity and ledger
    assert readme_swarm.spans[0][0] == 0 and readme_swarm.spans[-1][1] == 8  # together: the whole model
    before = {n.url: _credits(n.url) for n in nodes}
    # the README's chat (its curl line), sent with the openai client through the first node
    chat = next(c for c in after if "/v1/chat/completions" in c)
    content = re.search(r'"content": "([^"]+)"', chat).group(1)
    client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                           max_tokens=48)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    page = httpx.get(nodes[0].url + "/", timeout=10)
    if page.status_code != 404:  # the dashboard, where this build has one
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert any("/v1/account/balance" in c for c in after)  # the README's way to see earnings
    deadline = time.monotonic() + 60  # settlement runs after the answer
    now = before
    while time.monotonic() < deadline:
        now = {n.url: _credits(n.url) for n in nodes}
        if all(now[u] > before[u] for u in now):
            break
        time.sleep(0.3)
    assert all(now[u] > before[u] for u in now), (before, now)
    for d in readme_swarm.data_dirs:
        assert (Path(d) / "ledger.db").exists() and (Path(d) / "identity.key").exists()
