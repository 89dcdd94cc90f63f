"""A swarm across network namespaces: 7 namespaces on a bridge (router + DHT + 4 peers + coordinator),
every link through the userspace delay relay (10 ms one-way, 100 Mbit/s), tiny Llama (8 layers).

Runs where root and `ip netns` are available; skipped with the reason elsewhere. About 2 minutes,
most of it the coordinator noticing the cut link (the step deadline, ClientTunables.step_timeout_s).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from openhydra.sim.netns import available
from openhydra.sim.relay import DelayRelay, LinkSpec, Wire

OK, WHY = available()
needs_netns = pytest.mark.skipif(not OK, reason=f"needs root and network namespaces: {WHY}")


def test_wire_serializes_then_delays():
    wire = Wire(LinkSpec(delay_ms=10.0, rate_mbit=8.0), clock=lambda: 0.0)  # 1 MB/s
    assert wire.deliver_at(1000, now=0.0) == pytest.approx(0.001 + 0.010)
    assert wire.deliver_at(1000, now=0.0) == pytest.approx(0.002 + 0.010)  # queued behind the first
    assert wire.deliver_at(0, now=5.0) == pytest.approx(5.010)


def test_relay_adds_the_link_delay_on_loopback():
    """Echo through the relay: each round trip costs two one-way delays (20 ms each)."""
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen()
    port = echo.getsockname()[1]  # the relay listens on 127.0.0.2:port and connects to 127.0.0.1:port

    def serve():
        conn, _ = echo.accept()
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    loop = asyncio.new_event_loop()
    relay = DelayRelay([("127.0.0.2", port)], lambda s, d: LinkSpec(20.0), targets={"127.0.0.2": "127.0.0.1"})
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(relay.start(), loop).result(5)
    try:
        c = socket.create_connection(("127.0.0.2", port), timeout=5)
        rtts = []
        for _ in range(5):
            t0 = time.perf_counter()
            c.sendall(b"x" * 100)
            got = 0
            while got < 100:
                got += len(c.recv(1000))
            rtts.append((time.perf_counter() - t0) * 1000)
        c.close()
        assert 40.0 <= sorted(rtts)[2] < 200.0
        assert relay.connections == 1
    finally:
        asyncio.run_coroutine_threadsafe(relay.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        echo.close()


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_swarm_across_namespaces_discovers_pipelines_and_survives_a_link_cut(tiny_model_dirs):
    from openhydra.sim.netns_swarm import run_scenario

    r = run_scenario(tiny_model_dirs["llama"], 8, prefix="ohnst", one_way_ms=10.0, rate_mbit=100.0, tokens=24,
                     cut_at_token=8, rounds=3, ready_timeout_s=240.0)
    print({k: v for k, v in r.items() if k != "peers"})
    # discovery: every node, with its namespace address, as the coordinator sees it
    assert set(r["peers"]) == {"peer0", "peer1", "peer2", "peer3", "coord"}
    assert all(p["grpc_address"].startswith("10.78.0.") for p in r["peers"].values())
    # a full pipeline of three span peers; latency on adds one pass of one-way hops (4 x 10 ms) per token
    assert len(r["chain"]) == 3 and r["chain"][0] == "peer0" and r["chain"][2] == "peer2"
    assert r["token_ms"] >= 40.0
    assert 20.0 <= r["added_ms"] <= 80.0, r  # the relay's 4 one-way hops of 10 ms, within noise
    assert 0.6 < r["ratio"] < 1.5, r
    # the middle peer's link cut mid-stream: the stream continues through the replica, same text
    assert r["same_text_after_cut"] and r["tokens_after_cut"] == 24
    assert r["failovers"] >= 1  # (its ban, 1 s at first, has lapsed by now; the record is what keeps it out)
    # the stall: the coordinator notices the silent hop at its adaptive decode deadline (5 s floor), then replays
    assert r["recovery_s"] is not None and r["recovery_s"] < 30.0
    # its record lapses (it cannot announce), and new requests route around it
    assert r["cut_peer"] not in r["peers_after_cut"]
    assert r["same_text_new_request_after_cut"]
