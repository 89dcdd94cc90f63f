"""A real swarm across network namespaces: DHT, 4 span peers and a coordinator, links through the relay.

Hosts: ``dht`` (openhydra-dht), ``peer0..peer3`` (openhydra-node serving spans; peer3 duplicates
peer1's middle span, so a replacement exists), ``coord`` (an openhydra-node holding only layer 0,
a span no chain can use, so it only coordinates; clients call its OpenAI API). The client runs in
the coordinator's namespace (a thread that ``setns``-es into it), like a user on their own machine.

The scenario: discovery (every record reaches the coordinator with namespace addresses), a full
pipeline through the OpenAI API (streamed; per-token latency against compute + one-way hops), then
a middle peer's link is cut mid-stream: the stream must continue through the replica with the same
greedy text, and the cut peer must drop out of discovery when its record's TTL passes.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from openhydra.sim.netns import Topology
from openhydra.testing.processes import TEST_POW_BITS

CLONE_NEWNET = 0x40000000
DHT_PORT, PEER_PORT, API_PORT = 18468, 50051, 8080
HOSTS = ("dht", "peer0", "peer1", "peer2", "peer3", "coord")


def spans_for(total_layers: int) -> dict[str, tuple[int, int]]:
    a, b = total_layers // 3, 2 * total_layers // 3
    return {"peer0": (0, a), "peer1": (a, b), "peer2": (b, total_layers), "peer3": (a, b), "coord": (0, 1)}


def _enter(netns: str) -> None:
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
    finally:
        os.close(fd)


@dataclass
class StreamResult:
    text: str
    token_times: list[float]  # monotonic arrival of each content chunk
    started: float

    @property
    def gaps_ms(self) -> list[float]:
        t = self.token_times
        return [(b - a) * 1000.0 for a, b in itertools.pairwise(t)]


class NamespaceSwarm:
    def __init__(self, topo: Topology, model_dir: Path, total_layers: int, *, threads: int = 1) -> None:
        self.topo = topo
        self.model_dir = model_dir
        self.spans = spans_for(total_layers)
        self.threads = threads
        self.procs: dict[str, subprocess.Popen] = {}
        coord = topo.hosts["coord"]
        self.api = f"http://{coord.service_ip}:{API_PORT}"
        self._client_thread = ThreadPoolExecutor(1, initializer=_enter, initargs=(coord.netns,))
        self.model_id = "unknown"

    def _env(self) -> dict[str, str]:
        n = str(self.threads)
        return {**os.environ, "OMP_NUM_THREADS": n, "OPENHYDRA_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.topo.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.procs[name] = subprocess.Popen(self.topo.hosts[name].cmd(*argv), stdout=log, stderr=subprocess.STDOUT,
                                            env=self._env(), start_new_session=True)

    def start(self) -> None:
        dht = self.topo.hosts["dht"]
        self._spawn("dht", [sys.executable, "-m", "openhydra.discovery.http_dht_server", "--host", dht.service_ip,
                            "--port", str(DHT_PORT), "--allow-unsigned-names"])  # peers are named, unsigned
        for name, (a, b) in self.spans.items():
            ip = self.topo.hosts[name].service_ip
            self._spawn(name, [
                sys.executable, "-m", "openhydra.cli", "model=local", f"model.path={self.model_dir}", "hardware=cpu",
                "shard=layers", f"shard.start={a}", f"shard.end={b}", "discovery=http",
                f"discovery.http.urls=[http://{dht.service_ip}:{DHT_PORT}]", "discovery.ttl_s=6",
                "discovery.announce_interval_s=2", f"peer.host={ip}", f"peer.port={PEER_PORT}", f"api.host={ip}",
                f"api.port={API_PORT}", f"node.data_dir={self.topo.workdir / name}", f"node.peer_id={name}",
                "privacy=off",  # readable peer names need unsigned records; this run measures the network
                f"privacy.pow_difficulty_bits={TEST_POW_BITS}",  # the join proof of work, at the tests' low cost
            ])

    def call(self, fn, *args):
        """Run ``fn`` on the client thread (inside the coordinator's namespace)."""
        return self._client_thread.submit(fn, *args).result()

    def get(self, url: str, timeout: float = 5.0) -> httpx.Response:
        return self.call(lambda: httpx.get(url, timeout=timeout))

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        t0 = time.monotonic()
        pending = set(self.spans)
        while pending:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}")
            for name in sorted(pending):
                url = f"http://{self.topo.hosts[name].service_ip}:{API_PORT}/readyz?scope=node"
                try:
                    if self.get(url, 3.0).status_code == 200:
                        pending.discard(name)
                except httpx.HTTPError:
                    pass
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"not ready after {timeout_s} s: {sorted(pending)}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def status(self) -> dict:
        return self.get(self.api + "/v1/network/status", 10.0).json()

    def peers_seen(self) -> dict[str, dict]:
        swarm = self.status().get("swarm") or {}
        return {p["peer_id"]: p for p in swarm.get("peers", [])}

    def wait_discovery(self, expected: set[str], timeout_s: float = 60.0) -> float:
        t0 = time.monotonic()
        while set(self.peers_seen()) != expected:
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"coordinator sees {sorted(self.peers_seen())}, expected {sorted(expected)}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def stream_chat(self, prompt: str, max_tokens: int, on_token=None, timeout_s: float = 120.0) -> StreamResult:
        body = {"model": self.model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}

        def run() -> StreamResult:
            started = time.monotonic()
            text, times = read_chat_stream(self.api, body, timeout_s, on_token)
            return StreamResult(text, times, started)

        return self.call(run)

    def log(self, name: str) -> str:
        path = self.topo.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        self._client_thread.shutdown(wait=False)


def read_chat_stream(api: str, body: dict, timeout_s: float, on_token=None) -> tuple[str, list[float]]:
    """POST a streaming chat completion to ``api``; the text and each content delta's arrival time
    (``on_token(n)`` after the n-th). An error event raises."""
    parts, times = [], []
    with httpx.stream("POST", api + "/v1/chat/completions", json=body, timeout=timeout_s) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            delta = event["choices"][0].get("delta", {}).get("content")
            if delta:
                times.append(time.monotonic())
                parts.append(delta)
                if on_token is not None:
                    on_token(len(times))
    return "".join(parts), times


def steady_token_ms(result: StreamResult, skip: int = 2) -> float:
    """Median gap between streamed tokens, leaving out the first few (prefill, warm-up)."""
    gaps = result.gaps_ms[skip:]
    return statistics.median(gaps) if gaps else float("nan")


def run_scenario(model_dir: Path, total_layers: int, *, prefix: str = "ohswarm", one_way_ms: float = 10.0,
                 rate_mbit: float = 100.0, tokens: int = 24, cut_at_token: int = 8, rounds: int = 3,
                 threads: int = 1, ready_timeout_s: float = 300.0) -> dict:
    """Build the namespaces, run discovery, a pipeline and a link cut; return the measurements."""
    from openhydra.sim.netns import topology

    report: dict = {"one_way_ms": one_way_ms, "rate_mbit": rate_mbit, "tokens": tokens}
    with topology(prefix, HOSTS) as topo:
        links = {(a, b): (one_way_ms, rate_mbit) for a in HOSTS for b in HOSTS if a != b}
        topo.start_relay([DHT_PORT, PEER_PORT, API_PORT], links, (one_way_ms, rate_mbit))
        swarm = NamespaceSwarm(topo, model_dir, total_layers, threads=threads)
        try:
            swarm.start()
            report["ready_s"] = round(swarm.wait_ready(ready_timeout_s), 1)
            expected = set(swarm.spans)
            report["discovery_s"] = round(swarm.wait_discovery(expected), 1)
            swarm.model_id = swarm.status()["model"]["id"]
            seen = swarm.peers_seen()
            report["peers"] = {pid: {"span": p["span"], "grpc_address": p["grpc_address"]} for pid, p in seen.items()}
            prompt = "Name three colours of the rainbow and say one thing about each."
            chains: list[list[str]] = []

            def note_chain(n: int) -> None:
                if n == 3:
                    body = httpx.get(swarm.api + "/v1/network/status", timeout=5).json()
                    chains.extend((body.get("swarm") or {}).get("pipeline", {}).get("sessions", {}).values())

            warm = swarm.stream_chat(prompt, 4)  # first request: connections, lookups
            ref = swarm.stream_chat(prompt, tokens, on_token=note_chain)
            chain = chains[0] if chains else []
            # The same swarm with the relay's latency off and on, interleaved: off = compute + relay and
            # gRPC overhead; on should add exactly one pass of one-way hops (coordinator -> k peers -> back).
            off, on = [], []
            for _ in range(rounds):
                topo.set_delays(False)
                off.append(steady_token_ms(swarm.stream_chat(prompt, tokens)))
                topo.set_delays(True)
                on.append(steady_token_ms(swarm.stream_chat(prompt, tokens)))
            no_delay, measured = statistics.median(off), statistics.median(on)
            hops_ms = (len(chain) + 1) * one_way_ms
            predicted = no_delay + hops_ms
            report.update(warmup_tokens=len(warm.token_times), chain=chain, token_ms=round(measured, 2),
                          token_ms_no_delay=round(no_delay, 2), one_way_hops_ms=hops_ms,
                          predicted_token_ms=round(predicted, 2), ratio=round(measured / predicted, 3),
                          added_ms=round(measured - no_delay, 2), rounds_off=[round(x, 1) for x in off],
                          rounds_on=[round(x, 1) for x in on],
                          ttft_ms=round((ref.token_times[0] - ref.started) * 1000.0, 1))
            middle = chain[1] if len(chain) == 3 else "peer1"
            cut: dict[str, float] = {}

            def cut_middle(n: int) -> None:
                if n == cut_at_token:
                    topo.cut(middle)
                    cut["t"] = time.monotonic()

            faulty = swarm.stream_chat(prompt, tokens, on_token=cut_middle, timeout_s=180.0)
            after = [t for t in faulty.token_times if t > cut.get("t", float("inf"))]
            pipeline = (swarm.status().get("swarm") or {}).get("pipeline", {})
            report.update(cut_peer=middle, same_text_after_cut=faulty.text == ref.text,
                          tokens_after_cut=len(faulty.token_times), failovers=pipeline.get("failovers"),
                          banned=pipeline.get("banned"),
                          recovery_s=round(max(b - a for a, b in itertools.pairwise([cut["t"], *after])), 2)
                          if after and cut else None,
                          normal_gap_ms=round(steady_token_ms(faulty), 1))
            t0 = time.monotonic()
            while middle in swarm.peers_seen() and time.monotonic() - t0 < 30:
                time.sleep(0.5)
            report["cut_peer_gone_from_discovery_s"] = round(time.monotonic() - t0, 1)
            report["peers_after_cut"] = sorted(swarm.peers_seen())
            again = swarm.stream_chat(prompt, tokens)
            report["same_text_new_request_after_cut"] = again.text == ref.text
            report["relay_connections_log"] = topo.workdir.as_posix()
        except Exception:
            for name in swarm.procs:
                print(f"---- {name} log tail ----\n{swarm.log(name)[-1500:]}", file=sys.stderr)
            raise
        finally:
            swarm.stop()
    return report
