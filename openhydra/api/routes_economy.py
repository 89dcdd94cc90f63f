"""Economy routes: balance, stake/unstake, state channels, and the economy part of network status.

``register_economy_routes(app, economy)`` is called by the app builder with the node's economy (an
``Economy`` or an ``OffEconomy``). Amounts on the wire are whole HYDRA / credits as JSON numbers or
strings with at most 6 decimals; signed channel updates carry integer micro-HYDRA (``amount_micro``)
because that is what the payer signed. The body models are also the OpenAPI document (api/openapi.py):
an amount's schema (``multipleOf`` 0.000001, a bounded maximum, a decimal-string pattern) says exactly
what the validator takes, and integers are strict (no ``"4"`` or ``true``). Ledger calls run in a worker
thread so a busy SQLite file never stalls the event loop. Every refusal is an :class:`APIError`; a refused
request changes nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra.api.bodies import parse_body, parse_query
from openhydra.api.errors import APIError
from openhydra.api.protocol_base import JsonModel, matching
from openhydra.economy import errors as econ
from openhydra.economy.channels import ChannelUpdate, ChannelView
from openhydra.economy.units import from_micro, to_micro

T = TypeVar("T")

AMOUNT_MAX = Decimal("999999999.999999")
_FRACTION = r"\.[0-9]{1,6}"
# A positive amount as text: a whole part without leading zeros, or 0.x with a non-zero digit among six.
POSITIVE_AMOUNT_TEXT = (r"^(?:[1-9][0-9]{0,8}(?:" + _FRACTION + r")?|0\.(?:[1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|"
                        r"00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$")
AMOUNT_TEXT = r"^(?:0|[1-9][0-9]{0,8})(?:" + _FRACTION + r")?$"


def _amount(positive: bool) -> Any:
    pattern = re.compile(POSITIVE_AMOUNT_TEXT if positive else AMOUNT_TEXT)

    def wire_form(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("expected a number or a decimal string")
        # fullmatch: with match, "1\n" passed ($ matches before a final newline)
        if isinstance(value, str) and not pattern.fullmatch(value):
            raise ValueError("expected a decimal string such as \"1.5\" (at most 6 decimals, below 1e9)")
        return Decimal(str(value))  # a float by its shortest spelling: 0.1 is 0.1, not 0.1000000000000000055

    bound = {"exclusiveMinimum": 0} if positive else {"minimum": 0}
    schema = {"anyOf": [{"type": "number", **bound, "maximum": float(AMOUNT_MAX), "multipleOf": 0.000001},
                        {"type": "string", "pattern": pattern.pattern}]}
    limits = Field(gt=0, le=AMOUNT_MAX, decimal_places=6) if positive else Field(ge=0, le=AMOUNT_MAX,
                                                                                  decimal_places=6)
    return Annotated[Decimal, BeforeValidator(wire_form), limits, WithJsonSchema(schema)]


Amount = _amount(positive=True)
AmountOrZero = _amount(positive=False)
PEER_ID_PATTERN = r"^[\x21-\x7e]+$"  # printable ASCII, no spaces
PeerId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=PEER_ID_PATTERN)]
PAYEE_PATTERN = r"^12D3KooW[1-9A-HJ-NP-Za-km-z]{44}$"
"""An Ed25519 libp2p peer id, what every node's id is (crypto/identity.py). A channel's payee must be a node: one
opened to any other string (a user probe opened one to "notapeer") escrowed a deposit nobody could ever be paid
from. The spelling only: base58 carries no checksum, and the exact set of decodable ids is not a pattern the API's
document could state simply (a schema-valid id would then be refused)."""

PayeeId = matching(PAYEE_PATTERN, "peer_id", "not a peer id (an Ed25519 libp2p id: 12D3KooW and 44 base58 characters)")
ChannelId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
HexSignature = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]


class BalanceQuery(BaseModel):
    """The query of ``GET /v1/account/balance``: another peer's balance, or (no peer_id) this node's."""

    model_config = ConfigDict(extra="ignore", strict=True)
    peer_id: PeerId | None = None


class StakeBody(JsonModel):
    model_config = ConfigDict(extra="forbid")
    amount: Amount


class OpenChannelBody(JsonModel):
    model_config = ConfigDict(extra="forbid")
    payee: PayeeId
    deposit: Amount


class SignedUpdate(JsonModel):
    model_config = ConfigDict(extra="forbid")
    nonce: int = Field(ge=1, le=2**62)
    amount_micro: int = Field(ge=0, le=2**62)
    signature: HexSignature


class UpdateChannelBody(JsonModel):
    """Either ``amount`` (this node is the payer: it signs the next update itself) or a signed update."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["amount"], "properties": {"amount": {"not": {"type": "null"}}}},
        {"required": ["signed"], "properties": {"signed": {"not": {"type": "null"}}}},
    ]})
    channel_id: ChannelId
    amount: AmountOrZero | None = None
    signed: SignedUpdate | None = None

    @model_validator(mode="after")
    def _one_of(self) -> UpdateChannelBody:
        if (self.amount is None) == (self.signed is None):
            raise ValueError("give exactly one of amount (this node pays) or signed (a payer's update)")
        return self


class CloseChannelBody(JsonModel):
    model_config = ConfigDict(extra="forbid")
    channel_id: ChannelId
    final: SignedUpdate | None = None


_CONFLICTS = (econ.LedgerConflict, econ.EconomyDisabled)


def to_api_error(exc: econ.LedgerError) -> APIError:
    if isinstance(exc, econ.UnknownChannel):
        return APIError(404, str(exc), type="not_found_error", code=exc.code)
    if isinstance(exc, _CONFLICTS):
        return APIError(409, str(exc), type="conflict_error", code=exc.code)
    if isinstance(exc, econ.InvalidRequest):
        return APIError(400, str(exc), code=exc.code)
    if isinstance(exc, econ.LedgerUnavailable):
        return APIError(
            503, str(exc), type="service_unavailable", code=exc.code, headers={"Retry-After": "1"}
        )
    return APIError(500, "ledger error", type="api_error", code=exc.code)


async def _call(fn: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args)
    except econ.LedgerError as exc:
        raise to_api_error(exc) from None


def _channel_json(ch: ChannelView) -> dict[str, Any]:
    return {
        "object": "hydra.channel",
        **ch.model_dump(),
        "deposit_hydra": from_micro(ch.deposit),
        "paid_hydra": from_micro(ch.paid),
    }


def _update(channel_id: str, signed: SignedUpdate) -> ChannelUpdate:
    return ChannelUpdate(
        channel_id=channel_id, nonce=signed.nonce, amount=signed.amount_micro, signature=signed.signature
    )


def economy_status(economy: Any) -> dict[str, Any]:
    """The ``economy`` section of ``GET /v1/network/status`` (blocking; cheap reads)."""
    try:
        return economy.status()
    except econ.LedgerError as exc:
        return {"enabled": bool(economy.enabled), "mode": economy.mode, "error": exc.code}


def register_economy_routes(app: Sanic, economy: Any) -> None:
    async def balance(request: Request) -> HTTPResponse:
        query = parse_query(request, BalanceQuery)
        view = await _call(economy.balance, query.peer_id)
        micro = view.model_dump(exclude={"peer_id", "open_channels"})
        return json(
            {
                "object": "account.balance",
                "enabled": bool(economy.enabled),
                "mode": economy.mode,
                **view.as_units(),
                "micro": micro,
            }
        )

    async def stake(request: Request) -> HTTPResponse:
        body = parse_body(request.body, StakeBody)
        staked = await _call(economy.stake, to_micro(body.amount))
        return json({"object": "hydra.stake", "peer_id": economy.peer_id, "staked": from_micro(staked)})

    async def unstake(request: Request) -> HTTPResponse:
        body = parse_body(request.body, StakeBody)
        staked = await _call(economy.unstake, to_micro(body.amount))
        return json({"object": "hydra.stake", "peer_id": economy.peer_id, "staked": from_micro(staked)})

    async def open_channel(request: Request) -> HTTPResponse:
        body = parse_body(request.body, OpenChannelBody)
        ch = await _call(economy.open_channel, body.payee, to_micro(body.deposit))
        return json(_channel_json(ch), status=201)

    async def update_channel(request: Request) -> HTTPResponse:
        body = parse_body(request.body, UpdateChannelBody)
        if body.signed is not None:
            ch = await _call(economy.update_channel, _update(body.channel_id, body.signed))
        else:
            assert body.amount is not None  # checked just above
            await _call(economy.pay, body.channel_id, to_micro(body.amount))
            ch = await _call(economy.channel, body.channel_id)
        return json(_channel_json(ch))

    async def close_channel(request: Request) -> HTTPResponse:
        body = parse_body(request.body, CloseChannelBody)
        final = _update(body.channel_id, body.final) if body.final else None
        ch = await _call(economy.close_channel, body.channel_id, final)
        return json(_channel_json(ch))

    app.add_route(balance, "/v1/account/balance", methods=["GET", "HEAD"], name="economy_balance")
    app.add_route(stake, "/v1/hydra/stake", methods=["POST"], name="hydra_stake")
    app.add_route(unstake, "/v1/hydra/unstake", methods=["POST"], name="hydra_unstake")
    app.add_route(open_channel, "/v1/hydra/channels/open", methods=["POST"], name="hydra_channel_open")
    app.add_route(update_channel, "/v1/hydra/channels/update", methods=["POST"], name="hydra_channel_update")
    app.add_route(close_channel, "/v1/hydra/channels/close", methods=["POST"], name="hydra_channel_close")
