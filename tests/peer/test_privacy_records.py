"""Signed announcements: a valid record is kept; forged, re-signed or key-swapped records are dropped."""

from __future__ import annotations

import base64
import logging
import time

from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import SignedStaticKey, StaticKeyPair
from openhydra.crypto.records import decode_static_key, encode_static_key, sign_record, verify_record
from openhydra.discovery.records import PeerAnnouncement
from openhydra.discovery.service import NullDiscovery


def _record(identity: Identity, **overrides) -> PeerAnnouncement:
    fields = dict(peer_id=identity.peer_id, model_id="m", start=0, end=4, total_layers=8,
                  grpc_address="127.0.0.1:5000", announced_at=time.time(), ttl_s=30.0)
    return PeerAnnouncement(**(fields | overrides))


def _signed(identity: Identity, static: StaticKeyPair | None = None, **overrides) -> PeerAnnouncement:
    static = static or StaticKeyPair.generate()
    return sign_record(_record(identity, **overrides), identity, static.signed_by(identity))


def test_signed_record_survives_the_wire_and_verifies() -> None:
    record = _signed(Identity.generate())
    again = PeerAnnouncement.from_wire(record.to_wire())
    assert verify_record(again)
    assert decode_static_key(again.static_key).verify(expected_peer_id=again.peer_id)


def test_unsigned_and_altered_records_are_dropped() -> None:
    identity = Identity.generate()
    record = _signed(identity)
    assert not verify_record(_record(identity))  # unsigned
    assert not verify_record(record.model_copy(update={"grpc_address": "127.0.0.1:6666"}))  # redirected
    assert not verify_record(record.model_copy(update={"end": 8}))  # claims more layers


def test_forged_announcement_for_another_peer_is_dropped() -> None:
    victim, attacker = Identity.generate(), Identity.generate()
    honest = _signed(victim)
    # The attacker signs a record naming the victim's peer id with its own key ...
    forged = sign_record(_record(attacker), attacker, StaticKeyPair.generate().signed_by(attacker))
    forged = forged.model_copy(update={"peer_id": victim.peer_id})
    assert not verify_record(forged)
    # ... or keeps the victim's key and signature but swaps in its own body.
    spliced = _record(victim, grpc_address="10.0.0.9:1").model_copy(
        update={"public_key": honest.public_key, "static_key": honest.static_key, "signature": honest.signature})
    assert not verify_record(spliced)


def test_wrong_static_key_signature_is_dropped() -> None:
    identity, other = Identity.generate(), Identity.generate()
    static = StaticKeyPair.generate()
    good = static.signed_by(identity)
    # a static key signed by someone else, relabelled as this peer's
    theirs = static.signed_by(other)
    relabelled = SignedStaticKey(peer_id=identity.peer_id, identity_key=identity.public_key_bytes,
                                 static_key=theirs.static_key, expires_at=theirs.expires_at,
                                 signature=theirs.signature)
    record = sign_record(_record(identity), identity, relabelled)
    assert not verify_record(record)
    # an attacker's X25519 key inside an otherwise valid signature
    swapped = good.model_copy(update={"static_key": StaticKeyPair.generate().public_bytes})
    assert not verify_record(sign_record(_record(identity), identity, swapped))
    assert verify_record(sign_record(_record(identity), identity, good))
    expired = SignedStaticKey.create(identity, static.public_bytes, expires_at=int(time.time()) - 1)
    assert not verify_record(sign_record(_record(identity), identity, expired))
    assert base64.b64decode(encode_static_key(good))


def test_discovery_verifier_hook_drops_forged_records() -> None:
    import asyncio

    honest, forger = Identity.generate(), Identity.generate()
    discovery = NullDiscovery()
    discovery.set_verifier(verify_record)
    good = _signed(honest)
    forged = _signed(forger).model_copy(update={"peer_id": honest.peer_id, "start": 4, "end": 8})
    kept = discovery.keep_valid([good, forged, _record(Identity.generate())])
    assert [r.peer_id for r in kept] == [honest.peer_id] and kept[0].start == 0
    assert discovery.rejected >= 2
    assert asyncio.run(discovery.lookup("m")) == []


def test_records_without_the_cheap_proof_cost_no_signature_check(monkeypatch) -> None:
    """A flood of signed records without a proof of work (a red team posted 19,798) is dropped by the prefilter
    before any Ed25519 check: neither the ownership check nor the verifier sees them."""
    from openhydra.discovery import base

    honest = Identity.generate()
    checked: list[str] = []
    real_check = base.check_announcement
    monkeypatch.setattr(base, "check_announcement", lambda r, **kw: (checked.append(r.peer_id), real_check(r, **kw)))
    discovery = NullDiscovery()
    verified: list[str] = []
    discovery.set_verifier(lambda r: verified.append(r.peer_id) or verify_record(r),
                           prefilter=lambda r: r.peer_id == honest.peer_id)  # stands in for the proof's hash
    flood = [_signed(Identity.generate()) for _ in range(20)]
    kept = discovery.keep_valid([*flood, _signed(honest)])
    assert [r.peer_id for r in kept] == [honest.peer_id]
    assert checked == verified == [honest.peer_id] and discovery.rejected == 20


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_forged_record_is_warned_about_once_not_at_every_lookup() -> None:
    """Every lookup re-reads the DHT: the same forged record used to log a warning per lookup (per request)."""
    from openhydra.discovery.refusals import REPEAT_S, RefusalLog

    honest, forger, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    discovery = NullDiscovery()
    discovery.set_verifier(verify_record)
    forged = _signed(forger).model_copy(update={"peer_id": honest.peer_id, "start": 4, "end": 8})
    unsigned = _record(stranger)
    # Our own handler on the loggers that refuse records (not caplog: a node started in-process by an earlier test
    # of the same worker may have reconfigured the root logger).
    names = ("openhydra.discovery.base", "openhydra.crypto.records")
    handler, loggers = _Records(), [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        for _ in range(20):
            assert discovery.keep_valid([_signed(honest), forged, unsigned])[0].peer_id == honest.peer_id
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    dropped = [r for r in handler.records if "dropping record" in r.getMessage()]
    warned = [r for r in dropped if r.levelno == logging.WARNING]
    assert sorted({r.getMessage().split()[3].rstrip(":") for r in warned}) == sorted({honest.peer_id,
                                                                                      stranger.peer_id})
    assert len(warned) == 2 and len(dropped) == 40  # each once, its 19 repeats at DEBUG
    assert discovery.rejected >= 40  # every refusal still counted
    now = [0.0]
    log = RefusalLog(logging.getLogger("test.refusals"), clock=lambda: now[0])
    assert log.dropped("p", "bad signature") and not log.dropped("p", "bad signature")
    assert log.dropped("p", "expired")  # another reason is news
    now[0] = REPEAT_S
    assert log.dropped("p", "bad signature")  # and again after the interval
