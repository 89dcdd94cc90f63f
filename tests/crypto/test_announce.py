"""Signed announcements: a forged, altered, re-attributed or stale record is refused."""

from __future__ import annotations

import pytest

from openhydra.crypto.announce import SignedEnvelope, open_envelope, seal_envelope
from openhydra.crypto.errors import InvalidSignature
from openhydra.crypto.identity import Identity

NOW = 1_800_000_000


def test_round_trip_through_json() -> None:
    ident = Identity.generate()
    env = seal_envelope(ident, {"peer_id": ident.peer_id, "layers": [0, 8], "model": "qwen0.8b"}, issued_at=NOW)
    wire = env.model_dump_json()
    assert open_envelope(SignedEnvelope.model_validate_json(wire), now=NOW + 30)["layers"] == [0, 8]


def test_forged_announcements_ignored() -> None:
    victim, mallory = Identity.generate(), Identity.generate()
    env = seal_envelope(victim, {"peer_id": victim.peer_id, "layers": [0, 8]}, issued_at=NOW)
    # body altered (claims other layers)
    with pytest.raises(InvalidSignature, match="does not verify"):
        open_envelope(env.model_copy(update={"body": env.body.replace("8", "32")}), now=NOW)
    # mallory signs a record in the victim's name with her own key
    forged = seal_envelope(mallory, {"peer_id": victim.peer_id}, issued_at=NOW)
    with pytest.raises(InvalidSignature, match="another peer id"):
        open_envelope(forged, now=NOW)
    with pytest.raises(InvalidSignature, match="does not match"):
        open_envelope(forged.model_copy(update={"peer_id": victim.peer_id}), now=NOW)
    with pytest.raises(InvalidSignature, match="does not verify"):
        open_envelope(
            forged.model_copy(update={"peer_id": victim.peer_id, "public_key": victim.public_key_bytes}), now=NOW
        )
    # re-dated replay
    with pytest.raises(InvalidSignature, match="does not verify"):
        open_envelope(env.model_copy(update={"issued_at": NOW + 200}), now=NOW + 200)
    with pytest.raises(InvalidSignature, match="stale"):
        open_envelope(env, now=NOW + 301)
    with pytest.raises(InvalidSignature, match="stale"):
        open_envelope(env, now=NOW - 120)


def test_non_object_body_refused() -> None:
    ident = Identity.generate()
    env = seal_envelope(ident, {}, issued_at=NOW)
    assert open_envelope(env, now=NOW) == {}
    with pytest.raises(ValueError):
        SignedEnvelope.model_validate({**env.model_dump(), "extra": 1})
