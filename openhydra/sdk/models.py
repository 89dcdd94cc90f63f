"""Pydantic models of what OpenHydra's network, economy and chat endpoints answer.

They accept unknown fields (a newer node may add some) and keep them (``model_extra``). Every result
remembers the response headers it came with; ``degradation_reason`` is the node's
``X-OpenHydra-Degradation-Reason`` (set when a smaller covered model answered instead of the one asked).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

DEGRADATION_HEADER = "x-openhydra-degradation-reason"


class Result(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    _headers: dict[str, str] = PrivateAttr(default_factory=dict)

    def with_headers(self, headers: Mapping[str, str]) -> Result:
        self._headers = {k.lower(): v for k, v in headers.items()}
        return self

    @property
    def headers(self) -> dict[str, str]:
        return self._headers

    @property
    def degradation_reason(self) -> str | None:
        return self._headers.get(DEGRADATION_HEADER)


# -- network ---------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "openhydra"


class ModelList(Result):
    object: str = "list"
    data: list[ModelCard]

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.data]


class ServedModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    id: str
    source: str | None = None
    span: list[int] = Field(default_factory=list)
    num_layers: int | None = None
    dtype: str | None = None
    degradation_reason: str | None = None


class NetworkStatus(Result):
    """``GET /v1/network/status``: readiness and served model, plus sections (``economy``, ``swarm``,
    ``settlement``, ``reputation``, ...) that depend on the node's configuration."""

    ready: bool
    requested_model: str | None = None
    model: ServedModelInfo | None = None
    economy: dict[str, Any] | None = None
    swarm: dict[str, Any] | None = None
    settlement: dict[str, Any] | None = None


# -- economy ---------------------------------------------------------------------------------------
class MicroAmounts(BaseModel):
    model_config = ConfigDict(extra="allow")

    credits: int = 0
    hydra: int = 0
    stake: int = 0
    escrow: int = 0


class Balance(Result):
    """``GET /v1/account/balance``: whole units (floats) and exact integer micro-units (``micro``)."""

    enabled: bool
    mode: str
    peer_id: str
    credits: float
    hydra: float
    stake: float
    escrow: float
    open_channels: int
    micro: MicroAmounts


class StakeResult(Result):
    peer_id: str
    staked: float


class Channel(Result):
    channel_id: str
    payer: str
    payee: str
    deposit: int = Field(description="micro-HYDRA")
    nonce: int
    paid: int = Field(description="micro-HYDRA")
    opened_at: float
    expires_at: float
    status: str
    deposit_hydra: float | None = None
    paid_hydra: float | None = None


class SignedChannelUpdate(BaseModel):
    """A payer's signed update (``amount_micro`` cumulative, what the payer signed)."""

    model_config = ConfigDict(extra="forbid")

    nonce: int = Field(ge=1)
    amount_micro: int = Field(ge=0)
    signature: str


# -- chat ------------------------------------------------------------------------------------------
class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = None


class ChatChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(Result):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.choices[0].message.content or "" if self.choices else ""


class ChunkDelta(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    delta: ChunkDelta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return "".join(c.delta.content or "" for c in self.choices)
