"""Two peer processes + the HTTP DHT, started with ``compaction=phase4``: each peer compacts its own span.

A chat completion through the official ``openai`` client runs past 4x the threshold; both peers' logs
show repeated compactions of their own layers only, and after the prompt's compaction no layer holds
more than the threshold after a compaction.
"""

from __future__ import annotations

import re

import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides

pytestmark = pytest.mark.slow

THRESHOLD = 32
SPANS = [(0, 4), (4, 8)]
LINE = re.compile(
    r"kv compaction: session \S+ layers \[(\d+),(\d+)\) at (\d+) positions: .* \(longest layer (\d+) tokens"
)


def test_two_peer_swarm_compacts_each_span(tiny_model_dirs, tmp_path_factory) -> None:
    model_dir = tiny_model_dirs["llama"]
    compaction = ["compaction=phase4", "compaction.ratio=0.5", f"compaction.threshold_tokens={THRESHOLD}",
                  "compaction.max_queries=32", "privacy=off"]
    with DhtProcess() as dht:
        nodes = [
            NodeProcess([*swarm_node_overrides(model_dir, dht.url, a, b, tmp_path_factory.mktemp(f"c{a}")),
                         *compaction])
            for a, b in SPANS
        ]
        try:
            start_all(nodes)
            client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
            prompt = [{"role": "user", "content": "Count: " + " ".join(str(i) for i in range(30))}]
            reply = client.chat.completions.create(model=model_dir.name, messages=prompt, max_tokens=110,
                                                   temperature=0)
            prompt_tokens = reply.usage.prompt_tokens
            total = reply.usage.prompt_tokens + reply.usage.completion_tokens
            assert total > 4 * THRESHOLD, reply.usage
            assert reply.choices[0].message.content
            logs = [node.log_text() for node in nodes]
        finally:
            for node in nodes:
                node.stop()
    for (a, b), log in zip(SPANS, logs, strict=True):
        events = [tuple(int(x) for x in m.groups()) for m in LINE.finditer(log)]
        assert len(events) >= 4, log[-3000:]  # compacted again and again
        assert {(s, e) for s, e, _, _ in events} == {(a, b)}  # its own layers only
        # the prompt arrives as one chunk and is compacted to half its length; from then on no layer holds
        # more than the threshold after a compaction, however long the session gets
        assert events[0][3] <= prompt_tokens // 2 + 1
        assert max(longest for *_, longest in events[1:]) <= THRESHOLD
        assert max(pos for _, _, pos, _ in events) > 3 * THRESHOLD  # still compacting late in the session
