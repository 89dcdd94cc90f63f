"""Peer announcement records: what a peer tells the swarm about itself.

One record = one peer serving one contiguous layer span ``[start, end)`` of one model with
``total_layers`` layers. Records travel through the HTTP DHT (JSON) and hivemind's Kademlia DHT
(msgpack of the same JSON-compatible dict), so they are parsed strictly at every boundary:
unknown fields are ignored (newer peers may add some), bad values are rejected with the field name.

``public_key``, ``signature`` and ``static_key`` are reserved for the security layer: they are
optional here, and a verifier callable can be injected into lookups to drop unsigned or badly
signed records. :meth:`PeerAnnouncement.signing_payload` gives the canonical bytes to sign.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
import time
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_TTL_S = 24 * 3600.0  # a record that claims to live longer than a day is a bug or an attack
MAX_LAYERS = 100_000

_PEER_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
_MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._\-/:]{0,199}$"
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$"
)

Dtype = Literal["float32", "float16", "bfloat16", "int8", "int4", "nf4"]

# A record's verifier: True keeps it. Injected into lookups by the security layer.
RecordVerifier = Callable[["PeerAnnouncement"], bool]


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6). Raises ValueError with the offending value."""
    if not isinstance(value, str) or len(value) > 300:
        raise ValueError(f"expected 'host:port', got {value!r}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected '[ipv6]:port', got {value!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"bad IPv6 address in {value!r}") from exc
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected 'host:port', got {value!r}")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME.match(host):
                raise ValueError(f"bad host in {value!r}") from None
    if not port_text.isdigit():
        raise ValueError(f"port must be a number in 1..65535, got {port_text!r} in {value!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port} in {value!r}")
    return host, port


def _check_address(value: str) -> str:
    parse_host_port(value)
    return value


def _check_b64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("expected standard base64") from exc
    return value


def _check_finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _check_maddr(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise ValueError(f"expected a multiaddr like /ip4/1.2.3.4/tcp/4001/p2p/<id>, got {value!r}")
    return value


Address = Annotated[str, AfterValidator(_check_address)]
Maddr = Annotated[str, Field(max_length=400), AfterValidator(_check_maddr)]
B64 = Annotated[str, Field(max_length=4096), AfterValidator(_check_b64)]
Finite = Annotated[float, AfterValidator(_check_finite)]


class PeerAnnouncement(BaseModel):
    """One peer serving layers ``[start, end)`` of ``model_id`` (which has ``total_layers`` layers)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, protected_namespaces=())

    peer_id: str = Field(pattern=_PEER_ID)
    model_id: str = Field(pattern=_MODEL_ID)
    start: int = Field(ge=0, le=MAX_LAYERS)
    end: int = Field(ge=1, le=MAX_LAYERS)  # exclusive
    total_layers: int = Field(ge=1, le=MAX_LAYERS)
    grpc_address: Address  # host:port of the peer's gRPC pipeline server
    api_address: Address | None = None  # host:port of its HTTP API, if it runs a coordinator
    dtype: Dtype = "bfloat16"
    backend: str = Field(default="pytorch", pattern=r"^[a-z0-9_\-]{1,32}$")
    throughput_tps: Finite = Field(default=0.0, ge=0.0, le=1e7)  # tokens/s through the whole span; 0 = unmeasured
    load: Finite = Field(default=0.0, ge=0.0, le=1.0)  # fraction of capacity in use
    active_sessions: int = Field(default=0, ge=0, le=1_000_000)
    announced_at: Finite = Field(gt=0.0, le=4_102_444_800.0)  # sender's unix time, s (before 2100)
    ttl_s: Finite = Field(gt=0.0, le=MAX_TTL_S)  # seconds the record stays valid after announced_at
    region: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]{1,32}$")
    version: str = Field(default="0", pattern=r"^[A-Za-z0-9._+\-]{1,32}$")
    # Which process announced: random per start. A restarted peer keeps its id but not its instance, so
    # coordinators forget bans and dead marks earned by the previous process as soon as they see the new one.
    instance: str | None = Field(default=None, pattern=r"^[0-9a-f]{8,64}$")
    # Reserved for the security layer (base64): identity key, signature over signing_payload(),
    # and the signed X25519 static key used for per-hop key agreement.
    public_key: B64 | None = None
    signature: B64 | None = None
    static_key: B64 | None = None
    # Admission (crypto/membership.py): a geo-challenge proof (base64 JSON) and the private-swarm HMAC tag.
    geo_proof: B64 | None = None
    swarm_tag: B64 | None = None
    # Verification (openhydra/verification/evidence.py): only on an auditor's evidence carrier record (model id
    # "openhydra-evidence/<model>"), the base64 JSON list of its signed slash evidence; None on announcements.
    evidence: B64 | None = None
    # Weights from the swarm (openhydra/weights/): the manifest hash whose span tensors this peer serves over
    # FetchWeights; None: it does not share weights (peer.share_weights_mbps=0).
    weights_manifest: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # Reachability (peer/libp2p_transport.py): how others reach this peer. A peer served over libp2p announces
    # ``grpc_address = "<libp2p id>.p2p:1"`` and its libp2p multiaddrs here (direct ones, then circuit addresses
    # through the relays holding its reservation); None: plain gRPC at grpc_address.
    p2p_maddrs: list[Maddr] | None = Field(default=None, max_length=16)
    reachable: Literal["direct", "relayed"] | None = None
    # Economy (economy/remote_stake.py): micro-HYDRA this peer stakes (what it holds staked in its own ledger), which
    # every coordinator holds from the peer's HYDRA in its own ledger; None: it announces no stake (HYDRA off).
    stake_micro: int | None = Field(default=None, ge=0, le=69_000_000_000_000)

    @model_validator(mode="after")
    def _span_inside_model(self) -> PeerAnnouncement:
        if self.start >= self.end:
            raise ValueError(f"span start must be < end, got [{self.start}, {self.end})")
        if self.end > self.total_layers:
            raise ValueError(f"span [{self.start}, {self.end}) exceeds total_layers={self.total_layers}")
        return self

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def is_full_model(self) -> bool:
        return self.start == 0 and self.end == self.total_layers

    @property
    def expires_at(self) -> float:
        return self.announced_at + self.ttl_s

    def is_expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def signing_payload(self) -> bytes:
        """Canonical bytes to sign: every field except ``signature``, sorted keys, compact JSON."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def to_wire(self) -> dict[str, object]:
        """A JSON- and msgpack-compatible dict (None fields dropped)."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_wire(cls, data: object) -> PeerAnnouncement:
        """Parse a record from the wire; raises pydantic.ValidationError on bad input."""
        return cls.model_validate(data)


def freshest(records: list[PeerAnnouncement]) -> list[PeerAnnouncement]:
    """De-duplicate by (peer_id, model_id), keeping the newest ``announced_at`` (stable order)."""
    best: dict[tuple[str, str], PeerAnnouncement] = {}
    for record in records:
        key = (record.peer_id, record.model_id)
        current = best.get(key)
        if current is None or record.announced_at > current.announced_at:
            best[key] = record
    return list(best.values())
