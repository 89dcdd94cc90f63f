"""Read models the ledger hands out (pydantic, JSON-ready). Amounts are integer micro-units."""

from __future__ import annotations

from pydantic import BaseModel, Field

from openhydra.economy.units import from_micro


class AccountView(BaseModel):
    peer_id: str
    credits: int = Field(description="barter credits after decay up to now, micro-credits")
    hydra: int = Field(description="spendable HYDRA, micro-HYDRA")
    stake: int = Field(description="staked HYDRA, micro-HYDRA")
    escrow: int = Field(description="HYDRA locked in open channels this peer pays from, micro-HYDRA")
    open_channels: int

    def as_units(self) -> dict[str, float | int | str]:
        return {
            "peer_id": self.peer_id,
            "credits": from_micro(self.credits),
            "hydra": from_micro(self.hydra),
            "stake": from_micro(self.stake),
            "escrow": from_micro(self.escrow),
            "open_channels": self.open_channels,
        }


class SettlementResult(BaseModel):
    request_id: str
    receipt_id: str
    credits: dict[str, int]
    hydra: dict[str, int]


class SupplyView(BaseModel):
    credits_minted: int
    credits_burned: int
    hydra_minted: int
    hydra_burned: int
    hydra_cap: int
    hydra_staked: int
    settlements: int

    @property
    def hydra_supply(self) -> int:
        return self.hydra_minted - self.hydra_burned

    @property
    def credits_supply(self) -> int:
        return self.credits_minted - self.credits_burned


class AuditReport(BaseModel):
    problems: list[str]
    journal_rows: int

    @property
    def ok(self) -> bool:
        return not self.problems
