"""Two laptops behind home NATs serve layers of one model through libp2p relays (openhydra/sim/nat.py topology).

Public segment: ``relay`` (the HTTP DHT bootstrap and 4 libp2p circuit relays, p2pd only: libp2p's autorelay
reserves at once when it knows 4 relays, else it waits 3 minutes) and ``coord`` (an openhydra-node with
``peer.transport=auto``, layers [0, 3), reachable directly; clients call its OpenAI API). Homes ``homea`` and
``homeb``, each behind its own NAT router (masquerade, unsolicited inbound dropped), run nodes with
``peer.transport=libp2p peer.libp2p.behind_nat=true`` holding [3, 6) and [6, 8).

A token's path: coordinator -> itself (gRPC) -> homea (libp2p, relayed: the coordinator cannot dial a home) ->
homeb (libp2p, relayed: NAT to NAT) -> coordinator's reply server (gRPC out through homeb's NAT).

Added latency (this kernel has no netem): ``relay_one_way_ms`` puts the userspace delay relay
(openhydra/sim/relay.py) in front of the p2pd relays; ``grpc_one_way_ms`` makes the nodes on the public segment
bind and announce service addresses routed through the wan namespace (NatTopology.add_service_ips), where another
delay relay takes every gRPC connection between hosts: coordinator -> public homes, home -> home, and the last hop
-> the coordinator's reply server (in either topology). A node's call to its own span stays local.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from openhydra.sim.nat import WAN_PREFIX, NatTopology, nat_topology
from openhydra.sim.netns_swarm import _enter, read_chat_stream
from openhydra.testing.processes import TEST_POW_BITS

DHT_PORT, PEER_PORT, API_PORT, RELAY_PORT = 18468, 50051, 8080, 4001
PUBLIC, HOMES = ("relay", "coord"), ("homea", "homeb")
N_RELAYS = 4
GRPC_EPHEMERAL = (45000, 45255)  # hosts with a service address: port-0 listeners land here, the delay relay too


def spans_for(total_layers: int) -> dict[str, tuple[int, int]]:
    a, b = 3 * total_layers // 8, 6 * total_layers // 8
    return {"coord": (0, a), "homea": (a, b), "homeb": (b, total_layers)}


class NatSwarm:
    def __init__(self, topo: NatTopology, model_dir: Path, total_layers: int, behind_nat: bool = True,
                 relay_one_way_ms: float = 0.0, grpc_one_way_ms: float = 0.0) -> None:
        self.topo = topo
        self.relay_one_way_ms = relay_one_way_ms  # > 0: every connection to a relay passes the delay relay
        self.delay: subprocess.Popen | None = None
        self.grpc_one_way_ms = grpc_one_way_ms  # > 0: every gRPC connection between hosts passes a delay relay
        self.grpc_delay: subprocess.Popen | None = None
        self.service_ips: dict[str, str] = {}  # node -> the address its gRPC servers bind and announce
        self.behind_nat = behind_nat  # False: the "homes" sit on the public segment and serve plain gRPC
        self.model_dir = model_dir
        self.spans = spans_for(total_layers)
        self.procs: dict[str, subprocess.Popen] = {}
        self.relays: dict[str, subprocess.Popen] = {}  # multiaddr -> p2pd
        self._threads = {name: ThreadPoolExecutor(1, initializer=_enter, initargs=(topo.hosts[name].netns,))
                         for name in ("coord", *HOMES)}
        self.api = f"http://{topo.hosts['coord'].ip}:{API_PORT}"
        self.model_id = "unknown"

    # -- processes ---------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], log_name: str | None = None, *,
               netns: str | None = None) -> subprocess.Popen:
        """``argv`` on host ``name`` (or in namespace ``netns``), its output in ``<log_name or name>.log``."""
        log = open(self.topo.workdir / f"{log_name or name}.log", "wb")  # noqa: SIM115 - lives with the process
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENHYDRA_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = ["ip", "netns", "exec", netns, *argv] if netns is not None else self.topo.hosts[name].cmd(*argv)
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _delay_relay(self, name: str, config: dict, *, host: str | None = None,
                     netns: str | None = None) -> subprocess.Popen:
        """The userspace delay relay (sim/relay.py) with ``config`` (written to ``<name>.json``), on ``host`` or in
        ``netns``; its log is ``<name>.log``."""
        path = self.topo.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        argv = [sys.executable, "-m", "openhydra.sim.relay", "--config", str(path)]
        return self._spawn(host or name, argv, name, netns=netns)

    def start_relays(self) -> list[str]:
        from openhydra.peer.libp2p_relay import ensure_identity, relay_command

        ip = self.topo.hosts["relay"].ip
        delayed = self.relay_one_way_ms > 0  # p2pd on loopback, the delay relay on the public address in front
        for i in range(N_RELAYS):
            key = self.topo.workdir / f"relay{i}.key"
            maddr = f"/ip4/{ip}/tcp/{RELAY_PORT + i}"
            full = f"{maddr}/p2p/{ensure_identity(key)}"
            control = f"/unix{self.topo.workdir}/relay{i}.sock"  # per run: a killed p2pd leaves its socket
            listen = f"/ip4/127.0.0.1/tcp/{RELAY_PORT + i}" if delayed else maddr
            self.relays[full] = self._spawn("relay", relay_command(key, listen, maddr if delayed else None,
                                                                   control=control), f"relay{i}")
        if delayed:
            self.delay = self._delay_relay("delay", {
                "listen": [[ip, RELAY_PORT + i] for i in range(N_RELAYS)], "targets": {ip: "127.0.0.1"},
                "links": {}, "default": [self.relay_one_way_ms, 0.0]}, host="relay")
        return list(self.relays)

    def start_grpc_delay(self) -> None:
        """Service addresses for the nodes on the public segment, and the delay relay on the wan in front of them
        (their peer port and the pinned ephemeral range, where the reply servers' port-0 listeners land)."""
        public = [name for name in self.spans if name not in HOMES or not self.behind_nat]
        self.service_ips = self.topo.add_service_ips(public, GRPC_EPHEMERAL)
        ports = [PEER_PORT, *range(GRPC_EPHEMERAL[0], GRPC_EPHEMERAL[1] + 1)]
        self.grpc_delay = self._delay_relay("grpc_delay", {
            "listen": [["0.0.0.0", p] for p in ports], "bind_source": f"{WAN_PREFIX}.1", "links": {},
            "default": [self.grpc_one_way_ms, 0.0]}, netns=self.topo.wan)

    @property
    def delay_relays(self) -> list[subprocess.Popen]:
        return [p for p in (self.delay, self.grpc_delay) if p is not None]

    def set_delays(self, on: bool) -> None:
        """The delay relays' added latency off (SIGUSR1) or on (SIGUSR2), between requests of one swarm."""
        for proc in self.delay_relays:
            os.kill(proc.pid, signal.SIGUSR2 if on else signal.SIGUSR1)

    def start(self) -> None:
        relay_host = self.topo.hosts["relay"].ip
        self.procs["dht"] = self._spawn("relay", [sys.executable, "-m", "openhydra.discovery.http_dht_server",
                                                  "--host", relay_host, "--port", str(DHT_PORT),
                                                  "--allow-unsigned-names"], "dht")
        relays = self.start_relays()
        if self.grpc_one_way_ms > 0:
            self.start_grpc_delay()
        for name, (a, b) in self.spans.items():
            ip = self.topo.hosts[name].ip
            home = name in HOMES and self.behind_nat
            transport = (["peer.transport=libp2p", "peer.libp2p.behind_nat=true", "peer.host=127.0.0.1",
                          f"peer.libp2p.relays=[{','.join(relays)}]"] if home else
                         ["peer.transport=auto", f"peer.host={self.service_ips.get(name, ip)}",
                          f"peer.libp2p.host_maddrs=[/ip4/{ip}/tcp/0]"])
            self.procs[name] = self._spawn(name, [
                sys.executable, "-m", "openhydra.cli", "model=local", f"model.path={self.model_dir}", "hardware=cpu",
                "hardware.dtype=float32", "shard=layers", f"shard.start={a}", f"shard.end={b}", "discovery=http",
                f"discovery.http.urls=[http://{relay_host}:{DHT_PORT}]", "discovery.ttl_s=6",
                "discovery.announce_interval_s=2", f"peer.port={PEER_PORT}", *transport, f"api.host={ip}",
                f"api.port={API_PORT}", f"node.data_dir={self.topo.workdir / name}", f"node.peer_id={name}",
                "privacy=off", f"privacy.pow_difficulty_bits={TEST_POW_BITS}",
            ])

    # -- calls from inside a namespace ---------------------------------------------------------------------
    def get(self, name: str, path: str, timeout: float = 10.0) -> httpx.Response:
        url = f"http://{self.topo.hosts[name].ip}:{API_PORT}{path}"
        return self._threads[name].submit(lambda: httpx.get(url, timeout=timeout)).result()

    def status(self, name: str = "coord") -> dict:
        return self.get(name, "/v1/network/status").json()

    def wait_ready(self, timeout_s: float) -> float:
        t0, pending = time.monotonic(), set(self.spans)
        while pending:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log(name)[-3000:]}")
            for name in sorted(pending):
                with contextlib.suppress(httpx.HTTPError):
                    if self.get(name, "/readyz?scope=node", 3.0).status_code == 200:
                        pending.discard(name)
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"not ready after {timeout_s} s: {sorted(pending)}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def peers_seen(self) -> dict[str, dict]:
        return {p["peer_id"]: p for p in (self.status().get("swarm") or {}).get("peers", [])}

    def wait_discovery(self, timeout_s: float = 60.0) -> float:
        t0 = time.monotonic()
        while set(self.peers_seen()) != set(self.spans):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"coordinator sees {sorted(self.peers_seen())}, expected {sorted(self.spans)}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def chat(self, prompt: str, max_tokens: int, stream: bool = False, on_token=None,
             timeout_s: float = 120.0) -> tuple[str, list[float]]:
        body = {"model": self.model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream, "ignore_eos": True}

        def run() -> tuple[str, list[float]]:
            if not stream:
                resp = httpx.post(self.api + "/v1/chat/completions", json=body, timeout=timeout_s)
                resp.raise_for_status()
                return resp.json()["choices"][0]["message"]["content"], []
            return read_chat_stream(self.api, body, timeout_s, on_token)

        return self._threads["coord"].submit(run).result()

    def relay_usage(self) -> tuple[float, int]:
        """CPU seconds and socket bytes (read + written) all relay daemons used so far (/proc of each p2pd)."""
        cpu, io = 0.0, 0
        for proc in self.relays.values():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                stats = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
                io += int(stats["rchar"]) + int(stats["wchar"])
        return cpu, io

    def kill_relay(self, maddr: str) -> None:
        proc = self.relays[maddr]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.topo.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        others = self.delay_relays
        for proc in [*self.procs.values(), *self.relays.values(), *others]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
        for proc in [*self.procs.values(), *self.relays.values(), *others]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        for pool in self._threads.values():
            pool.shutdown(wait=False)
        for i in range(len(self.relays)):  # p2pd leaves its control socket behind when killed
            (self.topo.workdir / f"relay{i}.sock").unlink(missing_ok=True)


def run_nat_scenario(model_dir: Path, total_layers: int, reference, *, prefix: str = "ohnat", tokens: int = 12,
                     ready_timeout_s: float = 240.0, relay_failover: bool = True, behind_nat: bool = True,
                     rounds: int = 1, relay_one_way_ms: float = 0.0, grpc_one_way_ms: float = 0.0) -> dict:
    """Build the NAT topology, serve a request through both homes, report paths; kill a relay mid-stream.

    ``reference(prompt_text, n) -> str``: the single-process greedy answer to compare with."""
    report: dict = {}
    public, homes = (PUBLIC, HOMES) if behind_nat else ((*PUBLIC, *HOMES), ())
    with nat_topology(prefix, public, homes) as topo:
        swarm = NatSwarm(topo, model_dir, total_layers, behind_nat, relay_one_way_ms, grpc_one_way_ms)
        try:
            t0 = time.monotonic()
            swarm.start()
            report["ready_s"] = round(swarm.wait_ready(ready_timeout_s), 1)
            report["discovery_s"] = round(swarm.wait_discovery(), 1)
            report["start_to_serving_s"] = round(time.monotonic() - t0, 1)
            status = swarm.status()
            swarm.model_id = status["model"]["id"]
            seen = swarm.peers_seen()
            report["peers"] = {pid: {"span": p["span"], "address": p["grpc_address"]} for pid, p in seen.items()}
            report["reachability"] = {name: swarm.status(name)["swarm"]["reachability"] for name in swarm.spans}
            prompt = "Name three colours of the rainbow."
            text, _ = swarm.chat(prompt, tokens)
            report["exact"] = text == reference(prompt, tokens)
            hop_paths: list = []

            def note(n: int) -> None:
                # On the client thread, inside the coordinator's namespace: every token until a sample shows the
                # running session (on a busy machine the stream may end before a single early sample is taken).
                if not hop_paths:
                    pipeline = (httpx.get(swarm.api + "/v1/network/status", timeout=5).json().get("swarm") or {})
                    hop_paths.extend(p for p in (pipeline.get("pipeline") or {}).get("hop_paths", {}).values() if p)

            token_ms, token_ms_delayed, exact_streamed = [], [], True
            cpu0, io0 = swarm.relay_usage()
            for _ in range(rounds):  # with delay relays: interleaved, their latency off then on
                for delayed in ([False, True] if swarm.delay_relays else [False]):
                    swarm.set_delays(delayed)
                    streamed, times = swarm.chat(prompt, tokens, stream=True, on_token=note)
                    exact_streamed = exact_streamed and streamed == text
                    gaps = sorted(b - a for a, b in itertools.pairwise(times[2:]))
                    (token_ms_delayed if delayed else token_ms).append(
                        round(1000 * gaps[len(gaps) // 2], 1) if gaps else None)
            cpu1, io1 = swarm.relay_usage()
            for _ in range(3):  # the stream ended before any sample saw its session (a lagging reader on a busy
                if hop_paths:  # machine): sample a longer one, not timed
                    break
                swarm.chat(prompt, max(64, 4 * tokens), stream=True, on_token=note)
            report.update(exact_streamed=exact_streamed, token_ms=token_ms, token_ms_delayed=token_ms_delayed,
                          relay_one_way_ms=relay_one_way_ms, grpc_one_way_ms=grpc_one_way_ms,
                          relay_cpu_ms_per_token=round(1000 * (cpu1 - cpu0) / (len(token_ms + token_ms_delayed)
                                                                               * tokens), 3),
                          relay_bytes_per_token=round((io1 - io0) / (len(token_ms + token_ms_delayed) * tokens)))
            report["hop_paths"] = hop_paths[0] if hop_paths else []
            report["homea_paths"] = swarm.status("homea")["swarm"]["reachability"].get("libp2p_paths", {})
            report["dashboard_homea"] = swarm.get("homea", "/v1/dashboard/summary").json()["node"].get("reachable")
            if relay_failover and behind_nat:
                via = _relay_of(swarm, swarm.status("homea"))
                cut: dict = {}

                def kill(n: int) -> None:
                    if n == 4 and via:
                        swarm.kill_relay(via)
                        cut["t"] = time.monotonic()

                after, times = swarm.chat(prompt, tokens, stream=True, on_token=kill, timeout_s=180.0)
                pipeline = (swarm.status().get("swarm") or {}).get("pipeline", {})
                later = [cut["t"], *[t for t in times if t > cut["t"]]] if cut else []
                report.update(killed_relay=via, same_text_after_relay_death=after == text,
                              tokens_after_relay_death=len(times), failovers=pipeline.get("failovers"),
                              relay_recovery_s=round(max(b - a for a, b in itertools.pairwise(later)), 2)
                              if len(later) > 1 else None,
                              homea_paths_after=swarm.status("homea")["swarm"]["reachability"].get("libp2p_paths"))
        except Exception:
            for name in [*swarm.procs, "relay0", *(["grpc_delay"] if swarm.grpc_delay is not None else [])]:
                print(f"---- {name} log tail ----\n{swarm.log(name)[-2500:]}", file=sys.stderr)
            raise
        finally:
            swarm.stop()
    return report


def _relay_of(swarm: NatSwarm, home_status: dict) -> str | None:
    """The relay (of ours) that homea's first announced circuit address goes through."""
    relayed = home_status["swarm"]["reachability"].get("relayed_maddrs") or []
    for maddr in relayed:
        for relay in swarm.relays:
            if maddr.startswith(relay + "/p2p-circuit"):
                return relay
    return None
