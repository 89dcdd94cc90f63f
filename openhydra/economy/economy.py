"""What the node holds: the economy of this node's identity, on top of the ledger.

:class:`Economy` is what ``economy=barter|hydra|postgres`` builds; :class:`OffEconomy` is what
``economy=off`` builds: it records nothing, says so (``enabled = False``) and refuses money operations.
Both expose the same methods, so the coordinator, the verification hooks and the HTTP routes never
branch on the config.
"""

from __future__ import annotations

from typing import Any

from openhydra.economy.channels import ChannelUpdate, ChannelView, sign_update
from openhydra.economy.config import EconomyConfig
from openhydra.economy.errors import EconomyDisabled, LedgerError, UnknownChannel
from openhydra.economy.ledger import Ledger
from openhydra.economy.receipts import SettlementRequest
from openhydra.economy.signing import SigningIdentity
from openhydra.economy.units import from_micro
from openhydra.economy.views import AccountView, SettlementResult
from openhydra.metrics import METRICS


class Economy:
    enabled = True

    def __init__(self, ledger: Ledger, identity: SigningIdentity, config: EconomyConfig) -> None:
        self.ledger = ledger
        self.identity = identity
        self.config = config

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def hydra_enabled(self) -> bool:
        return self.config.hydra

    # coordinator
    def settle(self, request: SettlementRequest, only: str | None = None) -> SettlementResult | None:
        """``only``: pay that peer's share alone (Ledger.settle)."""
        try:
            result = self.ledger.settle(request, only=only)
        except LedgerError as exc:  # /metrics: openhydra_ledger_errors_total, settlements{outcome}
            METRICS.ledger_error("settle", exc)
            raise
        METRICS.settled(request.tokens_served, result.credits, result.hydra, self.peer_id)
        return result

    # accounts
    def balance(self, peer_id: str | None = None) -> AccountView:
        return self.ledger.balance(peer_id or self.peer_id)

    def spend_credits(self, amount: int, ref: str = "") -> None:
        self.ledger.spend_credits(self.peer_id, amount, ref)

    def burn_for_priority(self, amount: int, reason: str = "priority") -> None:
        self.ledger.burn_hydra(self.peer_id, amount, reason)

    # staking (own stake) and the verification hooks
    def stake(self, amount: int) -> int:
        return self.ledger.stake(self.peer_id, amount)

    def unstake(self, amount: int) -> int:
        return self.ledger.unstake(self.peer_id, amount)

    def stake_of(self, peer_id: str) -> int:
        """Micro-HYDRA staked by ``peer_id`` (0 when unknown or when HYDRA is off): routing priority."""
        return self.ledger.stake_of(peer_id) if self.hydra_enabled else 0

    def hold_stake(self, peer_id: str, public_key_hex: str, target: int, may_release: bool) -> int | None:
        """Hold the stake another peer announced, from its HYDRA in this ledger (economy/remote_stake.py)."""
        if not self.hydra_enabled:
            return None
        return self.ledger.hold_stake(peer_id, public_key_hex, target, may_release)

    def slash(self, peer_id: str, amount: int, reason: str) -> int:
        """Burn up to ``amount`` micro-HYDRA of ``peer_id``'s stake; returns what was actually slashed."""
        return self.ledger.slash(peer_id, amount, reason) if self.hydra_enabled else 0

    # channels: this node pays from its own balance, or lodges updates it received as payee
    def open_channel(self, payee: str, deposit: int) -> ChannelView:
        return self.ledger.open_channel(self.peer_id, self.identity.public_key_bytes, payee, deposit)

    def pay(self, channel_id: str, amount: int) -> ChannelUpdate:
        """Sign and lodge the next update of a channel this node pays from (cumulative ``amount``)."""
        ch = self.ledger.channel(channel_id)
        if ch is None or ch.payer != self.peer_id:
            raise UnknownChannel(f"this node pays from no channel {channel_id}")
        update = sign_update(self.identity, channel_id, ch.nonce + 1, amount)
        self.ledger.update_channel(update)
        return update

    def update_channel(self, update: ChannelUpdate) -> ChannelView:
        return self.ledger.update_channel(update)

    def close_channel(self, channel_id: str, final: ChannelUpdate | None = None) -> ChannelView:
        return self.ledger.close_channel(channel_id, final)

    def channel(self, channel_id: str) -> ChannelView | None:
        return self.ledger.channel(channel_id)

    def status(self) -> dict[str, Any]:
        """The ``economy`` section of ``GET /v1/network/status``."""
        t = self.ledger.totals()
        section: dict[str, Any] = {
            "enabled": True,
            "mode": self.mode,
            "backend": self.ledger.backend,
            "peer_id": self.peer_id,
            "settlements": t.settlements,
            "credits": {
                "supply": from_micro(t.credits_supply),
                "decay_per_day": self.config.decay_per_day,
                "tokens_per_credit": self.config.tokens_per_credit,
            },
        }
        if self.hydra_enabled:
            section["hydra"] = {
                "supply": from_micro(t.hydra_supply),
                "cap": from_micro(t.hydra_cap),
                "minted": from_micro(t.hydra_minted),
                "burned": from_micro(t.hydra_burned),
                "staked": from_micro(t.hydra_staked),
                "channel_ttl_s": self.config.channel_ttl_s,
                "max_channels_per_peer": self.config.max_channels_per_peer,
            }
        return section

    def close(self) -> None:
        self.ledger.close()


class OffEconomy:
    """``economy=off``: nothing is recorded, balances read zero, money operations are refused."""

    enabled = False
    mode = "off"
    hydra_enabled = False
    peer_id = ""

    def settle(self, request: SettlementRequest, only: str | None = None) -> SettlementResult | None:
        return None  # nothing recorded, and the caller can tell

    def balance(self, peer_id: str | None = None) -> AccountView:
        return AccountView(peer_id=peer_id or "", credits=0, hydra=0, stake=0, escrow=0, open_channels=0)

    def stake_of(self, peer_id: str) -> int:
        return 0

    def hold_stake(self, peer_id: str, public_key_hex: str, target: int, may_release: bool) -> int | None:
        return None

    def slash(self, peer_id: str, amount: int, reason: str) -> int:
        return 0

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise EconomyDisabled("the economy is off on this node (economy=off)")

    spend_credits = burn_for_priority = stake = unstake = _refuse
    open_channel = pay = update_channel = close_channel = _refuse

    def channel(self, channel_id: str) -> ChannelView | None:
        return None

    def status(self) -> dict[str, Any]:
        return {"enabled": False, "mode": "off"}

    def close(self) -> None:
        return None
