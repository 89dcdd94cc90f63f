"""Bearer-token auth and the private-swarm join secret."""

from __future__ import annotations

import pytest

from openhydra.api.auth import BearerAuth, SwarmSecret
from openhydra.api.errors import APIError

TOKEN = "s3cret-token-0123456789"


def test_bearer_token_accepted_and_wrong_ones_refused() -> None:
    auth = BearerAuth(TOKEN)
    assert auth.enabled
    assert auth.check(f"Bearer {TOKEN}")
    assert auth.check(f"bearer   {TOKEN} ")
    for bad in (
        None,
        "",
        TOKEN,
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer ",
        "Bearer é",
        "Bearer \udcff\udcfe",  # bytes 0xff 0xfe as Sanic decodes them (surrogateescape): was a 500
        f"Bearer {TOKEN[:-1]}\udce9",
    ):
        assert not auth.check(bad), bad
    with pytest.raises(APIError) as exc:
        auth.require("Bearer wrong-token-wrong-token")
    assert exc.value.status == 401
    assert exc.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert exc.value.body()["error"]["code"] == "invalid_api_key"
    assert TOKEN not in repr(auth)


def test_public_paths_and_disabled_auth() -> None:
    auth = BearerAuth(TOKEN)
    assert auth.check(None, "/health") and auth.check(None, "/readyz")
    assert not auth.check(None, "/v1/models")
    open_auth = BearerAuth(None)
    assert not open_auth.enabled and open_auth.check(None, "/v1/chat/completions")
    open_auth.require(None)
    with pytest.raises(ValueError):
        BearerAuth("short")


def test_swarm_proof_accepts_members_only() -> None:
    swarm = SwarmSecret("private-swarm-secret-42")
    ann = b'{"peer_id":"12D3KooWA","layers":[0,8]}'
    proof = swarm.prove("12D3KooWA", ann, issued_at=1000)
    assert "private-swarm-secret-42" not in proof
    assert swarm.verify("12D3KooWA", ann, 1000, proof, now=1010)
    stranger = SwarmSecret("some-other-secret-00")
    assert not swarm.verify("12D3KooWA", ann, 1000, stranger.prove("12D3KooWA", ann, 1000), now=1010)
    assert not swarm.verify("12D3KooWB", ann, 1000, proof, now=1010)  # proof moved to another peer id
    assert not swarm.verify("12D3KooWA", ann + b" ", 1000, proof, now=1010)  # onto another record
    assert not swarm.verify("12D3KooWA", ann, 1001, proof, now=1010)  # re-dated
    assert not swarm.verify("12D3KooWA", ann, 1000, proof, now=1000 + 601)  # stale
    assert not swarm.verify("12D3KooWA", ann, 1000, "%%%not-base64", now=1010)
    assert not swarm.verify("12D3KooWA", ann, 1000, "", now=1010)
    assert swarm.swarm_id != stranger.swarm_id and len(swarm.swarm_id) == 16
    assert swarm.swarm_id == SwarmSecret("private-swarm-secret-42").swarm_id


def test_open_swarm() -> None:
    swarm = SwarmSecret(None)
    assert not swarm.enabled and swarm.swarm_id == "open"
    assert swarm.prove("p", b"x") == ""
    assert swarm.verify("p", b"x", 0, "", now=10**9)
