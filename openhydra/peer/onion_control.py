"""Control messages along the onion: under ``privacy=onion`` the coordinator never contacts a middle hop.

Closing a session, truncating it (speculative rollback) and collecting each hop's settlement receipt all travel
the way activations do: one message on the session's sealed Forward stream to the first hop, relayed hop by hop
(each hop seals it for its successor, as it seals activations), and the last hop's sealed Result back to the
coordinator. So a hop is contacted only by its predecessor (the first hop by the coordinator) and contacts only its
successor (the last hop the coordinator): the connections of a control message are those of a token.

Wire (peer.proto ``Step.control``, ``Step.control_replies``, ``Result.control_replies``): the inner step has no
positions; ``control[i]`` is hop i's command, sealed end to end with AES-256-GCM under a key derived from hop i's
audit key (only the coordinator and hop i hold it, so the hops that relay it can neither read nor alter it),
associated data = (direction, session, hop index, seq). The list is padded with random blobs to
:data:`PAD_HOPS` entries and every command to :data:`COMMAND_BYTES`, so a hop does not learn the route length
from it. Each hop appends its sealed :class:`ControlReply` to ``control_replies`` (so hop i sees i replies: its
index, which it knows anyway) and the last hop returns them all.

Settlement under onion (economy/swarm_settlement.py): at close each hop signs a receipt naming only itself
(``SettlementRequest.model_layers`` scales its credits to its share of the model, the split the whole-pipeline
receipt would give), applies it to its own ledger and returns it in its reply; the coordinator verifies each and
applies them to its ledger. No hop ever sees another hop's identity, so no hop learns the pipeline.

Liveness probes (``Info``) go only to the coordinator's neighbours under onion (peer/client.py ``_probe``): a
middle hop that stops is found by its neighbours (its predecessor's stream to it breaks and the failure is relayed
up the chain) or by the progress verdict, not by a direct probe (docs/security.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
from typing import TYPE_CHECKING, Any, Literal

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field

from openhydra.peer.errors import HopError
from openhydra.peer.outbound import StreamBroken
from openhydra.peer.privacy import hop_failure
from openhydra.peer.proto import peer_pb2 as pb

if TYPE_CHECKING:
    from openhydra.peer.privacy import HopState

log = logging.getLogger(__name__)

KEY_DOMAIN = b"openhydra-onion-control-key:v1"
AD_DOMAIN = b"openhydra-onion-control:v1"
NONCE_BYTES = 12
COMMAND_BYTES = 192
"""Every command is padded to this many bytes before sealing (all commands look alike on the relays)."""
PAD_HOPS = 16
"""The command list is padded to this many entries with random blobs (longer routes are not padded)."""
MAX_REPLY_BYTES = 8192
REQUEST, REPLY = 0, 1
MAX_RECEIPTS = 4096  # sessions whose onion receipts wait for the settler (oldest dropped)


class ControlCommand(BaseModel):
    """What the coordinator asks one hop to do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["close", "truncate"]
    length: int = Field(default=0, ge=0)
    """truncate: positions to keep."""
    settle: bool = False
    """close: sign (and apply locally) a receipt for what this hop served, and return it."""


class ControlReply(BaseModel):
    """One hop's answer, sealed to the coordinator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool = True
    code: int = 0  # a grpc.StatusCode value when not ok
    message: str = Field(default="", max_length=1024)
    length: int = 0  # truncate: positions the hop holds now
    receipt: str | None = Field(default=None, max_length=4096)  # close+settle: SettlementRequest JSON


def _key(audit_key: bytes) -> bytes:
    return hmac.new(audit_key, KEY_DOMAIN, hashlib.sha256).digest()


def _ad(direction: int, session_id: str, index: int, seq: int) -> bytes:
    return AD_DOMAIN + struct.pack(">BHQ", direction, index, seq) + session_id.encode()


def _seal(audit_key: bytes, direction: int, session_id: str, index: int, seq: int, body: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(_key(audit_key)).encrypt(nonce, body, _ad(direction, session_id, index, seq))


def _open(audit_key: bytes, direction: int, session_id: str, index: int, seq: int, blob: bytes) -> bytes:
    if not NONCE_BYTES < len(blob) <= MAX_REPLY_BYTES:
        raise ValueError(f"control blob of hop {index} has a bad size ({len(blob)} bytes)")
    try:
        return AESGCM(_key(audit_key)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                               _ad(direction, session_id, index, seq))
    except InvalidTag:
        raise ValueError(f"control blob of hop {index} does not open under its key") from None


def seal_command(audit_key: bytes, session_id: str, index: int, seq: int, command: ControlCommand) -> bytes:
    body = command.model_dump_json().encode()
    if len(body) > COMMAND_BYTES:
        raise ValueError(f"control command too long ({len(body)} bytes)")
    return _seal(audit_key, REQUEST, session_id, index, seq, body.ljust(COMMAND_BYTES))  # JSON allows trailing blanks


def open_command(audit_key: bytes, session_id: str, index: int, seq: int, blob: bytes) -> ControlCommand:
    return ControlCommand.model_validate_json(_open(audit_key, REQUEST, session_id, index, seq, blob))


def seal_reply(audit_key: bytes, session_id: str, index: int, seq: int, reply: ControlReply) -> bytes:
    return _seal(audit_key, REPLY, session_id, index, seq, reply.model_dump_json().encode())


def open_reply(audit_key: bytes, session_id: str, index: int, seq: int, blob: bytes) -> ControlReply:
    return ControlReply.model_validate_json(_open(audit_key, REPLY, session_id, index, seq, blob))


def filler(count: int) -> list[bytes]:
    """Random blobs the size of a sealed command (GCM output is indistinguishable from random)."""
    return [os.urandom(NONCE_BYTES + COMMAND_BYTES + 16) for _ in range(count)]


# ---- hop side ------------------------------------------------------------------------------------------------


async def handle(service: Any, step: pb.Step, state: HopState) -> None:
    """One control message at a hop (``service``: peer/forward.py PeerService): act on this hop's command,
    append the sealed reply, pass it on (or, last hop, return the replies), then close if asked."""
    sid, seq, index = step.session_id, step.seq, state.index
    audit_key = state.session.layer.keys.audit_key
    command: ControlCommand | None = None
    receipt = None
    try:
        command = open_command(audit_key, sid, index, seq, bytes(step.control[index]))
        reply, receipt = _act(service, sid, index, command)
    except (IndexError, ValueError) as exc:  # a relay altered or dropped our entry: answer so, act on nothing
        service.privacy.rejections["control"] += 1
        reply = ControlReply(ok=False, code=grpc.StatusCode.DATA_LOSS.value[0], message=str(exc)[:200])
    replies = [*step.control_replies, seal_reply(audit_key, sid, index, seq, reply)]
    successor = state.session.successor
    if successor is not None:
        inner = pb.Step(session_id=sid, seq=seq, control=step.control, control_replies=replies)
        stream = service._stream("forward", sid, successor.address)
        try:
            await stream.send(service.privacy.seal_step(state, inner), context=None)
        except StreamBroken as exc:
            inbound = service._upstream.get(sid)
            if inbound is not None:
                inbound.report(hop_failure(index + 1, exc.code, f"control: {exc.details}"))
    elif state.session.reply_to is not None:
        result = pb.Result(session_id=sid, seq=seq, control_replies=replies, last_hop=service.address)
        stream = service._stream("deliver", sid, state.session.reply_to.address)
        try:
            await stream.send(service.privacy.seal_result(state, result), context=None)
        except StreamBroken as exc:
            log.warning("cannot return control replies of %s: %s", sid, exc)
    if receipt is not None:  # the ledger write happens after the message moved on: it never delays the chain
        try:
            await asyncio.to_thread(service.settlement.apply_own, receipt)
        except Exception as exc:  # serving never depends on settlement
            log.warning("%s: own receipt for %s not recorded: %s", service.address, sid, exc)
    if command is not None and command.kind == "close":
        await close_local(service, sid)


def _act(service: Any, sid: str, index: int, command: ControlCommand) -> tuple[ControlReply, Any]:
    """This hop's reply, and (close + settle) its signed own receipt, to apply once the message moved on."""
    rt = service.runtime
    if command.kind == "truncate":
        try:
            rt.truncate_session(sid, int(command.length))
        except NotImplementedError as exc:
            return ControlReply(ok=False, code=grpc.StatusCode.UNIMPLEMENTED.value[0], message=str(exc)[:500]), None
        except ValueError as exc:
            code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
            return ControlReply(ok=False, code=code, message=str(exc)[:500]), None
        return ControlReply(length=rt.session_length(sid)), None
    signed = None
    settlement = getattr(service, "settlement", None)
    if command.settle and settlement is not None and hasattr(settlement, "sign_own"):
        try:  # one Ed25519 signature; the ledger write comes later (handle)
            signed = settlement.sign_own(sid, own_request_id(sid, index), rt.num_layers, apply=False)
        except Exception as exc:  # serving never depends on settlement
            log.warning("%s: no receipt for %s: %s", service.address, sid, exc)
    receipt = signed.model_dump_json() if signed is not None else None
    return ControlReply(length=rt.session_length(sid), receipt=receipt), signed


def own_request_id(session_id: str, index: int) -> str:
    """The request id of hop ``index``'s own receipt for a session (unique per hop and session)."""
    return f"{session_id[:100]}#{index}"


async def close_local(service: Any, sid: str) -> None:
    """Drop the session at this hop: cache, retained activations, keys, streams (what CloseSession does)."""
    service.runtime.close_session(sid)
    retained = getattr(service, "retained", None)
    if retained is not None:
        retained.drop(sid)
    service.privacy.drop(sid)
    service._upstream.pop(sid, None)
    for key in [k for k in service._streams if k[1] == sid]:
        await service._streams.pop(key).close()


# ---- coordinator side --------------------------------------------------------------------------------------


async def send(client: Any, session_id: str, commands: list[ControlCommand],
               timeout: float) -> list[ControlReply] | None:
    """Send one control message along the session's onion (``client``: peer/client.py PeerChainClient) and
    return every hop's reply in route order; None when no hop holds keys for the session (nothing to do).
    Raises :class:`HopError` naming the hop at fault."""
    crypto = client._crypto.get(session_id)
    if crypto is None or not crypto.onion_sent:
        return None
    route = crypto.route
    if len(commands) != len(route):
        raise ValueError(f"{len(commands)} commands for a route of {len(route)} hops")
    seq = next(client._seq)
    blobs = [seal_command(crypto.crypto.audit_key(i), session_id, i, seq, c) for i, c in enumerate(commands)]
    blobs += filler(max(0, PAD_HOPS - len(blobs)))
    message = crypto.seal_step(pb.Step(session_id=session_id, seq=seq, control=blobs))
    future = client._loop.create_future()
    client._pending[(session_id, seq)] = future
    try:
        try:
            await client._stream(session_id, route[0].address).send(message, context=session_id)
        except StreamBroken as exc:
            raise HopError(route[0].address, exc.code, exc.details) from None
        try:
            result = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise HopError("", grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to a control message") from None
    finally:
        client._pending.pop((session_id, seq), None)
    if len(result.control_replies) != len(route):
        blamed = route[min(len(result.control_replies), len(route) - 1)].address
        raise HopError(blamed, grpc.StatusCode.DATA_LOSS,
                       f"{len(result.control_replies)} control replies for {len(route)} hops")
    replies = []
    for i, blob in enumerate(result.control_replies):
        try:
            replies.append(open_reply(crypto.crypto.audit_key(i), session_id, i, seq, bytes(blob)))
        except ValueError as exc:
            raise HopError(route[i].address, grpc.StatusCode.DATA_LOSS, f"control reply rejected: {exc}") from None
    return replies


async def close(client: Any, session_id: str, timeout: float) -> None:
    """Close the session on every hop along the onion, collecting each hop's own settlement receipt."""
    crypto = client._crypto.get(session_id)
    if crypto is None:
        return
    n = len(crypto.route)
    try:
        replies = await send(client, session_id, [ControlCommand(kind="close", settle=True)] * n, 3 * timeout)
    except HopError as exc:  # a dead hop holds no session worth closing; its neighbours time theirs out
        log.debug("onion close of %s: %s", session_id, exc)
        return
    if replies is None:
        return
    receipts = client.onion_receipts
    receipts[session_id] = [(hop, r.receipt) for hop, r in zip(crypto.route, replies, strict=True)]
    while len(receipts) > MAX_RECEIPTS:
        receipts.pop(next(iter(receipts)))


async def truncate(client: Any, session_id: str, length: int, timeout: float) -> None:
    """Truncate along the onion; raises :class:`HopError` naming the first hop (route order) that refused."""
    crypto = client._crypto.get(session_id)
    if crypto is None:
        return
    replies = await send(client, session_id, [ControlCommand(kind="truncate", length=length)] * len(crypto.route),
                         timeout)
    for hop, reply in zip(crypto.route, replies or [], strict=False):
        if not reply.ok:
            code = next((c for c in grpc.StatusCode if c.value[0] == reply.code), grpc.StatusCode.UNKNOWN)
            raise HopError(hop.address, code, f"{hop.address}: {reply.message}")
