"""Helpers for the privacy tests: keyed peers and an in-flight man in the middle between two hops."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import torch

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.records import encode_static_key
from openhydra.peer.messages import HopSpec
from openhydra.peer.outbound import CHANNEL_OPTIONS
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime

Mutate = Callable[[int, pb.Step, list[pb.Step]], list[pb.Step]]
"""(index of the inbound message, the message, everything seen so far) -> what to send on."""


def start_keyed_peers(model_dir: Path, splits, dtype=torch.float32, require_encryption: bool = True):
    """Peers with identities and signed static keys; the route carries what their announcements would."""
    servers, route = [], []
    for a, b in splits:
        identity, static = Identity.generate(), StaticKeyPair.generate()
        server = PeerServer(ShardRuntime(model_dir, a, b, dtype=dtype), static_key=static,
                            require_encryption=require_encryption)
        address = server.start()
        servers.append(server)
        route.append(HopSpec(address=address, start=a, end=b, peer_id=identity.peer_id,
                             static_key=encode_static_key(static.signed_by(identity))))
    return servers, route


class ManInTheMiddle:
    """A Peer.Forward relay on loopback that can alter, drop or replay messages on their way to
    ``target``; a failure status of the target's stream is passed back to the sender unchanged."""

    def __init__(self, target: str, mutate: Mutate) -> None:
        self.target, self.mutate = target, mutate
        self.seen: list[pb.Step] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> str:
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        relay = self

        class Servicer(pb_grpc.PeerServicer):
            async def Forward(self, request_iterator, context):
                return await relay._relay(request_iterator, context)

            async def Info(self, request, context):
                return await pb_grpc.PeerStub(relay._channel).Info(request, timeout=5)

            async def CloseSession(self, request, context):
                return await pb_grpc.PeerStub(relay._channel).CloseSession(request, timeout=5)

        pb_grpc.add_PeerServicer_to_server(Servicer(), self._server)
        await self._server.start()
        return f"127.0.0.1:{port}"

    async def _relay(self, request_iterator, context) -> pb.ForwardSummary:
        call = pb_grpc.PeerStub(self._channel).Forward(timeout=60)
        ended = asyncio.ensure_future(self._outcome(call))
        inbound = request_iterator.__aiter__()
        while True:
            read = asyncio.ensure_future(inbound.__anext__())
            await asyncio.wait({read, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                break
            try:
                step = read.result()
            except StopAsyncIteration:
                break
            out = self.mutate(len(self.seen), step, self.seen)
            self.seen.append(step)
            try:
                for message in out:
                    await call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break
        if not ended.done():
            await call.done_writing()
        code, details = await ended
        if code != grpc.StatusCode.OK:
            await context.abort(code, details)
        return pb.ForwardSummary(steps=len(self.seen))

    @staticmethod
    async def _outcome(call) -> tuple[grpc.StatusCode, str]:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._server.stop(0.2)
            await self._channel.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def flip_bit(message: pb.Step, bit: int) -> pb.Step:
    """A copy of ``message`` with one bit of its sealed payload flipped."""
    sealed = bytearray(message.sealed)
    sealed[bit // 8 % len(sealed)] ^= 1 << (bit % 8)
    out = pb.Step()
    out.CopyFrom(message)
    out.sealed = bytes(sealed)
    return out
