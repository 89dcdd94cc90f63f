"""Any stranger can call a peer, and gRPC reads and parses a whole message before a handler runs, at ~2.5x its size:
a red team (2026-12-07) made a peer hold 2.6 GiB with three 300 MiB ``Info`` calls under the old 512 MiB cap. The cap
is now 64 MiB for every RPC (peer/outbound.py); a larger message is refused by gRPC itself, and the peer serves on."""

from __future__ import annotations

import grpc
import pytest

from openhydra.peer.outbound import MAX_MESSAGE_BYTES
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime


@pytest.fixture(scope="module")
def peer(tiny_model_dirs):
    server = PeerServer(ShardRuntime(tiny_model_dirs["llama"], 0, 8))
    address = server.start()
    yield address
    server.stop()


def _info_with_padding(address: str, padding: int) -> pb.InfoReply:
    """Info whose request carries ``padding`` bytes the peer does not know: a Tensor's payload, sent as the bytes of an
    (empty) InfoRequest, whose parser keeps them as unknown fields."""
    request = pb.Tensor(payload=b"\0" * padding).SerializeToString()
    options = [("grpc.max_send_message_length", 1 << 30)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary("/openhydra.peer.v1.Peer/Info", request_serializer=None,
                                   response_deserializer=pb.InfoReply.FromString)
        return call(request, timeout=60)


def test_a_message_over_the_cap_is_refused_and_the_peer_serves_on(peer):
    assert _info_with_padding(peer, 1 << 20).address  # a padded message under the cap: answered
    with pytest.raises(grpc.RpcError) as refused:
        _info_with_padding(peer, MAX_MESSAGE_BYTES + 1)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert _info_with_padding(peer, 0).address  # still serving
