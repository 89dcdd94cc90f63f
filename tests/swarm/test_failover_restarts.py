"""Failover that holds after any history of faults: many trials, several positions, replicas restarted between.

Four node processes: the coordinator holds [0, 3), the middle span [3, 5) runs on two replicas, [5, 8) on one.
Each trial streams 200 greedy tokens through the official ``openai`` client and SIGKILLs the replica the session
runs through when token 1, 20 or 50 arrives; the killed replica is restarted (same identity, new process and
port) before the next trial, so every other trial fails over *onto* a restarted replica. Every stream must
finish with exactly the no-fault text, with exactly one failover and one replay each. Then SIGSTOP: the hung
replica is blamed after ``peer.decode_timeout_s`` plus at most one probe, and once resumed it serves exactly.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from openhydra.testing import failover
from openhydra.testing.failover import fault_trial, stream, wait_routable
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # node restarts take a minute at load 10

SPANS = [(0, 3), (3, 5), (3, 5), (5, 8)]
MIDDLE = (3, 5)
TOKENS = 200  # the tiny model is fast: the stream must still be running when token 50 arrives
DECODE_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 1.0
LEDGER: list[Path] = []  # the coordinator's ledger file


@pytest.fixture(scope="module")
def swarm(tiny_model_dirs, tmp_path_factory):
    model_dir = tiny_model_dirs["llama"]
    dirs = [tmp_path_factory.mktemp(f"n{i}") for i in range(len(SPANS))]
    LEDGER.append(dirs[0] / "ledger.db")
    with DhtProcess() as dht:
        # records live 60 s (re-announced every 2 s): a stopped replica's record must outlive the stream that
        # found it silent, which takes longer than the default 6 s on a loaded machine (its probation is checked)
        nodes = [NodeProcess([*swarm_node_overrides(model_dir, dht.url, a, b, dirs[i], ttl_s=60.0),
                              f"peer.decode_timeout_s={DECODE_TIMEOUT_S}", f"peer.probe_timeout_s={PROBE_TIMEOUT_S}"])
                 for i, (a, b) in enumerate(SPANS)]
        try:
            start_all(nodes)
            for replica in nodes[1:3]:
                wait_routable(nodes[0], replica, MIDDLE, 60)
            model = httpx.get(nodes[0].url + "/v1/models", timeout=10).json()["data"][0]["id"]
            clean = stream(nodes[0], model, TOKENS)
            assert clean.error is None and clean.completion_tokens == TOKENS
            assert len(set(clean.text.split())) > 5  # a real, varied continuation
            yield nodes, model, clean.text
        finally:
            for node in nodes:
                if node.proc is not None and node.proc.poll() is None:
                    os.killpg(node.proc.pid, signal.SIGCONT)
            with ThreadPoolExecutor(len(nodes)) as pool:  # the SIGTERM waits at once, not one after another
                list(pool.map(NodeProcess.stop, nodes))


def test_repeated_kills_with_restarts_fail_over_exactly_once_each(swarm):
    nodes, model, expected = swarm
    coordinator, replicas = nodes[0], nodes[1:3]
    wait_until(lambda: _settlement(coordinator)["queued"] == 0, 60, what="the clean stream's settlement")
    settled_before = _settlement(coordinator)
    outcomes, missed = [], 0
    for at in [1, 20, 50, 50, 20, 1]:
        trial = fault_trial(coordinator, replicas, MIDDLE, model, TOKENS, at, signal.SIGKILL)
        assert trial.victim is not None, f"no session to fault at token {at}: {failover.LAST_STATUS}"
        outcomes.append((at, trial.text == expected, trial.error, trial.failovers, trial.replays))
        missed += trial.missed  # streams that ended before the fault could land: served (and paid) all the same
        trial.victim.proc.wait(timeout=30)
        trial.victim.start().wait_ready(180)
        wait_routable(coordinator, trial.victim, MIDDLE, 60)  # a restarted replica is routable again at once
    assert all(ok and error is None for _, ok, error, _, _ in outcomes), outcomes
    assert all(f == 1 and r == 1 for *_, f, r in outcomes), outcomes  # one failure blamed once, one replay
    status = httpx.get(coordinator.url + "/v1/network/status", timeout=10).json()["swarm"]["pipeline"]
    assert status["replay_mismatches"] == 0
    # every faulted request is paid to its final chain: the hops that kept their caches took the old session's
    # record with them (adopt), the replacement computed the history; nothing fails to settle
    wait_until(lambda: _settlement(coordinator)["completed"] >= settled_before["completed"] + 6 + missed, 60,
               what="the faulted requests' settlements")
    after = _settlement(coordinator)
    settled = (after["settled"] - settled_before["settled"], after["failed"] - settled_before["failed"])
    assert settled == (6 + missed, 0), (after, missed)
    with sqlite3.connect(f"file:{LEDGER[0]}?mode=ro", uri=True) as db:
        tokens = [t for (t,) in db.execute("SELECT tokens_served FROM econ_settlement")]
    # each settles the positions the clean stream ran (prompt + 199 tokens fed back), less whole 32-token prompt
    # blocks every hop seeded from its prefix cache (the prompt repeats; a restarted replica's cache is empty)
    full = max(tokens)  # the clean stream: nothing seeded
    prompt = full - (TOKENS - 1)
    assert len(tokens) == 7 + missed and all((full - t) % 32 == 0 and 0 <= full - t < prompt for t in tokens), tokens


def _settlement(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()["settlement"]


def test_a_hung_replica_is_blamed_within_patience_and_serves_again_once_resumed(swarm):
    nodes, model, expected = swarm
    coordinator, replicas = nodes[0], nodes[1:3]
    trial = fault_trial(coordinator, replicas, MIDDLE, model, TOKENS, 20, signal.SIGSTOP)
    hung = trial.victim
    assert hung is not None
    try:
        assert trial.error is None and trial.text == expected
        assert trial.failovers == 1 and trial.replays == 1
        # blamed after the patience plus at most one probe, then replayed (the tiny model: well under a second on a
        # quiet machine). The coordinator scales both with the latencies it sees (20x a decode step, 5x a probe),
        # so on a loaded machine the bound is what it reports, not the configured floors.
        live = failover.swarm_status(coordinator)["pipeline"]["liveness"]
        patience = max(DECODE_TIMEOUT_S, live["patience_s"])
        probe = max(PROBE_TIMEOUT_S, live["probe_timeout_s"])
        assert trial.stall_s <= patience + probe + max(1.0, 10 * live["decode_latency_s"]), (trial.stall_s, live)
        # Still stopped, its ban lapsed: it stays out of routes (on probation: each lapse starts a probe it does not
        # answer), so no later stream pays the patience to find it silent again (before: each lapse cost a stream
        # a stall and a failover).
        hung_id = next(p["peer_id"] for p in failover.swarm_status(coordinator)["peers"]
                       if p["api_address"].endswith(f":{hung.port}"))
        wait_until(lambda: hung_id not in failover.swarm_status(coordinator)["pipeline"]["banned"], 30, 0.2,
                            "the hung replica's first ban to lapse")
        before = failover.swarm_status(coordinator)["pipeline"]["failovers"]
        for _ in range(3):
            after_lapse = stream(coordinator, model, TOKENS // 4)
            assert after_lapse.error is None and expected.startswith(after_lapse.text), after_lapse.text
        status = failover.swarm_status(coordinator)["pipeline"]
        assert status["failovers"] == before and hung_id in status["on_probation"], status
    finally:
        os.killpg(hung.proc.pid, signal.SIGCONT)
    wait_routable(coordinator, hung, MIDDLE, 60)
    other = next(r for r in replicas if r is not hung)
    other.kill()  # only the resumed replica is left for the middle span
    try:
        again = stream(coordinator, model, TOKENS)
        assert again.error is None and again.text == expected
    finally:
        other.start().wait_ready(180)
