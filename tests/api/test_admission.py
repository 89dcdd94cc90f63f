"""More generations than the node runs at once: the excess waits its turn, beyond the queue it gets a 503 with
Retry-After before anything started, and no running stream is harmed.

Before, api.max_concurrent_sessions only sized a thread pool: a red team's 80 concurrent streams made the runtime
evict running sessions (its store keeps 64), 28 streams died after their 200 and an honest request got a 500.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from openhydra.testing.processes import NodeProcess
from openhydra.testing.wait import wait_until


def _one_slot_node(tiny_llama: Path, data: Path, queue: int) -> NodeProcess:
    """A node that runs one generation at a time, with ``queue`` places to wait (120 s at most) for it."""
    return NodeProcess(["model=local", f"model.path={tiny_llama}", "hardware=cpu", "hardware.dtype=float32",
                        f"node.data_dir={data}", "api.rate_limit_requests=100000", "api.max_concurrent_sessions=1",
                        f"api.max_queued_requests={queue}", "api.queue_timeout_s=120"], threads=1)


@pytest.fixture(scope="module")
def one_slot_node(tiny_llama: Path, tmp_path_factory) -> Iterator[NodeProcess]:
    with _one_slot_node(tiny_llama, tmp_path_factory.mktemp("admission"), queue=1) as node:
        yield node


def _load(node: NodeProcess) -> dict:
    return httpx.get(f"{node.url}/v1/dashboard/summary", timeout=30).json()["load"]


def _metric(node: NodeProcess, name: str) -> float:
    for line in httpx.get(f"{node.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_excess_waits_then_is_refused_and_nothing_running_is_lost(one_slot_node: NodeProcess) -> None:
    node = one_slot_node
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, timeout=180)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "count"}]
    # The one slot: a long stream, read a chunk at a time by this test, so it runs as long as the test needs it.
    holder = client.chat.completions.create(model=model, messages=messages, max_tokens=3000, stream=True,
                                            extra_body={"ignore_eos": True}, temperature=0)
    chunks = iter(holder)
    first = next(chunks)
    assert first.choices[0].delta is not None
    wait_until(lambda: _load(node)["active_sessions"] == 1, 30, what="the stream holds the node's one slot")

    # The queue's one place: a request that waits (in a thread: it returns only once the slot frees).
    waited: dict[str, object] = {}

    def waiting_request() -> None:
        try:
            waited["answer"] = client.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                                              temperature=0)
        except Exception as exc:
            waited["error"] = exc

    waiter = threading.Thread(target=waiting_request, daemon=True)
    waiter.start()
    wait_until(lambda: _load(node)["queued_requests"] == 1, 30, what="the second request waiting for the slot")
    assert _metric(node, "openhydra_queued_requests") == 1

    # Beyond the queue: refused at once, 503 with Retry-After and an OpenAI-style error, streaming or not.
    for stream in (False, True):
        refused = httpx.post(f"{node.url}/v1/chat/completions", timeout=30, json={
            "model": model, "messages": messages, "max_tokens": 4, "stream": stream})
        assert refused.status_code == 503, refused.text
        assert refused.headers.get("retry-after") == "2"
        error = refused.json()["error"]
        assert error["code"] == "overloaded" and "api.max_concurrent_sessions" in error["message"], error
    ollama = httpx.post(f"{node.url}/api/chat", timeout=30, json={"model": model, "messages": messages,
                                                                   "stream": False})
    assert ollama.status_code == 503 and "busy" in ollama.json()["error"], ollama.text

    # The running stream was not disturbed: it goes on, then ends; the waiting request then gets its answer.
    assert waiter.is_alive() and not waited
    more = [next(chunks) for _ in range(20)]
    assert all(c.choices[0].delta.content is not None for c in more if c.choices)
    holder.close()  # the client leaves: its slot frees and the waiting request runs
    waiter.join(timeout=120)
    assert "error" not in waited, waited.get("error")
    answer = waited["answer"]
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
    wait_until(lambda: _load(node)["active_sessions"] == 0 and _load(node)["queued_requests"] == 0, 30,
               what="the slot and the queue empty again")
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert again.choices[0].message.content == answer.choices[0].message.content  # greedy: the same answer


def test_a_wait_that_runs_out_is_refused_and_leaves_the_line() -> None:
    """api.queue_timeout_s: a request that waited that long for a slot gets Overloaded (the API's 503) and no longer
    counts as waiting; a slot freed afterwards goes to the next request."""
    import asyncio

    from openhydra.router.engine import Engine, Overloaded

    async def scenario() -> None:
        engine = Engine(None, None, eos_token_ids=set(), context_length=16, max_concurrent_sessions=1,
                        max_queued_requests=1, queue_timeout_s=0.05)
        await engine._admit()  # the one slot
        with pytest.raises(Overloaded, match=r"api\.queue_timeout_s"):
            await engine._admit()
        assert engine.queued == 0
        engine._slots.release()
        await asyncio.wait_for(engine._admit(), 5)  # the freed slot is taken at once

    asyncio.run(scenario())


def test_prompts_are_tokenized_off_the_event_loop() -> None:
    """A red team's ~1 MiB prompts held the loop ~1.3 s each (/health 2.3 s, an honest chat 19.9 s). The render
    below waits for the loop to run something else: on the loop itself it would wait in vain."""
    import asyncio
    import threading

    from openhydra.router.engine import Engine

    async def scenario() -> None:
        engine = Engine(None, None, eos_token_ids=set(), context_length=16)
        loop_ran = threading.Event()

        def render(text: str) -> list[int]:
            assert loop_ran.wait(30), "the event loop did not run while the prompt was rendered"
            assert threading.current_thread().name.startswith("tokenize")
            return [len(text)]

        pending = asyncio.ensure_future(engine.tokenized(render, "x" * 1000))
        await asyncio.sleep(0)
        loop_ran.set()  # only reached if the loop is free
        assert await asyncio.wait_for(pending, 30) == [1000]
        engine.shutdown()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def fair_node(tiny_llama: Path, tmp_path_factory) -> Iterator[NodeProcess]:
    with _one_slot_node(tiny_llama, tmp_path_factory.mktemp("fair"), queue=8) as node:
        yield node


def _client_from(node: NodeProcess, address: str) -> openai.OpenAI:
    """The official client, its connections from ``address`` (all of 127.0.0.0/8 is loopback: another client IP)."""
    http = httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=180)
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, http_client=http)


def test_a_client_that_queues_many_requests_delays_another_by_one(fair_node: NodeProcess) -> None:
    """A red team's queued requests made an honest one wait for all of them (one first-come line). Now each client
    has its own line and a freed slot goes to the next client in turn: the honest request, queued after six of the
    attacker's, runs second."""
    node = fair_node
    attacker, honest = _client_from(node, "127.0.0.2"), _client_from(node, "127.0.0.3")
    model = attacker.models.list().data[0].id
    messages = [{"role": "user", "content": "count"}]
    # the holder must outlast the queueing below; the node writes its stream into the socket buffers whether or not
    # the client reads (tens of MiB on loopback), so it runs to max_tokens: near the context (4,096)
    holder = attacker.chat.completions.create(model=model, messages=messages, max_tokens=4000, stream=True,
                                              extra_body={"ignore_eos": True}, temperature=0)
    chunks = iter(holder)
    next(chunks)
    wait_until(lambda: _load(node)["active_sessions"] == 1, 30, what="the attacker's stream holding the slot")
    finished: list[str] = []
    errors: list[Exception] = []

    def ask(client: openai.OpenAI, name: str) -> None:
        try:  # each its own prompt: identical greedy requests would be coalesced into one run
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"count {name}"}],
                                           max_tokens=2, temperature=0)
            finished.append(name)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(attacker, f"attacker{i}"), daemon=True) for i in range(6)]
    for thread in threads:  # all at once: one wait, not six, while the holder runs
        thread.start()
    wait_until(lambda: _load(node)["queued_requests"] == 6, 30, what="the attacker's requests queued")
    threads.append(threading.Thread(target=ask, args=(honest, "honest"), daemon=True))
    threads[-1].start()
    wait_until(lambda: _load(node)["queued_requests"] == 7, 30, what="the honest request queued behind them")
    holder.close()  # the slot frees
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    # one of the attacker's (its line is first come, first served), then the honest one: first come, it was 7th
    assert finished[0].startswith("attacker") and finished[1] == "honest", finished
    assert len(finished) == 7, finished
