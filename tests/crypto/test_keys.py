"""Static-key binding (libp2p-Noise style) and per-hop ephemeral key agreement."""

from __future__ import annotations

import time

import pytest

from openhydra.crypto.errors import InvalidStaticKey
from openhydra.crypto.identity import Identity
from openhydra.crypto.keys import SignedStaticKey, StaticKeyPair, accept_hop, initiate_hop


def test_signed_static_key_verifies_and_round_trips_json() -> None:
    ident, static = Identity.generate(), StaticKeyPair.generate()
    record = static.signed_by(ident, ttl_s=60)
    assert record.verify(expected_peer_id=ident.peer_id) == static.public_bytes
    parsed = SignedStaticKey.model_validate_json(record.model_dump_json())
    assert parsed == record
    assert parsed.verify() == static.public_bytes
    assert isinstance(record.model_dump(mode="json")["static_key"], str)


def test_wrong_static_key_signature_rejected() -> None:
    ident, static = Identity.generate(), StaticKeyPair.generate()
    record = static.signed_by(ident)
    # an attacker substitutes its own X25519 key under the victim's identity
    swapped = record.model_copy(update={"static_key": StaticKeyPair.generate().public_bytes})
    with pytest.raises(InvalidStaticKey, match="signature"):
        swapped.verify()
    # signed by another identity but claiming the victim's peer id and key
    mallory = Identity.generate()
    forged = SignedStaticKey.create(mallory, static.public_bytes, record.expires_at).model_copy(
        update={"peer_id": ident.peer_id}
    )
    with pytest.raises(InvalidStaticKey, match="does not match"):
        forged.verify()
    forged2 = forged.model_copy(update={"identity_key": ident.public_key_bytes})
    with pytest.raises(InvalidStaticKey, match="signature"):
        forged2.verify()
    sig = bytearray(record.signature)
    sig[0] ^= 0x80
    assert not record.model_copy(update={"signature": bytes(sig)}).is_valid()
    later = record.model_copy(update={"expires_at": record.expires_at + 10})
    assert not later.is_valid()


def test_expired_and_wrong_peer_rejected() -> None:
    ident, static = Identity.generate(), StaticKeyPair.generate()
    record = SignedStaticKey.create(ident, static.public_bytes, expires_at=int(time.time()) - 1)
    with pytest.raises(InvalidStaticKey, match="expired"):
        record.verify()
    fresh = static.signed_by(ident)
    with pytest.raises(InvalidStaticKey, match="expected"):
        fresh.verify(expected_peer_id=Identity.generate().peer_id)


def test_record_rejects_bad_lengths() -> None:
    ident = Identity.generate()
    with pytest.raises(ValueError):
        SignedStaticKey(
            peer_id=ident.peer_id,
            identity_key=b"x" * 31,
            static_key=b"y" * 32,
            expires_at=1,
            signature=b"z" * 64,
        )
    with pytest.raises(ValueError):
        SignedStaticKey.model_validate_json(
            '{"peer_id":"a","identity_key":"***","static_key":"","expires_at":1,"signature":""}'
        )


def test_hop_keys_agree_and_are_fresh_per_session_and_hop() -> None:
    static = StaticKeyPair.generate()
    eph, keys = initiate_hop(static.public_bytes, "sess-1", 2)
    assert accept_hop(static, eph, "sess-1", 2) == keys
    four = {keys.layer_key, keys.ingress_key, keys.return_key, keys.audit_key}
    assert len(four) == 4 and all(len(k) == 32 for k in four)
    assert accept_hop(static, eph, "sess-2", 2) != keys  # bound to the session
    assert accept_hop(static, eph, "sess-1", 1) != keys  # bound to the hop
    eph2, keys2 = initiate_hop(static.public_bytes, "sess-1", 2)
    assert eph2 != eph and keys2.ingress_key != keys.ingress_key  # fresh ephemeral every time
    assert accept_hop(StaticKeyPair.generate(), eph, "sess-1", 2) != keys
    assert "redacted" in repr(keys) and keys.layer_key.hex() not in repr(keys)


def test_low_order_point_rejected() -> None:
    static = StaticKeyPair.generate()
    with pytest.raises(InvalidStaticKey):
        accept_hop(static, bytes(32), "s", 0)
    with pytest.raises(InvalidStaticKey):
        initiate_hop(b"\x01" * 31, "s", 0)
