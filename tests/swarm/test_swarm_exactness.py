"""Three (four) peer processes + the HTTP DHT serve a model no node holds whole; greedy output through the
OpenAI client equals transformers' generate, token for token, for Llama, Qwen3 and the Qwen3.5 hybrid."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

# The tiny Qwen3.5 is [linear, linear, linear, full] x 2. Its four spans cut between two linear layers
# (at 2), between a linear and a full layer (at 3) and between a full and a linear layer (at 4).
SPLITS = {"llama": [(0, 3), (3, 5), (5, 8)], "qwen3": [(0, 3), (3, 5), (5, 8)],
          "qwen3_5": [(0, 2), (2, 3), (3, 4), (4, 8)]}
PROMPTS = [
    [{"role": "user", "content": "List three colours and a number."}],
    # long enough that the coordinator sends the prompt in several prefill chunks (512 positions each)
    [{"role": "user", "content": " ".join(f"item{i} is {i * 7 % 13}" for i in range(180))}],
]


@pytest.fixture(scope="module", params=list(SPLITS))
def family_swarm(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    model_dir = tiny_model_dirs[family]
    with DhtProcess() as dht:
        nodes = [NodeProcess(swarm_node_overrides(model_dir, dht.url, a, b, tmp_path_factory.mktemp(f"{family}{a}")))
                 for a, b in SPLITS[family]]
        try:
            start_all(nodes)
            yield family, model_dir, nodes
        finally:
            with ThreadPoolExecutor(len(nodes)) as pool:  # the SIGTERM waits at once, not one after another
                list(pool.map(NodeProcess.stop, nodes))


def test_pipeline_greedy_equals_generate(family_swarm):
    family, model_dir, nodes = family_swarm
    reference = Reference(model_dir, torch.float32)
    for prompt in PROMPTS:
        prompt_ids = reference.chat_ids(prompt)
        expected_tokens = reference.greedy(prompt_ids, 24)
        assert len(set(expected_tokens)) > 8  # varied output, so equality is a real check
        expected = reference.text(expected_tokens)
        # every node's API can coordinate: ask the first and the last
        for node in (nodes[0], nodes[-1]):
            client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
            reply = client.chat.completions.create(model=model_dir.name, messages=prompt, max_tokens=24,
                                                   temperature=0)
            assert reply.choices[0].message.content == expected, (family, len(prompt_ids))
            assert reply.usage.prompt_tokens == len(prompt_ids)
    assert len(prompt_ids) > 1024  # the long prompt really was chunked


def test_status_shows_spans_and_complete_coverage(family_swarm):
    import httpx

    family, _, nodes = family_swarm

    def every_span_seen() -> dict | None:  # every node is ready; the first one's view follows the DHT's next lookup
        status = httpx.get(nodes[0].url + "/v1/network/status", timeout=10).json()
        return status if len(status["swarm"]["peers"]) == len(SPLITS[family]) else None

    status = wait_until(every_span_seen, timeout_s=60, what="the first node seeing every peer")
    pipeline = status["swarm"]["pipeline"]
    assert pipeline["coverage"]["complete"] is True
    spans = sorted(tuple(p["span"]) for p in status["swarm"]["peers"])
    assert spans == sorted(SPLITS[family])
