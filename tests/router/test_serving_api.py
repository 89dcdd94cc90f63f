"""Prefix cache, continuous batching and coalescing on a real node, driven with the official openai client."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from openhydra.testing.processes import NodeProcess

SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly and stay on topic." for i in range(20))


@pytest.fixture(scope="module")
def node(tiny_model_dirs, tmp_path_factory) -> Iterator[NodeProcess]:
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "hardware.dtype=float32",
                 f"node.data_dir={tmp_path_factory.mktemp('serving')}", "api.rate_limit_requests=100000",
                 "serving=batched"]
    with NodeProcess(overrides, threads=1) as n:
        yield n


def _status(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()["serving"]


def _ask(client: openai.OpenAI, question: str, system: str | None = None, tokens: int = 24) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model="tiny-llama-8l", messages=messages, max_tokens=tokens,
                                           temperature=0)
    return reply.choices[0].message.content


def _parallel(calls) -> list[str]:
    out: list[str | None] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_shared_system_prompt_is_reused_and_exact(node) -> None:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
    cold = _ask(client, "What is a lighthouse?", SYSTEM)  # nothing cached yet
    before = _status(node)["prefix_cache"]
    _ask(client, "Name a river.", SYSTEM)  # shares the system prompt's blocks
    after = _status(node)["prefix_cache"]
    assert after["hits"] == before["hits"] + 1 and after["reused_positions"] - before["reused_positions"] >= 160
    assert _ask(client, "What is a lighthouse?", SYSTEM) == cold  # a hit answers exactly as the cold run


def test_identical_requests_are_coalesced(node) -> None:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
    before = _status(node)["coalescing"]
    answers = _parallel([lambda: _ask(client, "Tell me about the sea.", tokens=64)] * 4)
    after = _status(node)["coalescing"]
    assert len(set(answers)) == 1 and answers[0]
    assert after["runs"] + after["coalesced"] - before["runs"] - before["coalesced"] == 4
    assert after["coalesced"] - before["coalesced"] >= 1


def test_concurrent_streams_are_batched_and_exact(node) -> None:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=120)
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(4)]
    alone = [_ask(client, q, tokens=32) for q in questions]
    before = _status(node)["batching"]
    together = _parallel([lambda q=q: _ask(client, q, tokens=32) for q in questions])
    after = _status(node)["batching"]
    assert together == alone
    assert after["batches"] > before["batches"] and after["largest_batch"] >= 2
