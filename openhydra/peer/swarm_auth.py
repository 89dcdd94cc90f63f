"""The private-swarm credential on every peer RPC (crypto/membership.py): add it to calls, demand it on servers.

A node of a private swarm passes its token to :class:`~openhydra.peer.outbound.ChannelPool` (every
channel it opens, to peers or to a coordinator, then sends the ``openhydra-swarm`` metadata) and to its
gRPC servers as :class:`SwarmAuthInterceptor`, which answers PERMISSION_DENIED to a call without it,
before any handler (or the runtime) sees the request. Open swarms pass None and nothing changes.
"""

from __future__ import annotations

import logging
from collections import Counter

import grpc

from openhydra.crypto.membership import RPC_METADATA_KEY, rpc_token_ok

log = logging.getLogger(__name__)


def _metadata_with(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (RPC_METADATA_KEY, token))
    return details._replace(metadata=metadata)  # a namedtuple


class _UnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_metadata_with(client_call_details, self._token), request)


class _StreamToken(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_metadata_with(client_call_details, self._token), request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the swarm token to every unary and client-streaming call (the only kinds the
    protocol has). Two objects: a channel files each interceptor under the first call kind it matches."""
    return [_UnaryToken(token), _StreamToken(token)]


class SwarmAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (PERMISSION_DENIED) every call that lacks this swarm's token; counts refusals by method."""

    def __init__(self, token: str) -> None:
        self._token = token
        self.refused: Counter[str] = Counter()

    async def intercept_service(self, continuation, handler_call_details):
        if rpc_token_ok(self._token, handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        method = handler_call_details.method
        self.refused[method] += 1
        log.warning("refused %s: no valid private-swarm token", method)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        message = "this peer belongs to a private swarm: wrong or missing swarm credential"

        async def deny_unary(request, context):
            del request  # not kept by the abort's traceback (peer/refusals.py)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        async def deny_stream(request_iterator, context):
            del request_iterator
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer,
                                                   handler.response_serializer)
