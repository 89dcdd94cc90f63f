"""/readyz of a node in a swarm says whether a request to it would be served: its own span loaded *and* a chain of
peers covering the model (a load balancer stops sending traffic to a node that can only answer 503). ``?scope=node``
keeps the narrower meaning (this node's own part is up) for scripts that start a swarm node by node and for a
container's health check. While a hole lasts, requests after the first get their 503 at once instead of each
waiting ``route_wait_s`` for a peer that is not coming. Real node processes and a real DHT process."""

from __future__ import annotations

import time

import httpx
import pytest

from openhydra.router.swarm import FailoverTunables
from openhydra.testing.processes import DhtProcess, NodeProcess, swarm_node_overrides
from openhydra.testing.wait import wait_until

pytestmark = pytest.mark.slow

ROUTE_WAIT_S = FailoverTunables().route_wait_s
MESSAGES = [{"role": "user", "content": "Say hi."}]
TTL_S = 300.0  # the default's order (180 s): a record that leaves the head's view was withdrawn, not expired


def _readyz(node: NodeProcess, scope: str | None = None) -> httpx.Response:
    return httpx.get(node.url + "/readyz", params={"scope": scope} if scope else None, timeout=30)


def _chat(node: NodeProcess, model: str) -> httpx.Response:
    return httpx.post(node.url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": MESSAGES, "max_tokens": 4, "temperature": 0})


def _assert_no_route(reply: httpx.Response) -> None:
    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["status"] == "no_route" and body["holes"] == [[4, 8]], body
    assert "no chain of peers covers all 8 layers" in body["error"], body
    assert reply.headers["Retry-After"] == "5"


def test_readyz_follows_the_route_and_a_known_hole_fails_fast(tiny_model_dirs, tmp_path_factory):
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        head = NodeProcess(swarm_node_overrides(model, dht.url, 0, 4, tmp_path_factory.mktemp("head"), ttl_s=TTL_S))
        tail_dir = tmp_path_factory.mktemp("tail")
        tail = NodeProcess(swarm_node_overrides(model, dht.url, 4, 8, tail_dir, ttl_s=TTL_S))
        try:
            head.start().wait_ready()  # scope=node: its own span is up
            assert _readyz(head, "node").json() == {"status": "ready", "model": model.name}
            _assert_no_route(_readyz(head))  # nobody serves [4, 8) yet
            bad = _readyz(head, "everything")
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "scope", bad.text

            tail.start().wait_ready()
            wait_until(lambda: _readyz(head).status_code == 200, 60, 0.3, "the head to see a route")
            assert _readyz(head).json() == {"status": "ready", "model": model.name, "route": "covered"}
            assert _chat(head, model.name).status_code == 200

            tail.kill()  # the record stays in the DHT; the first request finds the dead hop
            first = _chat(head, model.name)
            assert first.status_code == 503 and first.headers["Retry-After"] == "5", first.text
            _assert_no_route(_readyz(head))  # the refused peer's record is dead to the head now
            for _ in range(3):  # the hole is known: no request waits route_wait_s for it again
                began = time.monotonic()
                again = _chat(head, model.name)
                took = time.monotonic() - began
                assert again.status_code == 503 and "holes: [[4, 8]]" in again.json()["error"]["message"], again.text
                assert took < ROUTE_WAIT_S - 1, f"a request waited {took:.1f} s for a hole already known"

            # The peer comes back (a new process, the same identity): the next request is served, at once.
            tail = NodeProcess(swarm_node_overrides(model, dht.url, 4, 8, tail_dir, ttl_s=TTL_S)).start().wait_ready()
            assert _chat(head, model.name).status_code == 200
            assert _readyz(head).status_code == 200

            # A clean stop (SIGTERM: the peer withdraws its record): the head's readiness follows within a lookup or
            # two, with no request needed to find out. Before, the head carried the withdrawn record as if the DHT had
            # restarted empty, and said 200 for ~165 s (an operator's probe).
            tail.stop()
            stopped = time.monotonic()
            wait_until(lambda: _readyz(head).status_code == 503, 60, 0.3, "the head to see the withdrawal")
            assert time.monotonic() - stopped < 30  # far below the ~165 s the record had left
            _assert_no_route(_readyz(head))
        finally:
            for node in (head, tail):
                node.stop()
