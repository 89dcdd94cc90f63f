"""A real node behind NAT with no relay: it says it is unreachable and why, and announces no span nobody could use."""

from __future__ import annotations

import httpx
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides


@pytest.mark.timeout(300)
def test_unreachable_node_reports_why_and_does_not_announce(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        node = NodeProcess([*swarm_node_overrides(model, dht.url, 0, 4, tmp_path / "laptop"), "privacy=off",
                            "node.peer_id=laptop", "peer.transport=libp2p", "peer.libp2p.behind_nat=true",
                            "peer.libp2p.host_maddrs=[/ip4/127.0.0.1/tcp/0]"], log_path=tmp_path / "laptop.log")
        try:
            (laptop,) = start_all([node])
            reach = httpx.get(laptop.url + "/v1/network/status", timeout=10).json()["swarm"]["reachability"]
            assert reach["reachable"] == "unreachable" and "no relay configured" in reach["reason"]
            assert reach["transport"] == "libp2p" and reach["libp2p_peer_id"]
            summary = httpx.get(laptop.url + "/v1/dashboard/summary", timeout=10).json()
            assert summary["node"]["reachable"].startswith("unreachable (libp2p: behind a NAT and no relay")
            peers = httpx.get(dht.url + "/v1/peers", params={"model_id": model.name}, timeout=5).json()["peers"]
            assert peers == []  # its span was never announced
            assert "not announcing layers [0, 4): unreachable" in (tmp_path / "laptop.log").read_text()
        finally:
            node.stop()
