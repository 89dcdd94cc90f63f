"""Economy routes: balance, stake/unstake, state channels, and the economy part of network status.

``register_economy_routes(app, economy)`` is called by the app builder with the node's economy (an
``Economy`` or an ``OffEconomy``). Amounts on the wire are whole HYDRA / credits as JSON numbers or
strings with at most 6 decimals; signed channel updates carry integer micro-HYDRA (``amount_micro``)
because that is what the payer signed. Ledger calls run in a worker thread so a busy SQLite file never
stalls the event loop. Every refusal is an :class:`APIError`; a refused request changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra.api.bodies import parse_body
from openhydra.api.errors import APIError, bad_request
from openhydra.economy import errors as econ
from openhydra.economy.channels import ChannelUpdate, ChannelView
from openhydra.economy.units import from_micro, to_micro

T = TypeVar("T")

Amount = Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=6)]
PeerId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
ChannelId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
HexSignature = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]


class StakeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Amount


class OpenChannelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    payee: PeerId
    deposit: Amount


class SignedUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nonce: int = Field(ge=1, le=2**62)
    amount_micro: int = Field(ge=0, le=2**62)
    signature: HexSignature


class UpdateChannelBody(BaseModel):
    """Either ``amount`` (this node is the payer: it signs the next update itself) or a signed update."""

    model_config = ConfigDict(extra="forbid")
    channel_id: ChannelId
    amount: Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)] | None = None
    signed: SignedUpdate | None = None


class CloseChannelBody(BaseModel):
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
        peer_id = request.args.get("peer_id") or None
        if peer_id is not None and not (0 < len(peer_id) <= 128 and peer_id.isprintable()):
            raise bad_request("peer_id must be 1-128 printable characters", param="peer_id")
        view = await _call(economy.balance, peer_id)
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
        if (body.amount is None) == (body.signed is None):
            raise bad_request("give exactly one of amount (this node pays) or signed (a payer's update)")
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

    app.add_route(balance, "/v1/account/balance", methods=["GET"], name="economy_balance")
    app.add_route(stake, "/v1/hydra/stake", methods=["POST"], name="hydra_stake")
    app.add_route(unstake, "/v1/hydra/unstake", methods=["POST"], name="hydra_unstake")
    app.add_route(open_channel, "/v1/hydra/channels/open", methods=["POST"], name="hydra_channel_open")
    app.add_route(update_channel, "/v1/hydra/channels/update", methods=["POST"], name="hydra_channel_update")
    app.add_route(close_channel, "/v1/hydra/channels/close", methods=["POST"], name="hydra_channel_close")
