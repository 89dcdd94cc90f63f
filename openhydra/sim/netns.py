"""Hosts in network namespaces on a bridge, with every connection between them through a delay relay.

Layout (all inside namespaces this module creates; the root namespace is not touched):

- ``<prefix>-r``: the router. It holds the bridge ``br0`` (10.77.0.1/24 here) and runs the relay.
- ``<prefix>-hN``: a host. Its veth on the bridge has ``10.77.0.(10+N)``; its *service* address
  ``10.78.0.(10+N)`` sits on its ``lo``: processes bind and announce that one. Routes send all of
  10.78.0.0/24 to the router, which accepts it locally through an AnyIP route (``ip route add local``)
  so the relay's listeners on 0.0.0.0 take every host's ports; the relay connects
  onward from 10.77.0.1, which a policy rule routes out over the bridge to the real host.
- Each host's ephemeral ports are pinned to a small range so the relay can listen on them too (the
  coordinator's reply server binds port 0).

So each link's latency and bandwidth is the relay's per-(host, host) setting, and cutting a host's
link (``ip link set ... down``) makes it unreachable exactly as a network failure would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

EPHEMERAL = (45000, 45031)  # per-host ephemeral port range (listeners on port 0 land here)
ROUTER_IP = "10.77.0.1"


def available() -> tuple[bool, str]:
    """Whether namespaces can be made here, and if not, why (for pytest skips)."""
    if sys.platform != "linux":
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return False, "the iproute2 `ip` command is missing"
    name = f"ohprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"`ip netns add` failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return True, ""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()}")
    return out


@dataclass
class Host:
    name: str  # short name, e.g. "dht", "peer1"
    netns: str
    index: int
    bridge_ip: str
    service_ip: str
    veth_router: str  # the veth end on the router's bridge (cut the link by setting it down)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]


@dataclass
class Topology:
    prefix: str
    hosts: dict[str, Host] = field(default_factory=dict)
    router: str = ""
    relay: subprocess.Popen | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="openhydra-netns-")))

    # -- building -----------------------------------------------------------------------------------------
    def create(self, names: Sequence[str]) -> Topology:
        self.remove_leftovers()
        self.router = f"{self.prefix}-r"
        sh("ip", "netns", "add", self.router)
        r = ["ip", "netns", "exec", self.router]
        sh(*r, "ip", "link", "set", "lo", "up")
        sh(*r, "ip", "link", "add", "br0", "type", "bridge")
        sh(*r, "ip", "addr", "add", f"{ROUTER_IP}/24", "dev", "br0")
        sh(*r, "ip", "link", "set", "br0", "up")
        # AnyIP: the whole service subnet is local here (the relay accepts for every host) ...
        sh(*r, "ip", "route", "add", "local", "10.78.0.0/24", "dev", "lo")
        # ... except for the relay's own onward connections, which leave from ROUTER_IP over the bridge.
        sh(*r, "ip", "rule", "add", "pref", "100", "from", ROUTER_IP, "to", "10.78.0.0/24", "lookup", "200")
        sh(*r, "ip", "rule", "add", "pref", "150", "lookup", "local")
        sh(*r, "ip", "rule", "del", "pref", "0")
        for i, name in enumerate(names):
            self.add_host(name, i)
        return self

    def add_host(self, name: str, i: int) -> Host:
        ns = f"{self.prefix}-h{i}"
        host = Host(name, ns, i, f"10.77.0.{10 + i}", f"10.78.0.{10 + i}", f"{self.prefix[:6]}r{i}")
        inner = f"{self.prefix[:6]}h{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", host.veth_router)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "link", "set", host.veth_router, "netns", self.router)
        r = ["ip", "netns", "exec", self.router]
        sh(*r, "ip", "link", "set", host.veth_router, "master", "br0")
        sh(*r, "ip", "link", "set", host.veth_router, "up")
        sh(*r, "ip", "route", "add", f"{host.service_ip}/32", "via", host.bridge_ip, "dev", "br0", "table", "200")
        h = host.cmd
        sh(*h("ip", "link", "set", "lo", "up"))
        sh(*h("ip", "addr", "add", f"{host.service_ip}/32", "dev", "lo"))
        sh(*h("ip", "link", "set", inner, "name", "eth0"))
        sh(*h("ip", "addr", "add", f"{host.bridge_ip}/24", "dev", "eth0"))
        sh(*h("ip", "link", "set", "eth0", "up"))
        sh(*h("ip", "route", "add", "10.78.0.0/24", "via", ROUTER_IP, "dev", "eth0"))
        sh(*h("sysctl", "-qw", f"net.ipv4.ip_local_port_range={EPHEMERAL[0]} {EPHEMERAL[1]}"))
        self.hosts[name] = host
        return host

    def start_relay(self, ports: Sequence[int], links: dict[tuple[str, str], tuple[float, float]],
                    default: tuple[float, float]) -> None:
        """Relay every host's ``ports`` (plus the ephemeral range); ``links[(a, b)] = (one-way ms, Mbit/s)``."""
        all_ports = sorted({*ports, *range(EPHEMERAL[0], EPHEMERAL[1] + 1)})
        table: dict[str, list[float]] = {}
        for (a, b), spec in links.items():
            ha, hb = self.hosts[a], self.hosts[b]
            for src in (ha.bridge_ip, ha.service_ip):
                table[f"{src}>{hb.service_ip}"] = list(spec)
                table[f"{src}>{hb.bridge_ip}"] = list(spec)
        config = {"listen": [["0.0.0.0", p] for p in all_ports], "bind_source": ROUTER_IP,
                  "links": table, "default": list(default)}
        path = self.workdir / "relay.json"
        path.write_text(json.dumps(config))
        log = open(self.workdir / "relay.log", "wb")  # noqa: SIM115 - kept open for the process' life
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, "-m", "openhydra.sim.relay", "--config", str(path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def set_delays(self, on: bool) -> None:
        """Switch the relay's added latency off (bandwidth caps stay) or back on."""
        if self.relay is not None:
            os.kill(self.relay.pid, signal.SIGUSR2 if on else signal.SIGUSR1)

    # -- faults -------------------------------------------------------------------------------------------
    def cut(self, name: str) -> None:
        """Take a host's link down on the router side: its packets go nowhere (no RST, no FIN)."""
        sh("ip", "netns", "exec", self.router, "ip", "link", "set", self.hosts[name].veth_router, "down")

    def restore(self, name: str) -> None:
        sh("ip", "netns", "exec", self.router, "ip", "link", "set", self.hosts[name].veth_router, "up")

    def remove_leftovers(self) -> None:
        """Namespaces of this prefix left by a run that was killed before its cleanup."""
        for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.prefix}-"):
                kill_netns_processes(name)
                sh("ip", "netns", "del", name, check=False)

    # -- teardown -----------------------------------------------------------------------------------------
    def destroy(self) -> None:
        if self.relay is not None and self.relay.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.relay.pid, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.relay.wait(timeout=10)
        for host in self.hosts.values():
            kill_netns_processes(host.netns)
            sh("ip", "netns", "del", host.netns, check=False)
        if self.router:
            kill_netns_processes(self.router)
            sh("ip", "netns", "del", self.router, check=False)


def kill_netns_processes(netns: str) -> None:
    """SIGKILL what still runs inside a namespace this module created (by pid, as `ip netns pids` lists)."""
    out = sh("ip", "netns", "pids", netns, check=False)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


@contextlib.contextmanager
def topology(prefix: str, names: Sequence[str]) -> Iterator[Topology]:
    topo = Topology(prefix)
    try:
        yield topo.create(names)
    finally:
        topo.destroy()
