"""Outgoing client streams, kept open per (session, destination) and reopened when they break.

Both the peer (pushing hidden states to its successor, results to the coordinator) and the
coordinator (pushing steps to the first peer) hold one of these per session. A write to a stream
that has already failed reopens it; a stream that ends with a non-OK status is reported through
``on_broken`` with the destination's address, so the failure can be blamed on the right hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from openhydra.peer.errors import transport_status

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest gRPC message a peer or coordinator sends or takes, of any RPC. gRPC reads and parses a whole message
before any handler runs, at ~2.5x its size in memory, and any stranger can call a peer, so this bounds what one
call can make a node hold (a red team, 2026-12-07: 512 MiB before, 3 calls took a peer from 0.5 to 2.6 GiB). The
legitimate messages are far smaller: a prefill chunk of 512 positions in fp32 needs 64 MiB only at hidden size 32,768,
a speculative verify's logits (33 positions) at a vocabulary of 500,000; the one that can grow with the context, a
rebuilt prompt prefix's activations (peer/rebuild_service.py), is refused above ``MAX_TENSOR_MESSAGE_BYTES`` and the
coordinator then replays the session in full."""
MAX_TENSOR_MESSAGE_BYTES = MAX_MESSAGE_BYTES - (1 << 20)
"""A tensor that fits one message with room for its step header and onion layers."""
KEEPALIVE_TIME_MS = 20_000
"""Clients ping an idle connection this often; servers accept pings this often (see SERVER_OPTIONS)."""


def channel_options(keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options of every outgoing channel. A restarted peer must be reachable again within a second or
    two: gRPC's default reconnect backoff grows to 120 s, so a channel to an address that was dead for a
    moment would keep failing fast long after the process came back."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        # Subchannels (the connections) of this channel are its own: gRPC otherwise shares them among every channel
        # of the process with the same address and options, so a channel made to replace one that met a dead
        # process (ChannelPool.discard) inherited its connection in backoff, and its first call failed at once with
        # the dead process's "Connection refused", blamed on the process just restarted on that address.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def server_options(keepalive_time_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options of every gRPC server (peers, the coordinator's Deliver server). The server must permit the
    clients' keepalive pings: its default (one ping per 5 min without data, 2 strikes) answers a client that
    pings every 20 s during a long step with GOAWAY ENHANCE_YOUR_CALM "too_many_pings", which killed long
    prefill steps. Half the client interval leaves room for timer jitter.

    ``grpc.so_reuseport`` off: gRPC's default on Linux lets a second process bind a port that is already served,
    and the kernel then splits incoming connections between the two (two peers answering as one address)."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", keepalive_time_ms // 2),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_time_ms // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


CHANNEL_OPTIONS = channel_options()
SERVER_OPTIONS = server_options()
STREAM_LIFETIME_S = 6 * 3600.0
"""Deadline of a long-lived session stream; each step carries its own, much shorter deadline."""

BrokenHandler = Callable[[str, grpc.StatusCode, str, Any], Awaitable[None]]
dial_resolver: Callable[[str], str] | None = None
"""What a channel to an address dials; set by peer/libp2p_transport.install so that ``<libp2p id>.p2p:1`` hop
addresses go through the local port carrying calls over libp2p. None: every address is dialed as it is."""


class StreamBroken(RuntimeError):
    """The destination refused or dropped the stream; ``code`` is the gRPC status it ended with."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"stream to {address} ended with {code.name}: {details}")
        self.address = address
        self.code = code
        self.details = details


class ChannelPool:
    """One HTTP/2 channel per address; every session's stream to that address multiplexes on it."""

    def __init__(self, swarm_token: str | None = None, options: list[tuple[str, int]] | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = options or CHANNEL_OPTIONS
        self._closing: set[asyncio.Future] = set()
        self._interceptors = None
        if swarm_token is not None:  # a private swarm: every call carries its credential (peer/swarm_auth.py)
            from openhydra.peer.swarm_auth import token_interceptors

            self._interceptors = token_interceptors(swarm_token)

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            target = dial_resolver(address) if dial_resolver is not None else address
            channel = grpc.aio.insecure_channel(target, options=self._options, interceptors=self._interceptors)
            self._channels[address] = channel
        return channel

    def discard(self, address: str) -> None:
        """Forget the channel to ``address`` (it refused or reset a connection): the next call dials afresh
        instead of inheriting the old channel's reconnect backoff, so a peer restarted on the same address
        is reachable at once. Calls still on the old channel get 10 s to finish (a reset connection has
        failed them already)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            task = asyncio.ensure_future(channel.close(grace=10.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace=None)


class OutboundStream:
    """A client stream to ``address`` for one session, opened lazily by ``open_call(channel)``."""

    def __init__(
        self,
        pool: ChannelPool,
        address: str,
        open_call: Callable[[grpc.aio.Channel], grpc.aio.StreamUnaryCall],
        on_broken: BrokenHandler,
    ) -> None:
        self.address = address
        self._pool = pool
        self._open_call = open_call
        self._on_broken = on_broken
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._watcher: asyncio.Task | None = None
        self._last_context: Any = None
        self._closing = False
        self._lock = asyncio.Lock()

    async def send(self, message: Any, context: Any = None) -> None:
        """Write ``message``; raises :class:`StreamBroken` if the destination cannot take it.

        ``context`` (e.g. the step's session/seq/reply address) is handed to ``on_broken`` if the
        stream later ends with an error while this was the last message written.
        """
        async with self._lock:
            if self._call is None or self._call.done():
                self._open()
            self._last_context = context
            try:
                await self._call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The stream died under us: let the watcher finish, then surface its status.
                status = await self._status()
                self._call = None
                if status[0] == grpc.StatusCode.UNAVAILABLE:
                    self._pool.discard(self.address)
                raise StreamBroken(self.address, *status) from None

    def _open(self) -> None:
        call = self._open_call(self._pool.get(self.address))
        self._call = call
        self._closing = False
        self._watcher = asyncio.ensure_future(self._watch(call))

    async def _status(self) -> tuple[grpc.StatusCode, str]:
        call = self._call
        if call is None:
            return grpc.StatusCode.UNAVAILABLE, "stream closed"
        try:
            await asyncio.wait_for(asyncio.shield(call), timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            return transport_status(exc.code(), exc.details() or "")
        except (TimeoutError, asyncio.CancelledError):
            return grpc.StatusCode.UNAVAILABLE, "stream broken"
        return grpc.StatusCode.UNAVAILABLE, "stream ended"

    async def _watch(self, call: grpc.aio.StreamUnaryCall) -> None:
        try:
            await call
            return
        except grpc.aio.AioRpcError as exc:
            code, details = transport_status(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            return
        if self._closing or code == grpc.StatusCode.CANCELLED:
            return
        if code == grpc.StatusCode.UNAVAILABLE:
            self._pool.discard(self.address)
        log.debug("stream to %s ended with %s: %s", self.address, code.name, details)
        try:
            await self._on_broken(self.address, code, details, self._last_context)
        except Exception:  # the handler is best effort; never kill the event loop over it
            log.exception("on_broken handler failed for %s", self.address)

    async def close(self) -> None:
        async with self._lock:
            call, self._call = self._call, None
            self._closing = True
            if call is None or call.done():
                return
            try:
                await call.done_writing()
                await asyncio.wait_for(call, timeout=5.0)
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
                call.cancel()
