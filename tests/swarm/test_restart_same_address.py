"""A peer killed and restarted on the same address, as an operator's supervisor restarts it, while requests keep
coming: routable again within seconds of its start, every trial (an operator's probe found it unroutable for ~60 s
in 2 of 5 restarts: a connection refused to the dead process, reported after the new one announced, marked the new
process dead until its next announcement)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, free_port, start_all, swarm_node_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SPANS = [(0, 3), (3, 5), (5, 8)]
TRIALS = 4
ROUTABLE_WITHIN_S = 25.0
"""Far under the 60 s announce interval of the failure, with room for a loaded machine's restart."""


def _answer(node: NodeProcess, model: str, timeout_s: float = 60) -> str | None:
    try:
        reply = httpx.post(node.url + "/v1/chat/completions", timeout=timeout_s, json={
            "model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about the sea."}]})
    except httpx.HTTPError:
        return None
    return reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else None


def test_a_peer_restarted_on_its_address_is_routable_again_within_seconds(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        nodes = []
        for i, (a, b) in enumerate(SPANS):
            overrides = swarm_node_overrides(model_dir, dht.url, a, b, tmp_path / f"n{i}", interval_s=60.0,
                                             ttl_s=180.0)
            if i == 1:  # the middle span's only peer, always on this address
                overrides = [o for o in overrides if not o.startswith("peer.port=")] + [f"peer.port={free_port()}"]
            nodes.append(NodeProcess(overrides))
        coordinator, middle = nodes[0], nodes[1]
        try:
            start_all(nodes)
            model = httpx.get(coordinator.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            expected = None
            deadline = time.monotonic() + 60
            while expected is None and time.monotonic() < deadline:  # the first announcements reach the DHT
                expected = _answer(coordinator, model)
            assert expected, "the swarm never answered"
            answers: list[tuple[float, str | None]] = []
            stop = threading.Event()

            def load() -> None:  # requests keep coming, as from users, before, during and after each restart
                while not stop.is_set():
                    answers.append((time.monotonic(), _answer(coordinator, model)))

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            waits = []
            try:
                for _ in range(TRIALS):
                    os.killpg(middle.proc.pid, signal.SIGKILL)
                    middle.proc.wait(timeout=30)
                    time.sleep(0.5)  # the coordinator meets the dead address (its refusals) before the restart
                    middle.start().wait_ready(180)
                    ready = time.monotonic()
                    while time.monotonic() - ready < 90:
                        served = [at for at, text in answers if at > ready and text is not None]
                        if served:
                            break
                        time.sleep(0.2)
                    waits.append(served[0] - ready if served else float("inf"))
            finally:
                stop.set()
                loader.join(timeout=120)
            print(f"seconds from each restarted peer's start to a served request: {[round(w, 2) for w in waits]}")
            assert all(w < ROUTABLE_WITHIN_S for w in waits), f"seconds from the restarted peer's start to a served " \
                                                               f"request: {[round(w, 1) for w in waits]}"
            assert {text for _, text in answers if text is not None} == {expected}  # every answer exact
        finally:
            with ThreadPoolExecutor(len(nodes)) as pool:
                list(pool.map(NodeProcess.stop, nodes))
