"""Fault trials against node processes, shared by the failover tests and bench/bench_failover.py.

A trial streams greedy tokens through the official ``openai`` client from a coordinator node and, when
token ``at`` arrives, sends a signal to the replica the session runs through; it records the text, the
arrival time of every token, and the coordinator's failover and replay counters around it.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai

from openhydra.testing.processes import NodeProcess

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def metric(url: str, name: str, http: httpx.Client | None = None) -> float:
    """A Prometheus counter of a node, summed over its labels."""
    total = 0.0
    text = (http.get(url + "/metrics") if http is not None else httpx.get(url + "/metrics", timeout=10)).text
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith(name + "_created") and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def swarm_status(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()["swarm"]


def session_replica(coordinator: NodeProcess, replicas: list[NodeProcess], span: tuple[int, int]) -> NodeProcess | None:
    """The replica of ``span`` that the coordinator's (only) active session runs through."""
    status = swarm_status(coordinator)
    by_peer = {p["peer_id"]: p for p in status["peers"]}
    for chain in status["pipeline"]["sessions"].values():
        for pid in chain:
            peer = by_peer.get(pid)
            if peer and tuple(peer["span"]) == span:
                port = int(peer["api_address"].rsplit(":", 1)[1])
                found = next((n for n in replicas if n.port == port), None)
                if found is not None:
                    return found
    LAST_STATUS.clear()
    LAST_STATUS.update(status)
    return None


LAST_STATUS: dict = {}
"""The coordinator's status when ``session_replica`` last found no replica (for failure messages)."""


def wait_routable(coordinator: NodeProcess, replica: NodeProcess, span: tuple[int, int], timeout_s: float) -> float:
    """Wait until the coordinator lists ``replica`` as a live peer of ``span``, neither banned nor on probation (a
    peer that stopped answering, until a probe finds it answering: router/bans.py); the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        for peer in swarm_status(coordinator)["peers"]:
            if (tuple(peer["span"]) == span and peer["api_address"].endswith(f":{replica.port}")
                    and not peer["banned"] and not peer.get("on_probation")):
                return time.monotonic() - began
        time.sleep(0.2)
    raise TimeoutError(f"the replica on port {replica.port} is not routable after {timeout_s} s")


@dataclass
class Trial:
    at: int
    text: str = ""
    times: list[float] = field(default_factory=list)  # request start, then each token's arrival (monotonic)
    error: str | None = None
    victim: NodeProcess | None = None
    faulted_at: float | None = None
    failovers: float = 0.0
    replays: float = 0.0
    rebuilds: float = 0.0  # replays that rebuilt only the replaced span (peer/rebuild.py)
    completion_tokens: int | None = None  # the server's usage count (chunks can merge tokens: UTF-8 pieces)
    missed: int = 0  # earlier streams that ended, or came too close to their end, before the fault could land
    fault_step: int | None = None  # the coordinator's step count (since the stream began) when the fault was sent

    @property
    def chunks(self) -> int:
        return max(0, len(self.times) - 1)

    @property
    def stall_s(self) -> float:
        """What the fault cost the client: the largest gap between consecutive arrivals (the request start
        counts as one) among those that end after the fault; without a fault, the largest gap of all."""
        since = self.faulted_at if self.faulted_at is not None else float("-inf")
        return max((b - a for a, b in itertools.pairwise(self.times) if b > since), default=0.0)


def stream(coordinator: NodeProcess, model: str, max_tokens: int, timeout_s: float = 120) -> Trial:
    """One greedy stream of exactly ``max_tokens`` tokens (``ignore_eos``), each text chunk's arrival timed (a chunk
    is one token, or a few when they complete one UTF-8 character together)."""
    trial = Trial(at=0)
    client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="x", max_retries=0, timeout=timeout_s)
    trial.times.append(time.monotonic())
    try:
        chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        for chunk in chunks:
            if chunk.usage is not None:
                trial.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    trial.text += choice.delta.content
                    trial.times.append(time.monotonic())
    except openai.APIError as exc:
        trial.error = f"{type(exc).__name__}: {exc}"
    return trial


def fault_trial(coordinator: NodeProcess, replicas: list[NodeProcess], span: tuple[int, int], model: str,
                max_tokens: int, at: int, sig: signal.Signals, attempts: int = 5) -> Trial:
    """Stream, and send ``sig`` to the session's replica of ``span`` once the coordinator has run ``at`` steps.

    The fault follows the coordinator's progress (its step counter, polled), not the client's: a reader lags the
    generation by any number of tokens (a starved client on a loaded machine; on a fast one the tiny model's last
    30 tokens took less than the reader's lag), and a fault after the last step tests nothing. If the stream still
    ends before the fault (the watcher starved), no session is left to fault: it is streamed again, up to
    ``attempts`` times in all (``Trial.missed`` counts them; ``victim`` stays None if every attempt missed).
    So is a stream the watcher first sees already past ``at`` by more than half of its remaining steps: a kill
    that close to the end can land after the last step (a loaded machine deschedules the watcher between its
    read and its kill) and would test nothing, while a replica would be spent."""
    missed = 0
    while True:
        trial = _fault_once(coordinator, replicas, span, model, max_tokens, at, sig)
        trial.missed = missed
        if trial.victim is not None or trial.error is not None or missed + 1 >= attempts:
            return trial
        missed += 1


STEPS_METRIC = "openhydra_pipeline_step_duration_seconds_count"  # pipeline steps the coordinator ran (successful)
POLL_S = 0.01  # a kill lands within a few tokens of step `at` (the tiny model: ~2 ms per token here)


def _fault_once(coordinator: NodeProcess, replicas: list[NodeProcess], span: tuple[int, int], model: str,
                max_tokens: int, at: int, sig: signal.Signals) -> Trial:
    before = (metric(coordinator.url, "openhydra_pipeline_failovers_total"),
              metric(coordinator.url, "openhydra_pipeline_replays_total"),
              metric(coordinator.url, "openhydra_pipeline_rebuilds_total"))
    base = metric(coordinator.url, STEPS_METRIC)
    state: dict = {}
    done = threading.Event()
    slack = max(1, (max_tokens - at) // 2)  # a prompt step, then one step per token

    def watch() -> None:  # a prompt step, then one step per token: step ``at`` is about token ``at``
        victim = None  # found as soon as the session is routed (its chain holds until the fault), so the kill
        with httpx.Client(timeout=10) as http:  # itself needs only the step counter
            while not done.is_set():
                if victim is None:
                    victim = session_replica(coordinator, replicas, span)
                steps = metric(coordinator.url, STEPS_METRIC, http) - base if victim is not None else -1
                if steps >= at:
                    if steps > at + slack:
                        return  # too late in this stream to fault it: streamed again (a miss), no replica spent
                    os.killpg(victim.proc.pid, sig)
                    state["victim"], state["at"], state["step"] = victim, time.monotonic(), int(steps)
                    return
                done.wait(POLL_S)

    watcher = threading.Thread(target=watch, name="fault-watcher", daemon=True)
    watcher.start()
    try:
        trial = stream(coordinator, model, max_tokens)
    finally:
        done.set()
        watcher.join(timeout=30)
    trial.at, trial.victim, trial.faulted_at = at, state.get("victim"), state.get("at")
    trial.fault_step = state.get("step")
    trial.failovers = metric(coordinator.url, "openhydra_pipeline_failovers_total") - before[0]
    trial.replays = metric(coordinator.url, "openhydra_pipeline_replays_total") - before[1]
    trial.rebuilds = metric(coordinator.url, "openhydra_pipeline_rebuilds_total") - before[2]
    return trial
