"""Sessions belong to their coordinator: authenticated control messages and failure reports (docs/security.md).

A session id travels in the clear, so anything that names one must prove it comes from a party of the session's
key agreement (crypto/keys.py), not from whoever learned the id:

- control messages (``CloseSession``, ``Truncate``) carry a :class:`~peer_pb2.SessionAuth` from the coordinator:
  HMAC-SHA256 under the (session, hop) *control key* over (kind, session id, hop index, arguments, counter); the hop
  accepts only a counter above the last it accepted, so a recorded control message cannot be replayed;
- a failure ``Result`` a hop delivers carries the reporting hop's tag under its *report key*, over (session id, seq,
  hop index, the serialized Failure); the coordinator believes no failure without one;
- settlement calls (``SignSettlement``, ``ApplySettlement``) carry the coordinator's tag under the (session, hop)
  *settlement key*, over (kind, session id, hop index, the claim's fields or the receipt id, counter). They come
  after the session closed, when both sides have dropped its keys: the hop keeps the settlement key with its
  record of what it served (economy/peer_settlement.py, as long as that record), the coordinator keeps
  :class:`SettlementKeys` from the close until the settler used them (peer/client_control.py). Its own counter,
  which must grow per (session, hop) like the control counter.

Both keys come from the hop's :class:`~openhydra.crypto.keys.HopKeys` through HKDF-SHA256 with their own labels,
so they are independent of the AES-GCM keys. The tag is over bytes, not over a transport: the same
:func:`control_tag` authenticates a control message carried inside the sealed Forward stream (privacy=onion), where
the hops that relay it do not hold the receiving hop's control key and cannot forge or alter it.

Where no keys were agreed (``privacy=off``) nothing can be authenticated; a peer that requires encryption then
refuses control (and settlement) calls for any session it holds (served), and the docs say that privacy=off
protects nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from openhydra.crypto.keys import HopKeys
from openhydra.peer.proto import peer_pb2 as pb

KEY_INFO = b"openhydra-session-auth:v1:"
CONTROL_LABEL = b"openhydra-control:v1\x00"
FAILURE_LABEL = b"openhydra-failure:v1\x00"
CONTROL_DENIED = "control_denied"
"""Reason counted in ``crypto_rejections`` (so in ``/metrics``) for a refused control call."""
FORGED_FAILURE = "forged_failure"
"""Reason counted on the coordinator for a failure Result that does not authenticate."""
FORGED_RESULT = "forged_result"
"""Reason counted on the coordinator for a Result that does not open under the last hop's key."""


def _derive(keys: HopKeys, purpose: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KEY_INFO + purpose)
    return hkdf.derive(keys.layer_key + keys.return_key)


def control_key(keys: HopKeys) -> bytes:
    """Coordinator -> hop control messages of one (session, hop)."""
    return _derive(keys, b"control")


def report_key(keys: HopKeys) -> bytes:
    """Hop -> coordinator failure reports of one (session, hop)."""
    return _derive(keys, b"report")


def settlement_key(keys: HopKeys) -> bytes:
    """Coordinator -> hop settlement calls about one (session, hop); kept after the session's other keys are gone."""
    return _derive(keys, b"settlement")


def _field(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">H", len(raw)) + raw


def control_tag(key: bytes, kind: str, session_id: str, hop_index: int, counter: int, args: bytes = b"") -> bytes:
    message = CONTROL_LABEL + _field(kind) + _field(session_id) + struct.pack(">BQ", hop_index, counter) + args
    return hmac.new(key, message, hashlib.sha256).digest()


def control_args(request: pb.CloseRequest | pb.TruncateRequest) -> tuple[str, bytes]:
    """(kind, argument bytes) a control request is authenticated over."""
    if isinstance(request, pb.TruncateRequest):
        return "Truncate", struct.pack(">Q", request.length)
    return "CloseSession", b""


def _set_auth(message, key: bytes, kind: str, session_id: str, hop_index: int, counter: int, args: bytes) -> None:
    """Coordinator side: set ``message.auth`` to the tag for hop ``hop_index`` (control and settlement calls)."""
    tag = control_tag(key, kind, session_id, hop_index, counter, args)
    message.auth.CopyFrom(pb.SessionAuth(hop_index=hop_index, counter=counter, tag=tag))


def _accepted_counter(key: bytes, kind: str, session_id: str, hop_index: int, last_counter: int,
                      auth: pb.SessionAuth | None, args: bytes) -> int | None:
    """Hop side: ``auth``'s counter if it is this hop's tag under ``key`` with a counter above ``last_counter``."""
    if auth is None or auth.hop_index != hop_index or auth.counter <= last_counter:
        return None
    expected = control_tag(key, kind, session_id, hop_index, auth.counter, args)
    return auth.counter if hmac.compare_digest(expected, auth.tag) else None


def sign_control(keys: HopKeys, hop_index: int, counter: int, request: pb.CloseRequest | pb.TruncateRequest) -> None:
    """Coordinator side: set ``request.auth`` for hop ``hop_index`` (``counter`` must grow per session and hop)."""
    kind, args = control_args(request)
    _set_auth(request, control_key(keys), kind, request.session_id, hop_index, counter, args)


def check_control(keys: HopKeys, hop_index: int, last_counter: int,
                  request: pb.CloseRequest | pb.TruncateRequest) -> int | None:
    """Hop side: the request's counter if its tag is this hop's and the counter is new; None otherwise."""
    kind, args = control_args(request)
    auth = request.auth if request.HasField("auth") else None
    return _accepted_counter(control_key(keys), kind, request.session_id, hop_index, last_counter, auth, args)


def _failure_tag(keys: HopKeys, result: pb.Result, hop_index: int) -> bytes:
    message = (FAILURE_LABEL + _field(result.session_id) + struct.pack(">QB", result.seq, hop_index)
               + result.failure.SerializeToString(deterministic=True))
    return hmac.new(report_key(keys), message, hashlib.sha256).digest()


def sign_failure(keys: HopKeys, hop_index: int, result: pb.Result) -> pb.Result:
    """Hop side: tag a failure Result with this hop's report key (in place; returned for chaining)."""
    result.failure_auth.CopyFrom(pb.SessionAuth(hop_index=hop_index, tag=_failure_tag(keys, result, hop_index)))
    return result


def failure_is_authentic(hop_keys: list[HopKeys], result: pb.Result) -> bool:
    """Coordinator side: True when a hop of the session's route tagged this failure."""
    if not result.HasField("failure_auth"):
        return False
    index = result.failure_auth.hop_index
    if index >= len(hop_keys):
        return False
    return hmac.compare_digest(_failure_tag(hop_keys[index], result, index), result.failure_auth.tag)


def control_refusal(privacy, runtime, request: pb.CloseRequest | pb.TruncateRequest) -> str | None:
    """Peer side, any transport (a unary call, or a control request carried inside the sealed Forward stream):
    None if the control request may act on its session (its counter is then consumed), else why not (counted).

    A session with crypto state needs the coordinator's tag. A session this hop once held under keys but no longer
    does (closed, evicted) cannot be verified and is refused. A session without keys is touched only on a peer
    that accepts plaintext sessions (privacy=off), and a request about a session this hop never held acts on nothing.
    """
    sid = request.session_id
    state = privacy.state(sid)
    if state is not None:
        counter = check_control(state.session.layer.keys, state.index, state.control_counter, request)
        if counter is not None:
            state.control_counter = counter
            return None
        why = "control call without a valid tag from the session's coordinator"
    elif privacy.admission.was_keyed(sid):
        why = "control call for a keyed session this hop no longer holds"
    elif runtime.session_length(sid) > 0 and privacy.require_encryption:
        why = "control call for a session without keys on a peer that requires encryption"
    else:
        return None
    privacy.rejections[CONTROL_DENIED] += 1
    return why


async def authorize_control(privacy, runtime, address: str, request: pb.CloseRequest | pb.TruncateRequest,
                            context: grpc.aio.ServicerContext) -> None:
    """Peer side, unary RPCs: return if the call may act on its session, else abort with PERMISSION_DENIED."""
    why = control_refusal(privacy, runtime, request)
    if why is not None:
        kind, _ = control_args(request)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{address}: {kind} of {request.session_id} refused: "
                                                               f"{why}")


ControlRequest = pb.CloseRequest | pb.TruncateRequest


def sign_for(route, address: str, request: ControlRequest) -> ControlRequest:
    """Coordinator side: ``request`` tagged for the hop at ``address`` of ``route`` (a privacy.CoordinatorRoute),
    with the route's next control counter; unchanged when there are no keys (privacy off) or no such hop."""
    index = next((i for i, hop in enumerate(route.route) if hop.address == address), None) if route else None
    if index is None:
        return request
    route.control_counter += 1
    sign_control(route.crypto.route.hop_keys[index], index, route.control_counter, request)
    return request


# ---- settlement calls (SignSettlement, ApplySettlement) --------------------------------------------------------

SIGN_SETTLEMENT = "SignSettlement"
APPLY_SETTLEMENT = "ApplySettlement"


def claim_args(claim: pb.SettlementClaim) -> bytes:
    """The bytes a SettlementClaim is authenticated over: every field but the tag, length-prefixed (not protobuf's
    serialization, which need not be canonical across versions)."""
    out = _field(claim.request_id) + _field(claim.model_id) + struct.pack(">QIIH", claim.tokens_served, claim.start,
                                                                         claim.end, len(claim.pipeline))
    for share in claim.pipeline:
        out += _field(share.peer_id) + _field(share.public_key) + struct.pack(">I", share.layers_served)
    return out


class SettlementKeys:
    """Coordinator side: one finished session's per-hop settlement keys, from its close until it is settled."""

    def __init__(self, session_id: str, hops: dict[str, tuple[int, bytes]]) -> None:
        self.session_id = session_id
        self.hops = hops  # address -> (hop index, settlement key)
        self.counter = 0

    @classmethod
    def of(cls, session_id: str, route) -> SettlementKeys | None:
        """From a privacy.CoordinatorRoute (None without one: privacy off, nothing to authenticate)."""
        if route is None:
            return None
        hops: dict[str, tuple[int, bytes]] = {}
        for i, hop in enumerate(route.route):
            hops.setdefault(hop.address, (i, settlement_key(route.crypto.route.hop_keys[i])))
        return cls(session_id, hops)

    def sign_claim(self, address: str, claim: pb.SettlementClaim) -> pb.SettlementClaim:
        """``claim`` tagged for the hop at ``address`` (unchanged when it is no hop of the session)."""
        return self._sign(address, SIGN_SETTLEMENT, claim, claim_args(claim))

    def sign_receipt(self, address: str, receipt: pb.SignedSettlement, receipt_id: str) -> pb.SignedSettlement:
        """A copy of ``receipt`` tagged for the hop at ``address`` (the receipt id is what the tag binds)."""
        tagged = pb.SignedSettlement()
        tagged.CopyFrom(receipt)
        return self._sign(address, APPLY_SETTLEMENT, tagged, receipt_id.encode())

    def _sign(self, address: str, kind: str, message, args: bytes):
        found = self.hops.get(address)
        if found is None:
            return message
        index, key = found
        self.counter += 1
        _set_auth(message, key, kind, self.session_id, index, self.counter, args)
        return message


def hop_settlement_key(state) -> tuple[int, bytes] | None:
    """Peer side, on the step path: (hop index, settlement key) of a keyed session's HopState (derived once and
    cached on it), for the settlement record to keep; None for a session without keys."""
    if state is None:
        return None
    if state.settlement_key is None:
        state.settlement_key = settlement_key(state.session.layer.keys)
    return state.index, state.settlement_key


def settlement_refusal(privacy, settlement, session_id: str, kind: str, auth: pb.SessionAuth | None,
                       args: bytes) -> str | None:
    """Peer side: None if a settlement call about ``session_id`` may proceed (its counter is then consumed), else
    why not (counted as ``control_denied``). The rule of :func:`control_refusal`, with the key the settlement
    record kept: a keyed session needs the coordinator's tag; one this hop held under keys but whose key is gone is
    refused; one without keys passes only on a peer that accepts plaintext sessions (privacy=off); a session this
    hop never served passes and is then refused as unknown (FAILED_PRECONDITION): there is nothing to act on."""
    held = settlement.session_key(session_id)  # (hop index, key, last counter) or None
    if held is not None:
        index, key, last = held
        counter = _accepted_counter(key, kind, session_id, index, last, auth, args)
        if counter is not None:
            settlement.accept_counter(session_id, counter)
            return None
        why = "settlement call without a valid tag from the session's coordinator"
    elif privacy.admission.was_keyed(session_id):
        why = "settlement call for a keyed session whose settlement key this hop no longer holds"
    elif privacy.require_encryption and settlement.has_served(session_id):
        why = "settlement call for a session without keys on a peer that requires encryption"
    else:
        return None
    privacy.rejections[CONTROL_DENIED] += 1
    return why
