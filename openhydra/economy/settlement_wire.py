"""Swarm settlement on the wire: peer.proto's settlement messages <-> the economy's receipts.

The gRPC handlers for ``SignSettlement`` and ``ApplySettlement`` live here so the peer server only
delegates to them. Every message is parsed strictly (pydantic, via
:class:`~openhydra.economy.receipts.SettlementRequest`) before anything is signed or applied; bad input
is INVALID_ARGUMENT, a claim that does not match what the peer served FAILED_PRECONDITION, a replayed
receipt ALREADY_EXISTS, a peer without settlement UNIMPLEMENTED. A call about a session that agreed keys without the
coordinator's tag (peer/session_auth.py settlement_refusal) is PERMISSION_DENIED, checked first and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from pydantic import ValidationError

from openhydra.economy.errors import InvalidReceipt, LedgerError, ReceiptAlreadyApplied
from openhydra.economy.peer_settlement import Claim, PeerSettlement, SettlementRefused
from openhydra.economy.receipts import PipelineEntry, ServedShare, SettlementRequest
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.session_auth import APPLY_SETTLEMENT, SIGN_SETTLEMENT, claim_args, settlement_refusal

log = logging.getLogger(__name__)


# -- messages ---------------------------------------------------------------------------------------
def entry_to_pb(entry: PipelineEntry) -> pb.SettlementShare:
    share = pb.SettlementShare(
        peer_id=entry.peer_id, public_key=bytes.fromhex(entry.public_key), layers_served=entry.layers_served
    )
    if isinstance(entry, ServedShare):
        share.signature = bytes.fromhex(entry.signature)
    return share


def claim_to_pb(claim: Claim) -> pb.SettlementClaim:
    return pb.SettlementClaim(
        session_id=claim.session_id, request_id=claim.request_id, model_id=claim.model_id,
        tokens_served=claim.tokens_served, start=claim.start, end=claim.end,
        pipeline=[entry_to_pb(p) for p in claim.pipeline],
    )


def claim_from_pb(message: pb.SettlementClaim) -> Claim:
    """Raises ValueError (pydantic ValidationError included) on a malformed claim."""
    if not message.session_id or not message.request_id or message.tokens_served < 1:
        raise ValueError("a claim needs session_id, request_id and tokens_served >= 1")
    pipeline = tuple(
        PipelineEntry(peer_id=p.peer_id, public_key=p.public_key.hex(), layers_served=p.layers_served)
        for p in message.pipeline
    )
    if pipeline:  # the same checks the receipt will get (ids, distinct peers, sizes)
        SettlementRequest(
            request_id=message.request_id, model_id=message.model_id, tokens_served=message.tokens_served,
            shares=[ServedShare(**p.model_dump(), signature="0" * 128) for p in pipeline],
        )
    return Claim(
        session_id=message.session_id, request_id=message.request_id, model_id=message.model_id,
        tokens_served=int(message.tokens_served), start=int(message.start), end=int(message.end), pipeline=pipeline,
    )


def receipt_to_pb(receipt: SettlementRequest) -> pb.SignedSettlement:
    return pb.SignedSettlement(
        request_id=receipt.request_id, model_id=receipt.model_id, tokens_served=receipt.tokens_served,
        shares=[entry_to_pb(s) for s in receipt.shares],
    )


def receipt_from_pb(message: pb.SignedSettlement) -> SettlementRequest:
    return SettlementRequest(
        request_id=message.request_id, model_id=message.model_id, tokens_served=message.tokens_served,
        shares=[
            ServedShare(peer_id=s.peer_id, public_key=s.public_key.hex(), layers_served=s.layers_served,
                        signature=s.signature.hex())
            for s in message.shares
        ],
    )


# -- the peer's RPC handlers -------------------------------------------------------------------------
async def sign_rpc(settlement: PeerSettlement | None, request: pb.SettlementClaim, context: Any,
                   address: str, privacy: Any) -> pb.SettlementSignature:
    if settlement is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{address}: this peer does not settle")
    auth = request.auth if request.HasField("auth") else None
    why = settlement_refusal(privacy, settlement, request.session_id, SIGN_SETTLEMENT, auth, claim_args(request))
    if why is not None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{address}: SignSettlement of {request.session_id} refused: {why}")
    try:
        claim = claim_from_pb(request)
    except (ValueError, ValidationError) as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{address}: bad settlement claim: {_short(exc)}")
    try:
        signed = settlement.sign(claim)
    except SettlementRefused as exc:
        log.warning("%s: refused to sign settlement %s: %s", address, request.request_id, exc)
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{address}: {exc}")
    return pb.SettlementSignature(
        peer_id=signed.peer_id, public_key=signed.public_key, positions_served=signed.positions_served,
        signature=signed.signature,
    )


async def apply_rpc(settlement: PeerSettlement | None, request: pb.SignedSettlement, context: Any,
                    address: str, privacy: Any) -> pb.ApplySettlementReply:
    """The receipt names no session: the peer finds it by the receipt id among those it signed. A receipt for a
    keyed session needs its coordinator's tag, so a stranger who saw the signatures cannot apply it first (and
    make the coordinator's own settle fail as a replay); any other receipt this peer did not sign is refused."""
    if settlement is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{address}: this peer does not settle")
    try:
        receipt = receipt_from_pb(request)
    except (ValueError, ValidationError) as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{address}: bad receipt: {_short(exc)}")
    session_id = settlement.session_of(receipt.receipt_id)
    if session_id is not None:
        auth = request.auth if request.HasField("auth") else None
        why = settlement_refusal(privacy, settlement, session_id, APPLY_SETTLEMENT, auth, receipt.receipt_id.encode())
        if why is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{address}: ApplySettlement of receipt {receipt.receipt_id} refused: {why}")
    try:
        result = await asyncio.to_thread(settlement.apply, receipt)  # a ledger write: off the event loop
    except ReceiptAlreadyApplied as exc:
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{address}: {exc}")
    except InvalidReceipt as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{address}: {exc}")
    except SettlementRefused as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{address}: {exc}")
    except LedgerError as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{address}: ledger: {exc}")
    if result is None:
        return pb.ApplySettlementReply(receipt_id=receipt.receipt_id, recorded=False)
    return pb.ApplySettlementReply(
        receipt_id=result.receipt_id, credits_micro=result.credits.get(settlement.identity.peer_id, 0), recorded=True
    )


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
    return str(exc)
