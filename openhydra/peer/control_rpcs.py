"""The peer's unary RPCs around the step path: session control (close, truncate), settlement, weights, Info.

A mixin of :class:`openhydra.peer.forward.PeerService`: control calls that name a session are authenticated
(peer/session_auth.py) before they touch it; Info is what liveness probes read (it needs no compute).
"""

from __future__ import annotations

import grpc

from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.session_auth import authorize_control
from openhydra.peer.wire import TORCH_TO_WIRE


class ControlRPCs:
    """Peer RPCs other than Forward (see peer.proto)."""

    async def CloseSession(self, request: pb.CloseRequest, context) -> pb.CloseReply:
        await authorize_control(self.privacy, self.runtime, self.address, request, context)  # PERMISSION_DENIED
        existed = self.runtime.session_length(request.session_id) > 0
        self.runtime.close_session(request.session_id)
        self.retained.drop(request.session_id)
        self.privacy.drop(request.session_id)
        self._upstream.pop(request.session_id, None)
        for key in [k for k in self._streams if k[1] == request.session_id]:
            await self._streams.pop(key).close()
        return pb.CloseReply(existed=existed)

    async def Truncate(self, request: pb.TruncateRequest, context: grpc.aio.ServicerContext) -> pb.TruncateReply:
        await authorize_control(self.privacy, self.runtime, self.address, request, context)  # PERMISSION_DENIED
        try:
            self.runtime.truncate_session(request.session_id, int(request.length))
        except NotImplementedError as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.address}: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.address}: {exc}")
        return pb.TruncateReply(length=self.runtime.session_length(request.session_id))

    async def SignSettlement(self, request: pb.SettlementClaim, context) -> pb.SettlementSignature:
        from openhydra.economy.settlement_wire import sign_rpc

        return await sign_rpc(self.settlement, request, context, self.address, self.privacy)  # PERMISSION_DENIED

    async def ApplySettlement(self, request: pb.SignedSettlement, context) -> pb.ApplySettlementReply:
        from openhydra.economy.settlement_wire import apply_rpc

        return await apply_rpc(self.settlement, request, context, self.address, self.privacy)  # PERMISSION_DENIED

    async def FetchWeights(self, request: pb.WeightsRequest, context: grpc.aio.ServicerContext):
        """Weights from the swarm: stream a range of this span's checkpoint (logic in openhydra/weights/serve.py)."""
        if self.weights is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this peer does not share weights")
        async for chunk in self.weights.stream(request, context):
            yield chunk

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoReply:
        rt = self.runtime
        return pb.InfoReply(
            model_id=self.model_id,
            model_type=rt.model_type,
            start=rt.start,
            end=rt.end,
            num_layers=rt.num_layers,
            dtype=TORCH_TO_WIRE[rt.dtype],
            hidden_size=rt.hidden_size,
            vocab_size=rt.vocab_size,
            active_sessions=rt.session_count(),
            steps_in_flight=self._in_flight,
            steps_served=self._served,
            address=self.address,
            crypto_rejections=self.privacy.counts(),
            requires_encryption=self.privacy.require_encryption,
        )
