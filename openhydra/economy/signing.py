"""Canonical signed messages: the bytes a peer signs for a receipt or a channel update.

Signatures are Ed25519 from the node identity (openhydra.crypto.identity). The signed bytes are a
domain tag plus compact, key-sorted JSON, so the same message always gives the same bytes, a message
of one kind can never be replayed as another, and any change to any field breaks the signature.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from openhydra.crypto.identity import peer_id_matches, verify_signature

RECEIPT_DOMAIN = b"openhydra/economy/settlement/v1\n"
CHANNEL_DOMAIN = b"openhydra/economy/channel-update/v1\n"


class SigningIdentity(Protocol):
    """What the economy needs from :class:`openhydra.crypto.identity.Identity`."""

    peer_id: str
    public_key_bytes: bytes

    def sign(self, data: bytes) -> bytes: ...


def canonical(domain: bytes, body: dict[str, Any]) -> bytes:
    return domain + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_belongs_to(peer_id: str, public_key: bytes) -> bool:
    """A peer id is the libp2p id of its Ed25519 key, so a key cannot be claimed by another id."""
    return peer_id_matches(peer_id, public_key)


def signature_ok(public_key: bytes, signature: bytes, data: bytes) -> bool:
    return verify_signature(public_key, signature, data)
