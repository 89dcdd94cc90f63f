"""Concentric onion routing for a pipeline route (after Tor's layering, tor-spec §5; RFC 7748, 5869).

Implements the "Routing" row of SPEC.md "Security and privacy" and DESIGN.md §5: the coordinator wraps
the route in layers, each peer peels exactly one with its static X25519 key and learns only its
predecessor, its successor, its own keys and an opaque per-hop payload; a layer that was altered is
rejected at the hop that owns it, before anything is forwarded.

Layer wire format (integers big-endian)::

    magic  b"OHO1"  4
    hop    u8       index of the hop this layer is for
    E      32       the coordinator's ephemeral X25519 public key for (session, hop)
    nonce  12       random
    AES-256-GCM(layer_key, nonce, plaintext, ad) || tag(16)

    ad        = magic || hop || E || nonce || sid_len(u8) || session_id
    plaintext = flags(u8: bit0 predecessor is the coordinator, bit1 successor is the coordinator)
                || pred_id_len(u8) || pred_id || pred_addr_len(u8) || pred_addr
                || succ_id_len(u8) || succ_id || succ_addr_len(u8) || succ_addr
                                    (when the successor is the coordinator: its reply address, or empty)
                || egress_key(32)   key to seal what this hop sends on (the successor's ingress key,
                                    or this hop's return key when the successor is the coordinator)
                || payload_len(u16) || payload    opaque instructions for this hop (e.g. its layer span)
                || inner_len(u32) || inner        the next hop's layer, forwarded unchanged
                || padding                        zeros; only in the innermost layer

``layer_key`` comes from :func:`openhydra.crypto.keys.accept_hop`, so only the holder of the hop's
static key can open the layer, and the session id (which the peer takes from the stream, it is not
in the layer) binds the onion to one session. Because each layer's ciphertext covers everything
inside it, flipping any bit of what hop *i* receives fails hop *i*'s GCM tag.

Padding: the coordinator pads the innermost plaintext so the whole onion has a fixed size
(``pad_to``), so the first hop cannot tell the route's length from the onion's size. Each layer
removes its own overhead, so a hop can infer how many hops precede it; its layer span reveals that
anyway.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field

from openhydra.crypto.errors import InvalidStaticKey, MalformedMessage, TamperedMessage
from openhydra.crypto.keys import HopKeys, SignedStaticKey, StaticKeyPair, accept_hop, initiate_hop

MAGIC = b"OHO1"
NONCE_LEN = 12
TAG_LEN = 16
_HEADER = struct.Struct(">4sB32s12s")
LAYER_OVERHEAD = _HEADER.size + TAG_LEN
DEFAULT_ONION_SIZE = 2048
_FLAG_PRED_COORD = 1
_FLAG_SUCC_COORD = 2


class HopRef(BaseModel):
    """Who a hop talks to: a peer id and a dialable address (``host:port``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=255)
    address: str = Field(min_length=1, max_length=255)


@dataclass(frozen=True)
class RouteHop:
    """One hop as the coordinator knows it: where it is, its signed static key, its instructions."""

    ref: HopRef
    static_key: SignedStaticKey
    payload: bytes = b""


@dataclass(frozen=True)
class WrappedRoute:
    onion: bytes
    """Send this to the first hop."""
    hop_keys: list[HopKeys]
    """The coordinator's copy of every hop's keys (for sealing, opening and DP audits)."""

    @property
    def first_ingress_key(self) -> bytes:
        return self.hop_keys[0].ingress_key

    @property
    def return_key(self) -> bytes:
        return self.hop_keys[-1].return_key


@dataclass(frozen=True, repr=False)
class PeeledLayer:
    hop_index: int
    predecessor: HopRef | None
    """None: the coordinator (the stream's origin)."""
    successor: HopRef | None
    """None: this is the last hop; it answers the coordinator."""
    keys: HopKeys
    egress_key: bytes
    payload: bytes
    inner: bytes
    """The next hop's onion (empty for the last hop)."""
    reply_to: HopRef | None = None
    """Last hop only: where the coordinator wants results delivered (if it said)."""

    def __repr__(self) -> str:
        return f"PeeledLayer(hop={self.hop_index}, pred={self.predecessor}, succ={self.successor})"


def _ad(hop: int, eph: bytes, nonce: bytes, session_id: str) -> bytes:
    sid = session_id.encode()
    if not 1 <= len(sid) <= 255:
        raise ValueError(f"session id must be 1..255 UTF-8 bytes, got {len(sid)}")
    return _HEADER.pack(MAGIC, hop, eph, nonce) + bytes([len(sid)]) + sid


def _short(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


def _encode_ref(ref: HopRef | None) -> bytes:
    return b"\0\0" if ref is None else _short(ref.peer_id) + _short(ref.address)


def _plaintext(
    pred: HopRef | None,
    succ: HopRef | None,
    egress: bytes,
    payload: bytes,
    inner: bytes,
    pad: int,
    reply_to: HopRef | None = None,
) -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError(f"per-hop payload is limited to 65535 bytes, got {len(payload)}")
    flags = (_FLAG_PRED_COORD if pred is None else 0) | (_FLAG_SUCC_COORD if succ is None else 0)
    return b"".join(
        (
            bytes([flags]),
            _encode_ref(pred),
            _encode_ref(reply_to if succ is None else succ),
            egress,
            struct.pack(">H", len(payload)),
            payload,
            struct.pack(">I", len(inner)),
            inner,
            bytes(pad),
        )
    )


def _seal_layer(session_id: str, hop: int, eph: bytes, key: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    ad = _ad(hop, eph, nonce, session_id)
    return _HEADER.pack(MAGIC, hop, eph, nonce) + AESGCM(key).encrypt(nonce, plaintext, ad)


def wrap_route(
    session_id: str,
    hops: Sequence[RouteHop],
    pad_to: int | None = DEFAULT_ONION_SIZE,
    now: float | None = None,
    reply_to: HopRef | None = None,
) -> WrappedRoute:
    """Build the onion for ``hops`` (in pipeline order). Every static key is verified first
    (:class:`~openhydra.crypto.errors.InvalidStaticKey` names the bad one); fresh ephemeral keys
    are generated for every hop, so two routes never share keys. ``reply_to`` (the coordinator's
    address for results) goes into the last layer only, so no other hop learns it."""
    if not 1 <= len(hops) <= 255:
        raise ValueError(f"a route has 1..255 hops, got {len(hops)}")
    agreed = [
        initiate_hop(hop.static_key.verify(now, expected_peer_id=hop.ref.peer_id), session_id, i)
        for i, hop in enumerate(hops)
    ]
    keys = [k for _, k in agreed]
    n = len(hops)

    def neighbours(i: int) -> tuple[HopRef | None, HopRef | None]:
        return (hops[i - 1].ref if i else None), (hops[i + 1].ref if i + 1 < n else None)

    plaintexts_sizes = [
        len(_plaintext(*neighbours(i), bytes(32), h.payload, b"", 0, reply_to)) for i, h in enumerate(hops)
    ]
    unpadded = sum(plaintexts_sizes) + n * LAYER_OVERHEAD
    pad = 0
    if pad_to is not None:
        if unpadded > pad_to:
            raise ValueError(f"route needs a {unpadded}-byte onion, more than pad_to={pad_to}")
        pad = pad_to - unpadded
    inner = b""
    for i in reversed(range(n)):
        egress = keys[i + 1].ingress_key if i + 1 < n else keys[i].return_key
        plaintext = _plaintext(*neighbours(i), egress, hops[i].payload, inner, pad if i == n - 1 else 0, reply_to)
        inner = _seal_layer(session_id, i, agreed[i][0], keys[i].layer_key, plaintext)
    return WrappedRoute(onion=inner, hop_keys=keys)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedMessage("onion layer plaintext is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def short(self) -> str:
        return self.take(self.take(1)[0]).decode()

    def ref(self) -> HopRef | None:
        peer_id, address = self.short(), self.short()
        return HopRef(peer_id=peer_id, address=address) if peer_id or address else None


def peel(onion: bytes, static: StaticKeyPair, session_id: str) -> PeeledLayer:
    """Open this hop's layer. Raises :class:`TamperedMessage` if any bit of ``onion`` was altered
    (or it was built for another key or session) and :class:`MalformedMessage` if it cannot be a
    layer at all; on either, the caller must forward nothing."""
    if len(onion) < LAYER_OVERHEAD:
        raise MalformedMessage(f"onion of {len(onion)} bytes is shorter than one layer")
    magic, hop, eph, nonce = _HEADER.unpack_from(onion)
    if magic != MAGIC:
        raise MalformedMessage("onion layer has the wrong magic")
    try:
        keys = accept_hop(static, eph, session_id, hop)
    except InvalidStaticKey as exc:  # a low-order ephemeral key: the header was altered
        raise TamperedMessage(f"onion layer for hop {hop} carries an invalid ephemeral key") from exc
    try:
        plaintext = AESGCM(keys.layer_key).decrypt(nonce, onion[_HEADER.size :], _ad(hop, eph, nonce, session_id))
    except InvalidTag as exc:
        raise TamperedMessage(f"onion layer for hop {hop} failed authentication") from exc
    try:
        r = _Reader(plaintext)
        flags = r.take(1)[0]
        pred_ref = r.ref()
        pred = None if flags & _FLAG_PRED_COORD else pred_ref
        succ_or_reply = r.ref()
        succ, reply_to = (None, succ_or_reply) if flags & _FLAG_SUCC_COORD else (succ_or_reply, None)
        egress = r.take(32)
        payload = r.take(struct.unpack(">H", r.take(2))[0])
        inner = r.take(struct.unpack(">I", r.take(4))[0])
    except (UnicodeDecodeError, ValueError) as exc:  # authentic but ill-formed: a coordinator bug
        raise MalformedMessage("onion layer plaintext is ill-formed") from exc
    if (succ is None) != (not inner) or (pred is None) != bool(flags & _FLAG_PRED_COORD):
        raise MalformedMessage("onion layer's neighbours and inner onion disagree")
    return PeeledLayer(hop, pred, succ, keys, egress, payload, inner, reply_to)
