"""Typed failures of the crypto layer (SPEC.md "Security and privacy"; DESIGN.md §5).

Every rejection a peer can hit on untrusted input derives from :class:`CryptoError`, so the pipeline
can catch one type, count it in ``/metrics`` by ``reason``, drop the message (never forward it) and
keep serving. None of these messages contain key material or plaintext.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base class; ``reason`` is a short stable label for metrics."""

    reason = "crypto_error"


class MalformedMessage(CryptoError):
    """Bytes that do not parse as the expected frame (truncated, wrong magic, bad lengths)."""

    reason = "malformed"


class StaleSession(CryptoError):
    """A sealed step for a session that ended on this peer (closed, or handed over to a new session id after a
    failover): a straggler of the coordinator's, not a forgery. Rejected all the same, but counted apart."""

    reason = "stale"


class EvictedSession(StaleSession):
    """A sealed step for a session this peer admitted under keys and then evicted to admit others (its keys are
    gone): a straggler too, counted apart so that eviction pressure (many sessions from one source, or a full
    table) shows in the metrics."""

    reason = "evicted"


class TamperedMessage(CryptoError):
    """Authentication failed: the ciphertext, header or associated data was altered, or the wrong key."""

    reason = "tampered"


class ReplayedMessage(CryptoError):
    """An authentic message that was already accepted, or arrives out of order."""

    reason = "replayed"


class KeyExhausted(CryptoError):
    """A key reached its message limit; the session must re-key (a new route)."""

    reason = "key_exhausted"


class InvalidStaticKey(CryptoError):
    """A peer's advertised X25519 key is not validly bound to its identity (or has expired)."""

    reason = "invalid_static_key"


class InvalidSignature(CryptoError):
    """A signed record (announcement) whose signature or peer id does not check out."""

    reason = "invalid_signature"


class AuditFailure(CryptoError):
    """A differential-privacy audit record does not match the configured noise."""

    reason = "dp_audit_failed"


class InvalidProofOfWork(CryptoError):
    """A geo-challenge proof that is stale, too weak, or bound to another peer/region."""

    reason = "invalid_pow"
