"""A request whose session other coordinators push out of the node's runtime still answers, with the same text.

A node's runtime keeps serving.max_sessions sessions, its own requests' and other coordinators' (through its peer),
and evicts the least recently used. Before, a local request evicted mid-generation died: a non-streamed one with a
500 and a traceback in the log (a red team's finding, docs/security.md "Resource exhaustion"), a streamed one after
its 200. Now the node replays the session's history (router/pipeline.py LocalPipeline) and the answer is the one an
undisturbed run gives. A real node on the embedded SmolLM2 weights, the official openai client, and another
coordinator that is a real gRPC client of the node's peer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.messages import HopSpec
from openhydra.runtime.sampling import SamplingParams
from openhydra.testing.processes import DhtProcess, NodeProcess, free_port
from openhydra.testing.wait import wait_until

pytestmark = pytest.mark.slow
KEEP = 1
"""Sessions the node's runtime keeps here. LRU keeps a session that steps every few ms ahead of sessions arriving one
by one; the 64 of a default node are evicted that way only when 64 others arrive within one of its steps (the red
team's many concurrent streams). With one, each arriving session evicts the request's: the same eviction, on cue."""
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


@pytest.fixture(scope="module")
def node(smollm2_dir: Path, tmp_path_factory) -> Iterator[tuple[NodeProcess, int]]:
    """The whole model on one node of a swarm (its peer serves other coordinators; its own requests run locally)."""
    peer_port = free_port()
    with DhtProcess() as dht:
        overrides = ["model=local", f"model.path={smollm2_dir}", "hardware=cpu", "privacy=off", "discovery=http",
                     f"discovery.http.urls=[{dht.url}]", f"node.data_dir={tmp_path_factory.mktemp('eviction')}",
                     "api.rate_limit_requests=100000", f"serving.max_sessions={KEEP}",
                     "api.max_concurrent_sessions=1", f"peer.port={peer_port}"]
        with NodeProcess(overrides, threads=1) as running:
            yield running, peer_port


def _replays(node: NodeProcess) -> float:
    for line in httpx.get(f"{node.url}/metrics", timeout=30).text.splitlines():
        if line.startswith("openhydra_pipeline_replays_total "):
            return float(line.split()[1])
    return 0.0


def _active(node: NodeProcess) -> int:
    return httpx.get(f"{node.url}/v1/dashboard/summary", timeout=30).json()["load"]["active_sessions"]


class OtherCoordinator:
    """Opens a session on the node's peer whenever asked: the node's runtime keeps one, so the request's is evicted."""

    def __init__(self, peer_port: int) -> None:
        self.client = PeerChainClient([HopSpec(address=f"127.0.0.1:{peer_port}", start=0, end=30)],
                                      tunables=ClientTunables(step_timeout_s=60.0))
        self.opened = 0

    def evict(self) -> None:
        self.opened += 1
        self.client.step(f"other-{self.opened}", [1, 2, 3], 0, SamplingParams(), 0)


def _evicting(node: NodeProcess, other: OtherCoordinator, run, evictions: int) -> tuple[object, int]:
    """``run()`` in a thread while ``other`` evicts its session up to ``evictions`` times, each once the node has
    begun replaying the last (one may land in a replay: a step is retried up to LocalPipeline.REPLAYS times);
    returns what ``run`` returned and how many replays the node made meanwhile."""
    before = _replays(node)
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", run()), daemon=True)
    thread.start()
    wait_until(lambda: _active(node) == 1 or not thread.is_alive(), 120, what="the request running")
    for k in range(evictions):
        if not thread.is_alive():
            break
        other.evict()
        wait_until(lambda k=k: _replays(node) - before > k or not thread.is_alive(), 120,
                   what="the node replaying the evicted session")
    thread.join(timeout=300)
    assert "value" in result, "the request did not return"
    return result["value"], int(_replays(node) - before)


def test_evicted_requests_answer_with_the_undisturbed_text(node) -> None:
    running, peer_port = node
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    ask = {"model": model, "messages": MESSAGES, "max_tokens": 100, "temperature": 0,
           "extra_body": {"ignore_eos": True}}
    undisturbed = client.chat.completions.create(**ask).choices[0].message.content
    assert _replays(running) == 0
    other = OtherCoordinator(peer_port)
    try:
        reply, replays = _evicting(running, other, lambda: client.chat.completions.create(**ask), 3)
        assert replays >= 1, "no eviction landed while the request ran"
        assert reply.choices[0].message.content == undisturbed
        assert reply.usage.completion_tokens == 100

        def streamed() -> str:
            return "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(**ask, stream=True) if chunk.choices)

        text, replays = _evicting(running, other, streamed, 3)
        assert replays >= 1, "no eviction landed while the stream ran"
        assert text == undisturbed
        other.evict()  # one session held: what the node reports of its sessions
        sessions = httpx.get(f"{running.url}/v1/network/status", timeout=30).json()["serving"]["sessions"]
        assert (sessions["max"], sessions["held"]) == (KEEP, 1)
        assert 0 < sessions["kv_bytes"] < sessions["max_kv_bytes"]  # the default bound: half the memory available
    finally:
        other.client.shutdown()
    log = running.log_text()
    assert "was evicted from the runtime" in log and "Traceback" not in log
