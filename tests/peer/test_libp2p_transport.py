"""The peer protocol over libp2p (hivemind's p2pd) on loopback: a middle peer whose only address is its libp2p
peer id serves sealed, onion-routed steps exactly; control RPCs and failures travel the same way."""

from __future__ import annotations

from collections.abc import Iterator

import base58
import grpc
import pytest

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.records import encode_static_key
from openhydra.peer import libp2p_transport as lt
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.peer.embedding import load_embedder
from openhydra.peer.messages import HopSpec
from openhydra.peer.privacy import ChainPrivacy
from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime
from tests.peer.test_pipeline_grpc import _generate, _hf_greedy, _prompt

SPLITS = [(0, 2), (2, 5), (5, 8)]
LOOPBACK = lt.Libp2pSettings(host_maddrs=["/ip4/127.0.0.1/tcp/0"], relay_service=False)


@pytest.fixture(scope="module")
def libp2p_chain(tiny_model_dirs) -> Iterator[dict]:
    """Peers 0 and 2 on gRPC; peer 1 announced only as ``<libp2p id>.p2p:1`` (its gRPC port is in no route)."""
    egress, middle = lt.Libp2pTransport(LOOPBACK), lt.Libp2pTransport(LOOPBACK)
    egress.start()
    middle.start()
    lt.install(egress)
    servers, route = [], []
    try:
        for i, (a, b) in enumerate(SPLITS):
            identity, static = Identity.generate(), StaticKeyPair.generate()
            hop = lt.p2p_address(middle.peer_id) if i == 1 else None
            server = PeerServer(ShardRuntime(tiny_model_dirs["qwen3_5"], a, b), static_key=static,
                                require_encryption=True, advertise_address=hop)
            local = server.start()
            servers.append(server)
            if i == 1:
                middle.serve(local)
            route.append(HopSpec(address=hop or local, start=a, end=b, peer_id=identity.peer_id,
                                 static_key=encode_static_key(static.signed_by(identity))))
        egress.learn(middle.peer_id, middle.maddrs())  # as its discovery record would say
        yield {"servers": servers, "route": route, "egress": egress, "middle": middle}
    finally:
        lt.install(None)
        for server in servers:
            server.stop()
        egress.stop()
        middle.stop()


def test_onion_chain_through_a_libp2p_only_peer_equals_generate(tiny_model_dirs, libp2p_chain) -> None:
    route, middle, egress = libp2p_chain["route"], libp2p_chain["middle"], libp2p_chain["egress"]
    assert route[1].address.endswith(".p2p:1")
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0),
                             privacy=ChainPrivacy(encrypt=True, onion=True),
                             embedder=load_embedder(tiny_model_dirs["qwen3_5"]))
    try:
        prompt = _prompt(seed=7)
        assert _generate(client, "libp2p-onion", prompt, 10) == _hf_greedy(tiny_model_dirs["qwen3_5"], prompt, 10)
        # peer 0 pushed to peer 1 over libp2p (one Forward stream), sealed exactly as over gRPC
        assert middle.calls["ingress"] >= 1 and libp2p_chain["servers"][1].service._served >= 10
        assert all(not s.service.crypto_rejections for s in libp2p_chain["servers"])
        assert egress.paths().get(middle.peer_id) == "direct"  # loopback: no relay in between
        # a control RPC to the libp2p-only hop
        assert client.info(route[1].address).active_sessions >= 1
    finally:
        client.shutdown()


def test_a_stream_that_breaks_before_an_answer_is_resent_only_for_read_only_calls(libp2p_chain) -> None:
    """A libp2p stream p2pd had already dropped fails on its first write (BrokenPipeError, seen in CI under load).
    Info changes nothing and is sent again on a fresh stream; Truncate is not resent (UNAVAILABLE)."""
    from openhydra.peer.proto import peer_pb2 as pb
    from openhydra.peer.proto import peer_pb2_grpc as pb_grpc

    egress, route = libp2p_chain["egress"], libp2p_chain["route"]
    real = egress.p2p.iterate_protobuf_handler
    breaks = {"left": 0}

    async def flaky(*args, **kwargs):
        if breaks["left"] > 0:
            breaks["left"] -= 1
            raise BrokenPipeError(32, "Broken pipe")
        return await real(*args, **kwargs)

    egress.p2p.iterate_protobuf_handler = flaky
    try:
        with grpc.insecure_channel(lt.dial_target(route[1].address)) as channel:
            stub = pb_grpc.PeerStub(channel)
            before = dict(egress.calls)
            breaks["left"] = 1
            assert stub.Info(pb.InfoRequest(), timeout=20).start == SPLITS[1][0]
            assert egress.calls["retried"] - before["retried"] >= 1 and egress.calls["failed"] == before["failed"]
            breaks["left"] = lt.READ_ONLY_ATTEMPTS - 1  # the last send goes over a fresh connection, and answers
            retried, reconnected = egress.calls["retried"], egress.calls["reconnected"]
            assert stub.Info(pb.InfoRequest(), timeout=20).start == SPLITS[1][0]
            assert egress.calls["retried"] - retried == lt.READ_ONLY_ATTEMPTS - 1
            assert egress.calls["reconnected"] - reconnected == 1 and egress.calls["failed"] == before["failed"]
            breaks["left"] = 1
            with pytest.raises(grpc.RpcError) as err:
                stub.Truncate(pb.TruncateRequest(session_id="s", length=0), timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "BrokenPipeError" in err.value.details()
            assert not breaks["left"] and egress.calls["failed"] - before["failed"] == 1  # sent once, not resent
            breaks["left"] = lt.READ_ONLY_ATTEMPTS  # a stream that breaks on every send is not hidden
            with pytest.raises(grpc.RpcError) as err:
                stub.Info(pb.InfoRequest(), timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert egress.calls["failed"] - before["failed"] == 2
    finally:
        egress.p2p.iterate_protobuf_handler = real


def test_auto_peer_whose_grpc_port_refuses_is_reached_over_libp2p(tiny_model_dirs, libp2p_chain) -> None:
    """peer.transport=auto: announced at host:port plus libp2p addresses; when that port refuses TCP (here: the
    server listens on 127.0.0.1 only, the record says 127.0.0.3), the caller goes over libp2p instead."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    announced = f"127.0.0.3:{port}"
    transport = lt.Libp2pTransport(LOOPBACK)
    transport.start()
    identity, static = Identity.generate(), StaticKeyPair.generate()
    server = PeerServer(ShardRuntime(tiny_model_dirs["qwen3_5"], 2, 5), port=port, static_key=static,
                        require_encryption=True, advertise_address=announced)
    client = None
    try:
        transport.serve(server.start())
        libp2p_chain["egress"].learn_fallback(announced, transport.maddrs())  # as the node's lookup does
        route = list(libp2p_chain["route"])
        route[1] = HopSpec(address=announced, start=2, end=5, peer_id=identity.peer_id,
                           static_key=encode_static_key(static.signed_by(identity)))
        client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=20.0),
                                 privacy=ChainPrivacy(encrypt=True, onion=True),
                                 embedder=load_embedder(tiny_model_dirs["qwen3_5"]))
        prompt = _prompt(seed=11)
        assert _generate(client, "auto-fallback", prompt, 6) == _hf_greedy(tiny_model_dirs["qwen3_5"], prompt, 6)
        assert transport.calls["ingress"] >= 1 and server.service._served >= 6
    finally:
        if client is not None:
            client.shutdown()
        server.stop()
        transport.stop()


def test_unreachable_libp2p_peer_fails_unavailable_naming_it(libp2p_chain) -> None:
    stranger = lt.Libp2pTransport(LOOPBACK)
    stranger.start()
    peer_id = stranger.peer_id
    stranger.stop()  # a peer id nobody can reach: no address known, no relay
    address = lt.p2p_address(peer_id)
    client = PeerChainClient([HopSpec(address=address, start=0, end=8)],
                             tunables=ClientTunables(step_timeout_s=10.0, unary_timeout_s=10.0))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            client.info(address)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and peer_id in err.value.details()
    finally:
        client.shutdown()


def test_behind_nat_without_a_relay_is_unreachable_and_says_why() -> None:
    transport = lt.Libp2pTransport(LOOPBACK.model_copy(update={"behind_nat": True}))
    transport.start()
    try:
        reach = transport.wait_reachable()
        assert reach.reachable == "unreachable" and "no relay configured" in reach.reason
        assert reach.libp2p_peer_id == transport.peer_id and not reach.relayed_maddrs
    finally:
        transport.stop()


def test_encode_maddr_writes_peer_ids_as_p2pd_reads_them() -> None:
    """hivemind's py-multiaddr writes /p2p/<id> as a CIDv1 (p2pd: "length greater than remaining number of bytes")."""
    peer = "12D3KooWKPNC2FP5on6W65EjqBm7hsQuME4Lv8xQc6xcuKduYZ88"
    data = lt.encode_maddr(f"/ip4/10.0.0.1/tcp/4001/p2p/{peer}/p2p-circuit").to_bytes()
    digest = base58.b58decode(peer)
    assert bytes([0xA5, 0x03, len(digest)]) + digest + bytes([0xA2, 0x02]) in data
