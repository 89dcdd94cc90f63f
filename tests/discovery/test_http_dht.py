"""A real `openhydra-dht` process on loopback: announce, lookup, TTL expiry, 400s, bounds, withdraw."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time

import httpx
import pytest

from openhydra.crypto.identity import Identity
from openhydra.crypto.records import sign_record
from openhydra.discovery.base import DiscoveryError
from openhydra.discovery.http_dht import HttpDhtClient, HttpDiscovery
from openhydra.discovery.records import PeerAnnouncement
from openhydra.testing.wait import async_wait_until

from .conftest import start_dht_server, stop_process


def rec(peer: str, start: int = 0, end: int = 4, model: str = "org/model", ttl: float = 60.0, **kw):
    return PeerAnnouncement(
        peer_id=peer,
        model_id=model,
        start=start,
        end=end,
        total_layers=8,
        grpc_address="127.0.0.1:50051",
        announced_at=time.time(),
        ttl_s=ttl,
        **kw,
    )


def test_announce_lookup_and_ttl_expiry(dht_server):
    async def scenario():
        d = HttpDiscovery([dht_server], timeout_s=5, allow_unsigned_names=True)
        await d.start()
        await d.announce(rec("long", 4, 8, ttl=60.0))
        await d.announce(rec("other-model", model="org/other"))
        short = rec("short", 0, 4, ttl=3.0, throughput_tps=7.5)  # one lookup away: 3 s outlasts a loaded machine
        await d.announce(short)
        got = {r.peer_id: r for r in await d.lookup("org/model")}
        assert set(got) == {"short", "long"}
        assert got["short"].span == (0, 4) and got["short"].throughput_tps == 7.5

        async def only_long():
            ids = [r.peer_id for r in await d.lookup("org/model")]
            return ids if ids == ["long"] else None

        await async_wait_until(only_long, 30, 0.05, "the short-TTL record to expire, leaving only 'long'")
        assert time.time() >= short.announced_at + short.ttl_s - 0.05, "the record expired before its TTL"
        await d.withdraw("long")
        assert await d.lookup("org/model") == []
        assert [r.peer_id for r in await d.lookup("org/other")] == ["other-model"]
        await d.stop()

    asyncio.run(scenario())


def test_bad_records_get_400_with_error_schema(dht_server):
    good = rec("p").to_wire()
    cases = [
        {**good, "start": 6, "end": 4},
        {**good, "end": 9},
        {**good, "grpc_address": "nohost"},
        {**good, "ttl_s": -1},
        {k: v for k, v in good.items() if k != "peer_id"},
        [good],
    ]
    with httpx.Client(base_url=dht_server, timeout=5) as http:
        for body in cases:
            resp = http.post("/v1/announce", json=body)
            assert resp.status_code == 400, body
            err = resp.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_record" and err["message"]
        resp = http.post("/v1/announce", content=b"{not json")
        assert resp.status_code == 400
        assert http.get("/v1/peers").status_code == 400  # model_id missing
        assert http.delete("/v1/peers", params={"model_id": "m"}).json()["error"]["param"] == "peer_id"
        assert http.post("/v1/announce", content=b"x" * 100_000).status_code == 413
        # Unknown fields are ignored, not rejected; PUT works like POST.
        assert http.put("/v1/announce", json={**good, "peer_id": "extra", "new_field": 1}).status_code == 200
        peers = http.get("/v1/peers", params={"model_id": "org/model"}).json()["peers"]
        assert any(p["peer_id"] == "extra" and "new_field" not in p for p in peers)
        assert http.get("/v1/models").json()["models"]["org/model"] >= 1


def test_bounded_table_answers_503_and_client_raises():
    proc, url = start_dht_server("--max-records", "2", "--allow-unsigned-names")
    try:

        async def scenario():
            client = HttpDhtClient(url, timeout_s=5)
            await client.announce(rec("a"))
            await client.announce(rec("b"))
            with pytest.raises(DiscoveryError, match="HTTP 503"):
                await client.announce(rec("c"))
            await client.announce(rec("a"))  # refresh still accepted
            await client.aclose()

        asyncio.run(scenario())
    finally:
        stop_process(proc)


def test_one_address_keeps_a_bounded_number_of_peers():
    """A real server: the third new peer from one address gets 429 too_many_peers_from_source (counted in /metrics);
    the address's own peers still refresh."""
    proc, url = start_dht_server("--max-peers-per-source", "2", "--allow-unsigned-names")
    try:
        for peer in ("a", "b"):
            assert httpx.post(url + "/v1/announce", content=rec(peer).model_dump_json(), timeout=5).status_code == 200
        refused = httpx.post(url + "/v1/announce", content=rec("c").model_dump_json(), timeout=5)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "60", refused.text
        assert refused.json()["error"]["code"] == "too_many_peers_from_source", refused.text
        assert httpx.post(url + "/v1/announce", content=rec("a").model_dump_json(), timeout=5).status_code == 200
        assert "openhydra_dht_source_quota_refused_total 1" in httpx.get(url + "/metrics", timeout=5).text
    finally:
        stop_process(proc)


def test_unreachable_server_fails_within_deadline_and_second_server_answers(dht_server):
    async def scenario():
        dead = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused
        only_dead = HttpDiscovery([dead], timeout_s=1, allow_unsigned_names=True)
        with pytest.raises(DiscoveryError):
            await only_dead.lookup("org/model")
        # A server that accepts the connection and never answers: only the deadline ends the call.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            only_silent = HttpDiscovery(
                [f"http://127.0.0.1:{silent.getsockname()[1]}"], timeout_s=1, allow_unsigned_names=True
            )
            await only_silent.start()
            t0 = time.monotonic()
            with pytest.raises(DiscoveryError, match="Timeout"):
                await only_silent.lookup("org/model")
            elapsed = time.monotonic() - t0
            await only_silent.stop()
        assert 0.9 <= elapsed < 30, f"a 1 s deadline ended the call after {elapsed:.2f} s"  # < 30: not a hang
        both = HttpDiscovery(
            [dead, dht_server], timeout_s=10, allow_unsigned_names=True
        )  # refused at once; the live one may be slow
        await both.announce(rec("via-both"))
        assert "via-both" in {r.peer_id for r in await both.lookup("org/model")}
        await both.stop()
        await only_dead.stop()

    asyncio.run(scenario())


def test_client_drops_bad_records_in_an_answer():
    good = rec("good").to_wire()
    answer = {"peers": [good, {**good, "peer_id": "bad", "end": 99}, "junk", {**good, "model_id": "x/y"}]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))

    async def scenario():
        client = HttpDhtClient("http://dht.invalid", transport=transport)
        got = await client.lookup("org/model")
        await client.aclose()
        return client, got

    client, got = asyncio.run(scenario())
    assert [r.peer_id for r in got] == ["good"] and client.rejected == 2


def test_client_uses_only_records_signed_by_their_owner():
    """A server that serves forged records (this one is mocked) cannot make a reader use them."""
    owner, other = Identity.generate(), Identity.generate()
    genuine = sign_record(rec(owner.peer_id), owner, None)
    tampered = genuine.model_copy(update={"grpc_address": "127.0.0.1:9"})
    claimed = sign_record(rec(other.peer_id, model="org/model"), other, None).model_copy(
        update={"peer_id": owner.peer_id}
    )  # signed by another key than the peer id's
    unsigned_key_id = rec(other.peer_id)
    named = rec("alice")
    answer = {"peers": [r.to_wire() for r in (genuine, tampered, claimed, unsigned_key_id, named)]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))

    async def scenario(allow_unsigned_names: bool) -> tuple[list[PeerAnnouncement], HttpDiscovery]:
        client = HttpDhtClient("http://dht.invalid", transport=transport)
        reader = HttpDiscovery(["http://dht.invalid"], allow_unsigned_names=allow_unsigned_names)
        try:
            return reader.keep_valid(await client.lookup("org/model")), reader
        finally:
            await client.aclose()

    strict, reader = asyncio.run(scenario(False))
    assert [(r.peer_id, r.grpc_address) for r in strict] == [(owner.peer_id, "127.0.0.1:50051")]
    assert reader.refused == {"invalid_signature": 1, "peer_id_mismatch": 1, "unsigned": 2}
    permissive, _ = asyncio.run(scenario(True))  # names are then usable; key-derived ids still need the key
    assert sorted(r.peer_id for r in permissive) == sorted([owner.peer_id, "alice"])


def test_signed_peer_withdraws_with_its_key_and_no_one_else_can(dht_server):
    async def scenario():
        owner = Identity.generate()
        record = sign_record(rec(owner.peer_id), owner, None)
        peer, stranger, reader = (HttpDiscovery([dht_server], timeout_s=5) for _ in range(3))
        peer.set_identity(owner)
        try:
            await peer.announce(record)
            await stranger.announce(record)  # the same signed record, relayed: accepted (it is the owner's)
            assert [r.peer_id for r in await reader.lookup("org/model")] == [owner.peer_id]
            with pytest.raises(DiscoveryError, match="HTTP 401"):
                await stranger.withdraw(owner.peer_id)  # no key: an unsigned withdrawal
            assert [r.peer_id for r in await reader.lookup("org/model")] == [owner.peer_id]
            await peer.withdraw(owner.peer_id)
            assert await reader.lookup("org/model") == []
            await peer.announce(sign_record(rec(owner.peer_id), owner, None))  # a newer record: back again
            assert [r.peer_id for r in await reader.lookup("org/model")] == [owner.peer_id]
            await peer.withdraw(owner.peer_id)
        finally:
            await asyncio.gather(peer.stop(), stranger.stop(), reader.stop())

    asyncio.run(scenario())


def test_random_bodies_never_cause_a_server_error(dht_server):
    rng = random.Random(0)
    good = rec("fuzz").to_wire()
    junk = [None, True, -1, 0, 2**70, 1e308, "", "x" * 300, [], {}, [1, 2], {"a": None}, float("nan")]
    with httpx.Client(base_url=dht_server, timeout=5) as http:
        for _ in range(60):
            body = dict(good)
            for key in rng.sample(sorted(good), rng.randint(1, 4)):
                body[key] = rng.choice(junk)
            resp = http.post("/v1/announce", content=json.dumps(body, allow_nan=True))
            assert resp.status_code in (200, 400, 409), (body, resp.text)  # 409: same announced_at, other fields
        assert http.get("/health").status_code == 200


def test_cli_rejects_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "openhydra.discovery.http_dht_server", "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--port must be in 0..65535" in proc.stderr
