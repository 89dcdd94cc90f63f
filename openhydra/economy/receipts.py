"""Settlement input from the coordinator and the receipts that back it.

After a request the coordinator builds a :class:`SettlementRequest`: the request id, model id, tokens
served (prompt + completion) and the pipeline, one :class:`ServedShare` per peer with its layer count.
Every serving peer signs the same settlement body (:func:`settlement_body`), which commits to the whole
pipeline in order, so a receipt cannot be edited, reordered, truncated or padded without breaking every
signature. The body's SHA-256 is the receipt id; the request id and the receipt id are each applied at
most once (unique keys in the ledger).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from openhydra.economy.errors import InvalidReceipt, InvalidSignature
from openhydra.economy.signing import RECEIPT_DOMAIN, SigningIdentity, canonical, key_belongs_to, signature_ok

HexKey = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
HexSignature = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
Ident = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]

MAX_PIPELINE = 64
MAX_TOKENS_PER_REQUEST = 10_000_000


class PipelineEntry(BaseModel):
    """One peer of the pipeline as the coordinator saw it (unsigned part)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: Ident
    public_key: HexKey = Field(description="raw 32-byte Ed25519 public key, lowercase hex")
    layers_served: int = Field(ge=1, le=10_000)


class ServedShare(PipelineEntry):
    signature: HexSignature = Field(description="Ed25519 signature of the settlement body, lowercase hex")


class SettlementRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: Ident
    model_id: Ident
    tokens_served: int = Field(ge=1, le=MAX_TOKENS_PER_REQUEST)
    shares: list[ServedShare] = Field(min_length=1, max_length=MAX_PIPELINE)
    model_layers: int | None = Field(default=None, ge=1, le=10_000)
    """Set on a receipt that names only part of the pipeline (privacy=onion: one receipt per hop, so no hop
    learns the others): its shares earn ``layers / model_layers`` of the tokens' credits. None: the shares are
    the whole pipeline."""

    @model_validator(mode="after")
    def _distinct_peers(self) -> SettlementRequest:
        ids = [s.peer_id for s in self.shares]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a peer appears twice in the pipeline: {ids}")
        return self

    def pipeline(self) -> list[PipelineEntry]:
        return [PipelineEntry(**s.model_dump(exclude={"signature"})) for s in self.shares]

    def body(self) -> bytes:
        return settlement_body(self.request_id, self.model_id, self.tokens_served, self.pipeline(), self.model_layers)

    @property
    def receipt_id(self) -> str:
        return hashlib.sha256(self.body()).hexdigest()

    def verify(self) -> None:
        """Raise :class:`InvalidReceipt` unless every share is signed by its own peer's key."""
        body = self.body()
        for share in self.shares:
            key = bytes.fromhex(share.public_key)
            if not key_belongs_to(share.peer_id, key):
                raise InvalidReceipt(f"public key does not match peer id {share.peer_id}")
            if not signature_ok(key, bytes.fromhex(share.signature), body):
                raise InvalidSignature(f"bad receipt signature from {share.peer_id} on {self.request_id}")


def settlement_body(
    request_id: str, model_id: str, tokens_served: int, pipeline: list[PipelineEntry],
    model_layers: int | None = None,
) -> bytes:
    fields: dict[str, object] = {
        "request_id": request_id,
        "model_id": model_id,
        "tokens_served": tokens_served,
        "pipeline": [[p.peer_id, p.public_key, p.layers_served] for p in pipeline],
    }
    if model_layers is not None:  # a part-pipeline receipt (privacy=onion); absent: bodies as before
        fields["model_layers"] = model_layers
    return canonical(RECEIPT_DOMAIN, fields)


def pipeline_entry(identity: SigningIdentity, layers_served: int) -> PipelineEntry:
    return PipelineEntry(
        peer_id=identity.peer_id, public_key=identity.public_key_bytes.hex(), layers_served=layers_served
    )


def sign_settlement(
    identity: SigningIdentity,
    request_id: str,
    model_id: str,
    tokens_served: int,
    pipeline: list[PipelineEntry],
) -> str:
    """What a serving peer returns to the coordinator: its signature of the settlement body, hex."""
    return identity.sign(settlement_body(request_id, model_id, tokens_served, pipeline)).hex()


def build_settlement(
    request_id: str,
    model_id: str,
    tokens_served: int,
    served: list[tuple[SigningIdentity, int]],
) -> SettlementRequest:
    """Sign a settlement with every peer's identity (tests, benchmarks, and single-process nodes)."""
    pipeline = [pipeline_entry(identity, layers) for identity, layers in served]
    shares = [
        ServedShare(
            **entry.model_dump(),
            signature=sign_settlement(identity, request_id, model_id, tokens_served, pipeline),
        )
        for entry, (identity, _) in zip(pipeline, served, strict=True)
    ]
    return SettlementRequest(
        request_id=request_id, model_id=model_id, tokens_served=tokens_served, shares=shares
    )
