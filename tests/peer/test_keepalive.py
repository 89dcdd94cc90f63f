"""Client keepalive and server ping policy agree, so a call of any length survives.

gRPC servers by default accept one ping per 5 minutes on a connection without data and answer the third
early ping with GOAWAY ENHANCE_YOUR_CALM ("too_many_pings"). Our clients ping every ``KEEPALIVE_TIME_MS``
while a call is open, so a long prefill step used to lose its connection. Here the interval is shortened to
1 s and one call takes 8 s: with the server options every OpenHydra server uses it completes; with gRPC's
defaults it is cut (the check that this test can fail).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from openhydra.peer.outbound import channel_options, server_options

KEEPALIVE_MS = 1000
CALL_S = 8.0


async def _slow_call(server_opts: list[tuple[str, int]] | None) -> bytes:
    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(CALL_S)
        return b"done:" + request

    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)})
    server = grpc.aio.server(options=server_opts)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(KEEPALIVE_MS)) as channel:
            call = channel.unary_unary("/test.Slow/Call")
            return await call(b"x", timeout=CALL_S * 5)
    finally:
        await server.stop(0)


def test_long_call_survives_with_our_server_options() -> None:
    assert asyncio.run(_slow_call(server_options(KEEPALIVE_MS))) == b"done:x"


def test_long_call_is_cut_by_grpc_default_ping_policy() -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_slow_call(None))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
