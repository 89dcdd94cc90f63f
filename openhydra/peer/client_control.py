"""The coordinator's control calls on a session's hops: close, truncate, Info and settlement RPCs.

A mixin of :class:`openhydra.peer.client.PeerChainClient`. Calls that name a session carry a tag under that hop's
control key (peer/session_auth.py); under onion routing close and truncate travel along the onion instead, so the
coordinator never contacts a middle hop (peer/onion_control.py). Settlement calls come after the close, so the close
keeps the session's per-hop settlement keys for the settler (:meth:`ControlCalls.take_settlement_keys`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import grpc

from openhydra.peer import onion_control
from openhydra.peer.errors import HopError, transport_status
from openhydra.peer.messages import HopSpec
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.peer.session_auth import SettlementKeys, sign_for

MAX_SETTLEMENT_KEYS = 4096  # closed sessions whose settlement keys wait for the settler (oldest dropped)


class ControlCalls:
    """Session control and unary calls to peers (thread-safe public methods and their event-loop halves)."""

    def close(self, session_id: str, route: Sequence[HopSpec] | None = None) -> None:
        """Drop the session on every hop of the route (best effort) and close its stream."""
        self._call(self._close(session_id, self._route if route is None else tuple(route)))

    def info(self, address: str) -> pb.InfoReply:
        return self._call(self._info(address))

    def answers(self, address: str) -> bool:
        """Whether the peer at ``address`` answers Info within the liveness probe's timeout (router/bans.py
        Probation; a blocking call, made off the request path)."""
        try:
            self._call(self._info(address, self.probe_timeout()))
        except Exception:
            return False
        return True

    def peer_calls(self, calls: Sequence[tuple[str, str, Any]]) -> list[Any]:
        """Unary Peer RPCs ``(address, method, request)`` in parallel (settlement): each reply, or its error."""
        async def one(address: str, method: str, request: Any) -> Any:
            stub = pb_grpc.PeerStub(self._pool.get(address))
            return await getattr(stub, method)(request, timeout=self.tunables.unary_timeout_s)

        async def run() -> list[Any]:
            return await asyncio.gather(*(one(*call) for call in calls), return_exceptions=True)

        return self._call(run())

    def take_settlement_keys(self, session_id: str) -> SettlementKeys | None:
        """The closed session's per-hop settlement keys (once; None without encryption or when already taken)."""
        return self.settlement_keys.pop(session_id, None)

    def truncate(self, session_id: str, length: int, route: Sequence[HopSpec] | None = None) -> None:
        """Crop the session to ``length`` positions on every hop (speculative rollback).

        Raises :class:`HopError` naming the first hop that refuses (UNIMPLEMENTED for spans with
        recurrent layers, FAILED_PRECONDITION for a length beyond what the hop holds).
        """
        self._call(self._truncate(session_id, length, self._route if route is None else tuple(route)))

    async def _info(self, address: str, timeout: float | None = None) -> pb.InfoReply:
        stub = pb_grpc.PeerStub(self._pool.get(address))
        return await stub.Info(pb.InfoRequest(), timeout=timeout or self.tunables.unary_timeout_s)

    async def _truncate(self, session_id: str, length: int, route: tuple[HopSpec, ...]) -> None:
        """Every hop at once (one round trip, not one per hop); the first refusal in route order is raised."""
        if self.privacy.onion:  # along the onion: no direct call to a middle hop (peer/onion_control.py)
            return await onion_control.truncate(self, session_id, length, self.tunables.unary_timeout_s)
        crypto = self._crypto.get(session_id)
        calls = [pb_grpc.PeerStub(self._pool.get(hop.address)).Truncate(
                     sign_for(crypto, hop.address, pb.TruncateRequest(session_id=session_id, length=length)),
                     timeout=self.tunables.unary_timeout_s)
                 for hop in route]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for hop, outcome in zip(route, outcomes, strict=True):
            if isinstance(outcome, grpc.aio.AioRpcError):
                raise HopError(hop.address, *transport_status(outcome.code(), outcome.details() or "")) from None
            if isinstance(outcome, BaseException):
                raise outcome

    async def _close(self, session_id: str, route: tuple[HopSpec, ...]) -> None:
        if self.privacy.onion:  # along the onion, collecting each hop's own receipt (peer/onion_control.py)
            await onion_control.close(self, session_id, self.tunables.unary_timeout_s)
            self._crypto.pop(session_id, None)
            for key in [k for k in self._streams if k[0] == session_id]:
                await self._streams.pop(key).close()
            return
        crypto = self._crypto.pop(session_id, None)
        kept = SettlementKeys.of(session_id, crypto)  # the settler's SignSettlement/ApplySettlement come later
        if kept is not None:
            self.settlement_keys[session_id] = kept
            while len(self.settlement_keys) > MAX_SETTLEMENT_KEYS:  # popitem: atomic against the settler's take
                self.settlement_keys.popitem(last=False)
        for key in [k for k in self._streams if k[0] == session_id]:
            await self._streams.pop(key).close()
        for hop in route:
            stub = pb_grpc.PeerStub(self._pool.get(hop.address))
            request = sign_for(crypto, hop.address, pb.CloseRequest(session_id=session_id))  # session_auth.py
            with contextlib.suppress(grpc.aio.AioRpcError):  # a dead hop holds no session worth closing
                await stub.CloseSession(request, timeout=self.tunables.unary_timeout_s)
