"""A refused call lets go of its request at once, not at the next full garbage collection.

Before (red team, 2026-12-07): each refused 63 MiB Forward step left ~67 MiB in the peer and two clients sending
refused steps took a node from 4.3 to 8.3 GB. The abort's traceback kept the handler's frames (and their request)
in a reference cycle, and gRPC's stream receiver kept the last message in a suspended generator. The test counts
the live request objects, with automatic collections off, after refused calls of both kinds.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import grpc
import pytest

from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing.wait import wait_until

CALLS = 8
PAD = 4 << 20  # bytes of an unknown field in each request


@pytest.fixture(scope="module")
def peer(tiny_model_dirs) -> Iterator[str]:
    from openhydra.testing.processes import free_port

    runtime = ShardRuntime(tiny_model_dirs["llama"], 0, 8)
    server = PeerServer(runtime, "127.0.0.1", free_port(), require_encryption=True)
    server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop()


def _padded(message) -> bytes:
    length, varint = PAD, bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return message.SerializeToString() + b"\xfa\x3f" + bytes(varint) + b"\x01" * PAD  # field 1023, bytes


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


@pytest.mark.parametrize("rpc", ["Forward", "Truncate"])
def test_refused_requests_are_not_kept(peer: str, rpc: str) -> None:
    channel = grpc.insecure_channel(peer, options=[("grpc.max_send_message_length", 64 << 20)])
    if rpc == "Forward":  # a sealed step for a session whose keys were never agreed: DATA_LOSS
        kind, payload = pb.Step, _padded(pb.Step(session_id="x", sealed=b"\x01" * 64))
        call = channel.stream_unary(f"/openhydra.peer.v1.Peer/{rpc}", request_serializer=None,
                                    response_deserializer=None)
        send = lambda: call(iter([payload]), timeout=30)  # noqa: E731
    else:  # a truncation past the session's length: FAILED_PRECONDITION
        kind, payload = pb.TruncateRequest, _padded(pb.TruncateRequest(session_id="x", length=5))
        call = channel.unary_unary(f"/openhydra.peer.v1.Peer/{rpc}", request_serializer=None,
                                   response_deserializer=None)
        send = lambda: call(payload, timeout=30)  # noqa: E731
    gc.collect()
    gc.disable()  # only what the code releases counts, not what a collection would find
    try:
        before = _alive(kind)
        codes = set()
        for _ in range(CALLS):
            with pytest.raises(grpc.RpcError) as refused:
                send()
            codes.add(refused.value.code())
        assert codes == {grpc.StatusCode.DATA_LOSS if rpc == "Forward" else grpc.StatusCode.FAILED_PRECONDITION}
        wait_until(lambda: _alive(kind) <= before, 30, 0.05,
                   f"the {CALLS} refused {rpc} requests released (alive: {_alive(kind) - before} more than before)")
    finally:
        gc.enable()
        channel.close()
