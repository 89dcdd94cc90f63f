"""What each SDK method sends: one description per endpoint, shared by the sync and async clients.

Amounts go out as decimal strings (``"2.25"``): the node takes at most 6 decimals and refuses finer
amounts instead of rounding them, and a string keeps a float's binary noise out of the request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from openhydra.sdk.errors import StreamError, parse_error_body
from openhydra.sdk.models import (
    Balance,
    Channel,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    ModelList,
    NetworkStatus,
    SignedChannelUpdate,
    StakeResult,
)

Amount = Decimal | int | float | str
Messages = Sequence[ChatMessage | dict[str, Any]]


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    model: type[BaseModel] | None
    params: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None


def amount(value: Amount) -> str:
    """A positive amount as the decimal string the node parses (float 0.1 -> "0.1", not 0.1000000000000000055)."""
    try:
        number = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except (ArithmeticError, ValueError, TypeError):
        raise ValueError(f"amount must be a decimal number, got {value!r}") from None
    if not number.is_finite():
        raise ValueError(f"amount must be finite, got {value!r}")
    return format(number, "f")


def network_status() -> Call:
    return Call("GET", "/v1/network/status", NetworkStatus)


def models() -> Call:
    return Call("GET", "/v1/models", ModelList)


def balance(peer_id: str | None) -> Call:
    return Call("GET", "/v1/account/balance", Balance, params={"peer_id": peer_id} if peer_id else {})


def stake(value: Amount) -> Call:
    return Call("POST", "/v1/hydra/stake", StakeResult, body={"amount": amount(value)})


def unstake(value: Amount) -> Call:
    return Call("POST", "/v1/hydra/unstake", StakeResult, body={"amount": amount(value)})


def open_channel(payee: str, deposit: Amount) -> Call:
    return Call("POST", "/v1/hydra/channels/open", Channel, body={"payee": payee, "deposit": amount(deposit)})


def update_channel(channel_id: str, value: Amount | None, signed: SignedChannelUpdate | None) -> Call:
    if (value is None) == (signed is None):
        raise ValueError("give exactly one of amount (this node pays) or signed (a payer's update)")
    body: dict[str, Any] = {"channel_id": channel_id}
    if value is not None:
        body["amount"] = amount(value)
    else:
        assert signed is not None
        body["signed"] = signed.model_dump()
    return Call("POST", "/v1/hydra/channels/update", Channel, body=body)


def close_channel(channel_id: str, final: SignedChannelUpdate | None) -> Call:
    body: dict[str, Any] = {"channel_id": channel_id}
    if final is not None:
        body["final"] = final.model_dump()
    return Call("POST", "/v1/hydra/channels/close", Channel, body=body)


def chat(model: str, messages: Messages, stream: bool, options: dict[str, Any]) -> Call:
    body: dict[str, Any] = {
        "model": model,
        "messages": [m.model_dump(exclude_none=True) if isinstance(m, BaseModel) else dict(m) for m in messages],
        **{k: v for k, v in options.items() if v is not None},
    }
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return Call("POST", "/v1/chat/completions", None if stream else ChatCompletion, body=body)


DONE = object()
"""What :func:`sse_event` returns for ``data: [DONE]``."""


def sse_event(line: str) -> ChatCompletionChunk | object | None:
    """One SSE line: a chunk for ``data: {...}``, :data:`DONE` at the end, None for anything else
    (blank separators, ``: ping`` comments, event/id fields). An error event raises :class:`StreamError`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    payload = json.loads(data)
    if isinstance(payload, dict) and "error" in payload:
        raise StreamError(parse_error_body(payload))
    return ChatCompletionChunk.model_validate(payload)


def sse_chunks(lines: Iterator[str]) -> Iterator[ChatCompletionChunk]:
    for line in lines:
        event = sse_event(line)
        if event is DONE:
            return
        if isinstance(event, ChatCompletionChunk):
            yield event
