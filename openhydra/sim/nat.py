"""A public segment and home networks behind real NAT routers, in network namespaces (nftables masquerade).

Layout (every name below is prefixed; the root namespace is not touched):

- ``<p>-wan``: the "internet", a bridge ``br0`` with 10.80.0.1/24 (nothing else runs there).
- a public host ``<p>-<name>``: one veth on the bridge, ``10.80.0.(10+i)``; reachable by everyone.
- a home ``<p>-<name>`` behind its router ``<p>-<name>r``: the router has ``wan`` on the bridge
  (``10.80.0.(100+i)``) and ``lan`` to the home host (``192.168.(1+i).1/24``; the host is ``.2``).
  The router masquerades everything leaving ``wan`` and its forward chain drops what it did not see
  go out first (``ct state established,related``): the home host connects out, nobody connects in.
  Public hosts have no route to 192.168.0.0/16 at all, as on the internet.

``nft`` comes from Debian's ``nftables`` package (:func:`ensure_nft` installs it when missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from openhydra.sim.netns import available, kill_netns_processes, sh

WAN_PREFIX = "10.80.0"
SERVICE_PREFIX = "10.81.0"  # add_service_ips: public hosts' second address, routed through the wan namespace
NAT_RULES = """
table ip nat {
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    oifname "wan" masquerade
  }
}
table ip filter {
  chain forward_filter {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }
}
"""


def ensure_nft() -> tuple[bool, str]:
    """``nft`` present (installing Debian's nftables if root and apt are there); False with the reason if not."""
    if shutil.which("nft") is None and shutil.which("apt-get") is not None and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "nftables"]
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(install, capture_output=True, env=env)
    if shutil.which("nft") is None:
        return False, "nft (Debian package nftables) is not installed and could not be installed"
    return True, ""


def nat_available() -> tuple[bool, str]:
    ok, why = available()
    if not ok:
        return ok, why
    return ensure_nft()


@dataclass
class NatHost:
    name: str
    netns: str
    ip: str  # its own address (public: on the bridge; home: 192.168.x.2, private)
    public_ip: str  # where the internet sees it (its router's wan address for a home host)
    router: str = ""  # the NAT router's namespace ("" for a public host)
    uplink: str = ""  # the veth end on the bridge (cut the host, or its router, by setting it down)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]


@dataclass
class NatTopology:
    prefix: str
    hosts: dict[str, NatHost] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="openhydra-nat-")))

    @property
    def wan(self) -> str:
        return f"{self.prefix}-wan"

    def create(self, public: Sequence[str], homes: Sequence[str]) -> NatTopology:
        self.remove_leftovers()
        sh("ip", "netns", "add", self.wan)
        w = ["ip", "netns", "exec", self.wan]
        sh(*w, "ip", "link", "set", "lo", "up")
        sh(*w, "ip", "link", "add", "br0", "type", "bridge")
        sh(*w, "ip", "addr", "add", f"{WAN_PREFIX}.1/24", "dev", "br0")
        sh(*w, "ip", "link", "set", "br0", "up")
        for i, name in enumerate(public):
            ip = f"{WAN_PREFIX}.{10 + i}"
            ns = f"{self.prefix}-{name}"
            uplink = self._attach(ns, f"{self.prefix[:5]}p{i}", ip)
            self.hosts[name] = NatHost(name, ns, ip, ip, uplink=uplink)
        for i, name in enumerate(homes):
            self._add_home(name, i)
        return self

    def _attach(self, ns: str, veth: str, ip: str, ifname: str = "eth0") -> str:
        """A namespace with a veth on the bridge at ``ip``; returns the bridge-side end's name."""
        sh("ip", "netns", "add", ns)
        outer = f"{veth}b"
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", veth, "netns", ns)
        sh("ip", "link", "set", outer, "netns", self.wan)
        w = ["ip", "netns", "exec", self.wan]
        sh(*w, "ip", "link", "set", outer, "master", "br0")
        sh(*w, "ip", "link", "set", outer, "up")
        h = ["ip", "netns", "exec", ns]
        sh(*h, "ip", "link", "set", "lo", "up")
        sh(*h, "ip", "link", "set", veth, "name", ifname)
        sh(*h, "ip", "addr", "add", f"{ip}/24", "dev", ifname)
        sh(*h, "ip", "link", "set", ifname, "up")
        return outer

    def _add_home(self, name: str, i: int) -> None:
        router_ns, home_ns = f"{self.prefix}-{name}r", f"{self.prefix}-{name}"
        wan_ip, lan = f"{WAN_PREFIX}.{100 + i}", f"192.168.{1 + i}"
        uplink = self._attach(router_ns, f"{self.prefix[:5]}w{i}", wan_ip, ifname="wan")
        sh("ip", "netns", "add", home_ns)
        inner, outer = f"{self.prefix[:5]}l{i}", f"{self.prefix[:5]}m{i}"
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", inner, "netns", home_ns)
        sh("ip", "link", "set", outer, "netns", router_ns)
        r = ["ip", "netns", "exec", router_ns]
        sh(*r, "ip", "link", "set", outer, "name", "lan")
        sh(*r, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
        sh(*r, "ip", "link", "set", "lan", "up")
        sh(*r, "ip", "route", "add", "default", "via", f"{WAN_PREFIX}.1", "dev", "wan")
        sh(*r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        rules = self.workdir / f"{name}.nft"
        rules.write_text(NAT_RULES)
        sh(*r, "nft", "-f", str(rules))
        h = ["ip", "netns", "exec", home_ns]
        sh(*h, "ip", "link", "set", "lo", "up")
        sh(*h, "ip", "link", "set", inner, "name", "eth0")
        sh(*h, "ip", "addr", "add", f"{lan}.2/24", "dev", "eth0")
        sh(*h, "ip", "link", "set", "eth0", "up")
        sh(*h, "ip", "route", "add", "default", "via", f"{lan}.1", "dev", "eth0")
        self.hosts[name] = NatHost(name, home_ns, f"{lan}.2", wan_ip, router=router_ns, uplink=uplink)

    def add_service_ips(self, names: Sequence[str], ephemeral: tuple[int, int]) -> dict[str, str]:
        """Give public hosts a second address whose traffic passes the wan namespace (netns.py's AnyIP layout), so
        a delay relay there (listening on 0.0.0.0) sits on every connection to it; returns name -> that address.

        ``10.81.0.x`` (x as in the host's public address) sits on the host's ``lo``; every public host routes
        10.81.0.0/24 to 10.80.0.1 (homes get there through their routers' default route); the wan namespace
        accepts the whole subnet locally (``ip route add local``) and its own onward connections, from 10.80.0.1,
        leave over the bridge to the real host through a policy rule. The hosts' ephemeral ports are pinned to
        ``ephemeral`` so the relay can listen on a port-0 listener's port too (the coordinator's reply server)."""
        w = ["ip", "netns", "exec", self.wan]
        sh(*w, "ip", "route", "add", "local", f"{SERVICE_PREFIX}.0/24", "dev", "lo")
        sh(*w, "ip", "rule", "add", "pref", "100", "from", f"{WAN_PREFIX}.1", "to", f"{SERVICE_PREFIX}.0/24",
           "lookup", "200")
        sh(*w, "ip", "rule", "add", "pref", "150", "lookup", "local")
        sh(*w, "ip", "rule", "del", "pref", "0")
        for host in self.hosts.values():
            if not host.router:
                sh(*host.cmd("ip", "route", "add", f"{SERVICE_PREFIX}.0/24", "via", f"{WAN_PREFIX}.1", "dev", "eth0"))
        out = {}
        for name in names:
            host = self.hosts[name]
            if host.router:
                raise ValueError(f"{name} is behind a NAT: only public hosts get a service address")
            out[name] = f"{SERVICE_PREFIX}.{host.ip.rsplit('.', 1)[1]}"
            sh(*w, "ip", "route", "add", f"{out[name]}/32", "via", host.ip, "dev", "br0", "table", "200")
            sh(*host.cmd("ip", "addr", "add", f"{out[name]}/32", "dev", "lo"))
            sh(*host.cmd("sysctl", "-qw", f"net.ipv4.ip_local_port_range={ephemeral[0]} {ephemeral[1]}"))
        return out

    # -- faults -------------------------------------------------------------------------------------------
    def cut(self, name: str) -> None:
        sh("ip", "netns", "exec", self.wan, "ip", "link", "set", self.hosts[name].uplink, "down")

    def restore(self, name: str) -> None:
        sh("ip", "netns", "exec", self.wan, "ip", "link", "set", self.hosts[name].uplink, "up")

    # -- teardown -----------------------------------------------------------------------------------------
    def namespaces(self) -> list[str]:
        names = [h.netns for h in self.hosts.values()] + [h.router for h in self.hosts.values() if h.router]
        return [*names, self.wan]

    def remove_leftovers(self) -> None:
        for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.prefix}-"):
                kill_netns_processes(name)
                sh("ip", "netns", "del", name, check=False)

    def destroy(self) -> None:
        for ns in self.namespaces():
            kill_netns_processes(ns)
            sh("ip", "netns", "del", ns, check=False)


@contextlib.contextmanager
def nat_topology(prefix: str, public: Sequence[str], homes: Sequence[str]) -> Iterator[NatTopology]:
    topo = NatTopology(prefix)
    try:
        yield topo.create(public, homes)
    finally:
        topo.destroy()
