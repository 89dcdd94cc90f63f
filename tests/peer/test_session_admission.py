"""Unit checks of peer/session_admission.py and peer/session_auth.py (the process-level attacks are in
tests/adversarial/test_sessions.py)."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from openhydra.crypto.errors import ReplayedMessage
from openhydra.crypto.keys import HopKeys
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.session_admission import (
    MAX_ONION_AGE_S,
    SessionAdmission,
    SessionsBusy,
    decode_payload,
    encode_payload,
    source_of,
)
from openhydra.peer.session_auth import check_control, failure_is_authentic, sign_control, sign_failure


def _keys() -> HopKeys:
    return HopKeys(*(os.urandom(32) for _ in range(4)))


def _one_hop_session():
    """A coordinator's route of one encrypted hop ("sid") and that hop's PeerPrivacy, not yet opened."""
    from openhydra.crypto.identity import Identity
    from openhydra.crypto.keys import StaticKeyPair
    from openhydra.crypto.records import encode_static_key
    from openhydra.peer.messages import HopSpec
    from openhydra.peer.privacy import ChainPrivacy, CoordinatorRoute, PeerPrivacy

    identity, static = Identity.generate(), StaticKeyPair.generate()
    hop = HopSpec(address="127.0.0.1:1", start=0, end=8, peer_id=identity.peer_id,
                  static_key=encode_static_key(static.signed_by(identity)))
    route = CoordinatorRoute.build("sid", [hop], ChainPrivacy(encrypt=True), "127.0.0.1:2")
    return identity, hop, route, PeerPrivacy(static, require_encryption=True)


def test_payload_round_trip_and_freshness() -> None:
    span, issued, salt = decode_payload(encode_payload(3, 7))
    assert span == (3, 7) and abs(issued / 1000 - time.time()) < 5 and salt == b""
    assert decode_payload(encode_payload(3, 7, prefix_salt=b"s" * 16))[2] == b"s" * 16
    admission = SessionAdmission(capacity=4)
    admission.check("s", issued)
    with pytest.raises(ReplayedMessage):
        admission.check("s", int((time.time() - MAX_ONION_AGE_S - 5) * 1000))  # stale
    with pytest.raises(ReplayedMessage):
        admission.check("s", None)  # no issue time: an old-format onion
    assert decode_payload(b"12345678") == (None, None, b"")


def test_ids_are_single_use_and_live_sessions_stay() -> None:
    admission = SessionAdmission(capacity=3, per_source=2)
    live = {"live"}
    admission.is_live = lambda sid: sid in live
    sessions: OrderedDict[str, object] = OrderedDict()
    old = time.time() - 60  # past the admission grace
    for sid in ("live", "a", "b"):
        admission.admit(sid, "10.0.0.1", sessions, now=old)
        sessions[sid] = SimpleNamespace(admitted_at=old)
    with pytest.raises(ReplayedMessage):
        admission.check("a", int(time.time() * 1000))
    admission.admit("c", "10.0.0.1", sessions)  # the source's own oldest pending session goes, not "live"
    sessions["c"] = SimpleNamespace(admitted_at=time.time())
    assert list(sessions) == ["live", "b", "c"]
    live.update(sessions)
    with pytest.raises(SessionsBusy):  # everything held is live: refuse rather than evict
        admission.admit("d", "10.0.0.2", sessions)
    assert list(sessions) == ["live", "b", "c"]


def test_source_of() -> None:
    assert source_of("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert source_of("ipv6:[::1]:5555") == "::1"


def test_control_tag_binds_kind_args_hop_and_counter() -> None:
    keys = _keys()
    request = pb.TruncateRequest(session_id="s", length=4)
    sign_control(keys, 1, 5, request)
    assert check_control(keys, 1, 4, request) == 5
    assert check_control(keys, 1, 5, request) is None  # replayed counter
    assert check_control(keys, 0, 0, request) is None  # another hop
    assert check_control(_keys(), 1, 0, request) is None  # another session's keys
    request.length = 1
    assert check_control(keys, 1, 0, request) is None  # altered argument
    close = pb.CloseRequest(session_id="s")
    close.auth.CopyFrom(pb.TruncateRequest(session_id="s", length=4, auth=request.auth).auth)
    assert check_control(keys, 1, 0, close) is None  # a Truncate tag is not a Close tag


def test_failure_tag() -> None:
    route = [_keys(), _keys()]
    result = pb.Result(session_id="s", seq=9, failure=pb.Failure(hop_address="h", code=14, expected_position=-1))
    assert not failure_is_authentic(route, result)
    sign_failure(route[1], 1, result)
    assert failure_is_authentic(route, result)
    result.failure.hop_address = "someone else"
    assert not failure_is_authentic(route, result)


def test_control_refusal_without_grpc() -> None:
    """The check a control request carried inside the sealed stream would get: the coordinator's tag, once."""
    from openhydra.peer.session_auth import control_refusal, sign_for

    _identity, hop, route, peer = _one_hop_session()
    peer.open_step(route.seal_step(pb.Step(session_id="sid", seq=0)), source="ipv4:127.0.0.1:3")
    runtime = SimpleNamespace(session_length=lambda _sid: 5)
    assert control_refusal(peer, runtime, pb.CloseRequest(session_id="sid")) is not None  # a stranger's
    signed = sign_for(route, hop.address, pb.CloseRequest(session_id="sid"))
    assert control_refusal(peer, runtime, signed) is None
    assert control_refusal(peer, runtime, signed) is not None  # the same message again
    peer.drop("sid")
    assert control_refusal(peer, runtime, sign_for(route, hop.address, pb.CloseRequest(session_id="sid"))) is not None
    assert control_refusal(peer, runtime, pb.CloseRequest(session_id="never-held")) is not None  # keys required
    empty = SimpleNamespace(session_length=lambda _sid: 0)
    assert control_refusal(peer, empty, pb.CloseRequest(session_id="x")) is None  # nothing held: nothing to touch
    assert peer.counts()["control_denied"] == 4


def test_settlement_refusal_outlives_the_close_and_follows_the_privacy_rule() -> None:
    """SignSettlement/ApplySettlement come after the close: the hop's settlement record keeps the session's
    settlement key, the coordinator keeps SettlementKeys. A tag is accepted once, for its own hop, kind and claim;
    a plaintext session passes on a peer that accepts plaintext (privacy=off) and is refused on one that does not."""
    from openhydra.crypto.keys import StaticKeyPair
    from openhydra.economy.peer_settlement import PeerSettlement
    from openhydra.peer.privacy import PeerPrivacy
    from openhydra.peer.session_auth import (
        APPLY_SETTLEMENT,
        SIGN_SETTLEMENT,
        SettlementKeys,
        claim_args,
        hop_settlement_key,
        settlement_refusal,
    )

    identity, hop, route, peer = _one_hop_session()
    _, state = peer.open_step(route.seal_step(pb.Step(session_id="sid", seq=0)), source="ipv4:127.0.0.1:3")
    settlement = PeerSettlement(identity, None, "m", (0, 8))
    settlement.served("sid", 0, 5, hop_settlement_key(state))
    peer.drop("sid")  # the close: the session's keys are gone on both sides, the settlement keys stay
    keys = SettlementKeys.of("sid", route)

    def refused(claim: pb.SettlementClaim, kind: str = SIGN_SETTLEMENT, args: bytes | None = None) -> bool:
        auth = claim.auth if claim.HasField("auth") else None
        return settlement_refusal(peer, settlement, claim.session_id, kind, auth,
                                  claim_args(claim) if args is None else args) is not None

    claim = pb.SettlementClaim(session_id="sid", request_id="r", model_id="m", tokens_served=5, start=0, end=8)
    assert refused(claim)  # a stranger's: no tag
    tagged = pb.SettlementClaim()
    tagged.CopyFrom(claim)
    keys.sign_claim(hop.address, tagged)
    altered = pb.SettlementClaim()
    altered.CopyFrom(tagged)
    altered.request_id = "stolen"
    assert refused(altered)  # the tag binds the claim
    assert refused(tagged, APPLY_SETTLEMENT)  # and its kind
    assert not refused(tagged)
    assert refused(tagged)  # once
    receipt = keys.sign_receipt(hop.address, pb.SignedSettlement(request_id="r"), "receipt-id")
    assert settlement_refusal(peer, settlement, "sid", APPLY_SETTLEMENT, receipt.auth, b"receipt-id") is None
    assert keys.sign_claim("127.0.0.1:9", pb.SettlementClaim(session_id="sid")).HasField("auth") is False
    assert SettlementKeys.of("sid", None) is None  # privacy off: nothing to tag
    settlement.served("plain", 0, 3)  # a session without keys
    assert refused(pb.SettlementClaim(session_id="plain"))  # on a peer that requires encryption
    assert not refused(pb.SettlementClaim(session_id="never-served"))  # nothing to act on (FAILED_PRECONDITION next)
    assert peer.counts()["control_denied"] == 5
    open_peer = PeerPrivacy(StaticKeyPair.generate(), require_encryption=False)  # privacy=off: nothing to check
    assert settlement_refusal(open_peer, settlement, "plain", SIGN_SETTLEMENT, None, b"") is None


def test_a_straggling_step_for_a_dropped_session_is_stale_not_malformed() -> None:
    """After a failover the coordinator's session moves to a new id and the old one is dropped on its hops; a step
    still in flight for the old id is rejected as before, but counted and logged as stale, not as a malformed
    (possibly forged) message, which the swarm audit saw after every onion failover. A session id this peer never
    held stays malformed, whoever sends it."""
    from openhydra.crypto.errors import MalformedMessage, StaleSession
    from openhydra.peer.privacy import ENDED_REMEMBERED

    _identity, _hop, route, peer = _one_hop_session()
    peer.open_step(route.seal_step(pb.Step(session_id="sid", seq=0)), source="ipv4:127.0.0.1:3")
    straggler = route.seal_step(pb.Step(session_id="sid", seq=1))
    peer.drop("sid")
    with pytest.raises(StaleSession):
        peer.open_step(straggler, source="ipv4:127.0.0.1:3")
    with pytest.raises(MalformedMessage):
        peer.open_step(pb.Step(session_id="never-held", seq=1, sealed=b"x" * 64), source="ipv4:127.0.0.1:3")
    peer.drop("never-held")  # dropping what was never held remembers nothing
    with pytest.raises(MalformedMessage):
        peer.open_step(pb.Step(session_id="never-held", seq=2, sealed=b"x" * 64), source="ipv4:127.0.0.1:3")
    assert peer.counts() == {"stale": 1, "malformed": 2}
    for i in range(ENDED_REMEMBERED):  # the memory is bounded: the oldest ended ids are forgotten
        peer._sessions[f"s{i}"] = object()  # stands for a held session
        peer.drop(f"s{i}")
    assert "sid" not in peer._ended and len(peer._ended) == ENDED_REMEMBERED


def test_a_late_step_for_a_session_evicted_by_admission_is_stale_not_malformed() -> None:
    """Admission evicts a held session to make room for a source's newer ones (peer/session_admission.py); the
    evicted session's next step cannot be opened (its keys are gone) and is refused, counted as evicted (a kind of
    stale step: a straggler), not as a malformed (possibly forged) message."""
    from openhydra.crypto.errors import EvictedSession, StaleSession

    _identity, _hop, route, peer = _one_hop_session()
    source = "ipv4:127.0.0.1:3"
    peer.open_step(route.seal_step(pb.Step(session_id="sid", seq=0)), source=source)
    late = route.seal_step(pb.Step(session_id="sid", seq=1))
    for i in range(peer.admission.per_source):  # the same source opens more sessions: its oldest is evicted
        peer.admission.admit(f"newer-{i}", source_of(source), peer._sessions)
        peer._sessions[f"newer-{i}"] = object()  # stands for the newer session's state
    assert peer.state("sid") is None
    with pytest.raises(EvictedSession, match="evicted") as raised:
        peer.open_step(late, source=source)
    assert isinstance(raised.value, StaleSession)
    assert peer.counts() == {"evicted": 1}
