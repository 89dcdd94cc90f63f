"""Optional bearer-token auth for the HTTP API (RFC 6750) and the private-swarm join secret (RFC 2104 HMAC).

Implements the "HTTP edge" part of the security issue: bearer tokens are compared in constant time
(``hmac.compare_digest``); a private swarm's members prove they know the shared secret without
sending it.

Swarm join proof: ``join_key = HMAC-SHA256(secret, "openhydra-swarm-join:v1")`` and, for an
announcement, ``proof = HMAC-SHA256(join_key, "proof" || peer_id || issued_at(u64 BE) ||
SHA-256(announcement bytes))``. The proof is bound to the announcing peer id (a stranger cannot
reuse a member's proof under its own id), to the announcement's content (it cannot be moved onto a
different record) and to a time (stale proofs are refused). ``swarm_id`` is a public label derived
from the secret so peers of different private swarms can tell each other apart without revealing
the secret. Pure classes: the app author wires them into Sanic middleware and discovery.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Iterable

from openhydra.api.errors import APIError
from openhydra.crypto.encoding import b64decode, b64encode

DEFAULT_PUBLIC_PATHS = frozenset({"/health", "/readyz"})
JOIN_DOMAIN = b"openhydra-swarm-join:v1"
DEFAULT_PROOF_MAX_AGE_S = 600


class BearerAuth:
    """``Authorization: Bearer <token>`` check. With no token configured every request passes."""

    def __init__(self, token: str | None, public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS) -> None:
        if token is not None and len(token) < 16:
            raise ValueError("api.bearer_token must be at least 16 characters (use a random token)")
        self._token = token.encode() if token else None
        self.public_paths = frozenset(public_paths)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None, path: str = "") -> bool:
        if self._token is None or path in self.public_paths:
            return True
        if not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Sanic decodes header bytes with surrogateescape: encode them back the same way, so a byte that is
        # not ASCII is simply a wrong token (a plain .encode() would raise, and the client would get a 500).
        return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), self._token)

    def require(self, authorization: str | None, path: str = "") -> None:
        """Raise a 401 :class:`APIError` (with ``WWW-Authenticate``) unless the request may pass."""
        if not self.check(authorization, path):
            raise APIError(
                401,
                "missing or invalid bearer token",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="openhydra"'},
            )

    def __repr__(self) -> str:
        return f"BearerAuth(enabled={self.enabled})"


class SwarmSecret:
    """Membership proofs for a private swarm. ``None`` secret means an open swarm (all pass)."""

    def __init__(self, secret: str | None, max_age_s: int = DEFAULT_PROOF_MAX_AGE_S) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("swarm_secret must be at least 16 characters (use a random secret)")
        self._key = hmac.new(secret.encode(), JOIN_DOMAIN, hashlib.sha256).digest() if secret else None
        self.max_age_s = max_age_s

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @property
    def swarm_id(self) -> str:
        """A public label of this swarm ("open" without a secret)."""
        if self._key is None:
            return "open"
        return hmac.new(self._key, b"swarm-id", hashlib.sha256).hexdigest()[:16]

    def _mac(self, peer_id: str, issued_at: int, announcement: bytes) -> bytes:
        if self._key is None:
            raise RuntimeError("open swarm: no join key")
        msg = b"proof" + peer_id.encode() + b"\0" + struct.pack(">Q", issued_at)
        return hmac.new(self._key, msg + hashlib.sha256(announcement).digest(), hashlib.sha256).digest()

    def prove(self, peer_id: str, announcement: bytes, issued_at: int | None = None) -> str:
        """The proof to put in an announcement (base64url); empty for an open swarm."""
        if self._key is None:
            return ""
        issued_at = int(time.time()) if issued_at is None else issued_at
        return b64encode(self._mac(peer_id, issued_at, announcement))

    def verify(self, peer_id: str, announcement: bytes, issued_at: int, proof: str, now: float | None = None) -> bool:
        if self._key is None:
            return True
        now = time.time() if now is None else now
        if not -60 <= now - issued_at <= self.max_age_s:  # allow a minute of clock skew
            return False
        try:
            presented = b64decode(proof)
        except ValueError:
            return False
        return hmac.compare_digest(presented, self._mac(peer_id, issued_at, announcement))

    def __repr__(self) -> str:
        return f"SwarmSecret(swarm_id={self.swarm_id!r})"
