"""Privacy claims that hold (issue 16 §3, docs/security.md "Privacy"): one test per attack, real processes on loopback.

1. Under ``privacy=onion`` a hop learns only its neighbours, also from the connections it sees: every TCP
   connection between the swarm's gRPC endpoints is recorded from the kernel's socket table while a request runs,
   is probed for liveness, is closed and is settled; hop i must see only hop i-1 and hop i+1, and the coordinator
   must be a neighbour of the first and the last hop only (it may not contact a middle hop for anything).
2. Under ``privacy=onion_dp`` a hop that sends its clean activations on, with the honest audit record of the noised
   tensor it should have sent, is caught at the next hop (which reports what it received) and named.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest

from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.errors import HopError
from openhydra.peer.privacy import ChainPrivacy
from openhydra.runtime.sampling import SamplingParams
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from tests.adversarial.dp_cheat_peer import peers

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "Name two rivers."}]
GREEDY = SamplingParams()
TOKENS = [11, 402, 93, 1770, 5, 318]


# ---- 1. who connects to whom under onion ----------------------------------------------------------------------


class ConnectionLog:
    """Every established TCP connection from one of ``processes`` to a port another of them listens on, polled
    from the kernel's socket table (psutil) every few ms while it runs: {(from role, to role)}. gRPC channels are
    pooled and long-lived, so a connection lives far longer than a poll interval."""

    def __init__(self, processes: dict[str, psutil.Process], ignore_ports: set[int]) -> None:
        self.processes, self.ignore_ports = processes, ignore_ports
        self.listening: dict[int, str] = {}
        self.outgoing: set[tuple[str, int]] = set()
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self, process: psutil.Process) -> list[psutil.Process]:
        try:
            return [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def poll(self) -> None:
        for role, process in self.processes.items():
            for proc in self._tree(process):
                try:
                    connections = proc.net_connections(kind="tcp")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                for c in connections:
                    if c.status == psutil.CONN_LISTEN:
                        self.listening[c.laddr.port] = role
                    elif c.status == psutil.CONN_ESTABLISHED and c.raddr:
                        self.outgoing.add((role, c.raddr.port))
        self.polls += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(0.005)

    def __enter__(self) -> ConnectionLog:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def edges(self) -> set[frozenset[str]]:
        """Who talked to whom (undirected), between different processes, API and DHT ports left out."""
        out = set()
        for role, port in self.outgoing:
            target = self.listening.get(port)
            if target is not None and target != role and port not in self.ignore_ports:
                out.add(frozenset((role, target)))
        return out


def _status(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def test_onion_hop_sees_only_its_neighbours(tiny_model_dirs, tmp_path):
    """The coordinator runs on its own node ("C", serving layers [0, 2), which no exact chain can use), the route is
    H0 [0,3) -> H1 [3,5) -> H2 [5,8). Probes are made to fire on every step (decode_timeout_s 0.5 s < the probe
    timeout, 3 s), the session is closed and settled (economy=barter). Before the fix the coordinator contacted H1
    directly (Info probes, CloseSession, SignSettlement/ApplySettlement) and every hop got the whole pipeline in the
    settlement body; now the only connections are C-H0, H0-H1, H1-H2, H2-C."""
    model_dir = tiny_model_dirs["qwen3"]
    spans = {"C": (0, 2), "H0": (0, 3), "H1": (3, 5), "H2": (5, 8)}
    with DhtProcess() as dht:
        nodes = {role: NodeProcess([*swarm_node_overrides(model_dir, dht.url, a, b, tmp_path / role),
                                    "privacy=onion", "verification=off", "peer.decode_timeout_s=0.5",
                                    "peer.probe_timeout_s=3"])  # a loaded machine's late answer is not a failover
                 for role, (a, b) in spans.items()}
        try:
            start_all(list(nodes.values()))
            _wait_for(lambda: len(_status(nodes["C"])["swarm"]["peers"]) == 4, 60, "C sees 4 peers")
            processes = {role: psutil.Process(node.proc.pid) for role, node in nodes.items()}
            ignore = {node.port for node in nodes.values()} | {int(dht.url.rsplit(":", 1)[1])}
            with ConnectionLog(processes, ignore) as log:
                client = openai.OpenAI(base_url=nodes["C"].url + "/v1", api_key="x", max_retries=0, timeout=120)
                reply = client.chat.completions.create(model=model_dir.name, messages=PROMPT, max_tokens=12,
                                                       temperature=0)
                assert reply.choices[0].message.content
                _wait_for(lambda: _status(nodes["C"]).get("settlement", {}).get("completed", 0) >= 1, 60,
                          "the session is settled")
                log.poll()
            status = _status(nodes["C"])
            assert status["swarm"]["pipeline"]["failovers"] == 0
            settlement = status["settlement"]
            assert settlement["settled"] == 1 and settlement["failed"] == 0, settlement
            assert settlement["peer_applied"] == 3, settlement  # one receipt per hop, each naming only that hop
        finally:
            for node in nodes.values():
                node.stop()
    edges = log.edges()
    allowed = {frozenset(p) for p in [("C", "H0"), ("H0", "H1"), ("H1", "H2"), ("H2", "C")]}
    assert edges <= allowed, f"connections beyond neighbours: {sorted(map(sorted, edges - allowed))}"
    assert {frozenset(("C", "H0")), frozenset(("H0", "H1")), frozenset(("H1", "H2"))} <= edges, edges  # it ran
    assert log.polls >= 3


# ---- 2. a hop that skips the DP noise but sends an honest-looking record --------------------------------------


@pytest.fixture(scope="module")
def dp_route(tiny_model_dirs) -> Iterator[tuple[list, list]]:
    """Hops [0,3), [3,5), [5,8) with an honest and a cheating peer for [3,5)."""
    with peers(tiny_model_dirs["llama"], [(0, 3, False), (3, 5, False), (3, 5, True), (5, 8, False)]) as hops:
        yield [hops[0], hops[1], hops[3]], [hops[0], hops[2], hops[3]]


def _client(route, tiny_model_dirs) -> PeerChainClient:
    return PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0),
                           privacy=ChainPrivacy(encrypt=True, onion=True, dp_sigma=0.001),
                           embedder=load_embedder(tiny_model_dirs["llama"]))


def test_dp_hop_that_sends_clean_activations_with_an_honest_record_is_named(dp_route, tiny_model_dirs):
    honest_route, cheating_route = dp_route
    honest = _client(honest_route, tiny_model_dirs)
    try:  # no false alarm: the honest chain runs prefill + decode and every record and delivery checks out
        token = honest.step("honest", TOKENS, 0, GREEDY, 0)
        for step in range(1, 4):
            token = honest.step("honest", [token], len(TOKENS) + step - 1, GREEDY, step)
        assert honest.dp_audits == 4 * 2 and not honest.crypto_rejections
        honest.close("honest")
    finally:
        honest.shutdown()
    cheated = _client(cheating_route, tiny_model_dirs)
    try:
        with pytest.raises(HopError) as info:
            cheated.step("cheated", TOKENS, 0, GREEDY, 0)
        assert info.value.address == cheating_route[1].address, info.value
        assert "other than the ones its DP record covers" in str(info.value)
        assert cheated.crypto_rejections["dp_audit_failed"] == 1
    finally:
        cheated.shutdown()


def test_onion_truncate_and_close_reach_every_hop_through_the_chain(dp_route, tiny_model_dirs):
    """The onion control path itself (no attacker): truncate (speculative rollback) and close sent along the onion
    act on every hop, and a decode after the rollback gives the token the first run gave at that position."""
    route = dp_route[0]
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0),
                             privacy=ChainPrivacy(encrypt=True, onion=True),
                             embedder=load_embedder(tiny_model_dirs["llama"]))
    try:
        first = client.step("ctl", TOKENS, 0, GREEDY, 0)
        second = client.step("ctl", [first], len(TOKENS), GREEDY, 1)
        client.step("ctl", [second], len(TOKENS) + 1, GREEDY, 2)
        client.truncate("ctl", len(TOKENS) + 1)  # drop the last fed position on every hop
        assert client.step("ctl", [second], len(TOKENS) + 1, GREEDY, 2) is not None  # accepted at that position
        with pytest.raises(HopError) as info:  # a length beyond what the hops hold is refused, naming the first hop
            client.truncate("ctl", 10_000)
        assert info.value.address == route[0].address and info.value.code.name == "FAILED_PRECONDITION", info.value
        held = [client.info(hop.address).active_sessions for hop in route]  # the test's own look, not C's
        assert all(n >= 1 for n in held)  # (other tests' sessions may linger on these peers: count this one)
        client.close("ctl")
        _wait_for(lambda: [client.info(hop.address).active_sessions for hop in route] == [n - 1 for n in held], 30,
                  "every hop dropped the session")
    finally:
        client.shutdown()
