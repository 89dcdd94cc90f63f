"""The ``economy/`` config group's schema. Every option file (off, barter, hydra, postgres) validates here.

Units in config are whole credits / whole HYDRA; the ledger converts to integer micro-units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openhydra.economy.policy import LedgerPolicy
from openhydra.economy.store import sqlite_url
from openhydra.economy.units import MICRO

DEFAULT_TARGET = "openhydra.economy.factory.build_economy"


class EconomyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    target: str = Field(default=DEFAULT_TARGET, alias="_target_")
    enabled: bool = Field(default=True, description="false: record nothing (economy=off)")
    hydra: bool = Field(default=False, description="HYDRA token: mint on serve, burn, stake, slash, channels")
    backend: Literal["sqlite", "postgres"] = Field(default="sqlite", description="which database holds the ledger")
    db_url: str | None = Field(
        default=None, description="sqlite:///path or postgresql://...; null = SQLite at data_dir/ledger.db"
    )
    data_dir: str = Field(default="~/.openhydra", description="the node's data dir (ledger.db lives here)")
    decay_per_day: float = Field(default=0.05, ge=0.0, lt=1.0)
    tokens_per_credit: int = Field(default=1000, ge=1)
    hydra_per_credit: float = Field(default=1.0, ge=0.0, description="HYDRA minted per credit earned")
    supply_cap: int = Field(default=69_000_000, ge=0, le=9_000_000_000_000, description="whole HYDRA")
    channel_ttl_s: float = Field(default=900.0, gt=0.0)
    max_channels_per_peer: int = Field(default=8, ge=1, le=1024)
    sqlite_synchronous: Literal["NORMAL", "FULL", "EXTRA"] = Field(
        default="FULL", description="FULL: an acknowledged settlement survives a power cut"
    )
    busy_timeout_s: float = Field(default=5.0, gt=0.0)
    retry_budget_s: float = Field(default=60.0, gt=0.0)
    free_tier_tokens_per_day: int = Field(
        default=100_000, ge=0, description="tokens this node may request through the swarm per day without credits"
    )

    @model_validator(mode="after")
    def _url_matches_backend(self) -> EconomyConfig:
        scheme = {"sqlite": "sqlite:///", "postgres": "postgresql://"}[self.backend]
        if self.db_url is not None and not self.db_url.startswith(scheme):
            raise ValueError(f"db_url for backend {self.backend} must start with {scheme}, got {self.db_url!r}")
        return self

    @property
    def mode(self) -> str:
        if not self.enabled:
            return "off"
        return "hydra" if self.hydra else "barter"

    def resolved_db_url(self) -> str:
        """The URL to open. A missing Postgres URL is an error here (not in the schema), so the
        option still composes and validates on machines without a server."""
        if self.db_url:
            return self.db_url
        if self.backend == "postgres":
            from openhydra.config.load import ConfigError

            raise ConfigError(
                "economy=postgres needs a server: set economy.db_url=postgresql://user@host:port/db "
                "or the OPENHYDRA_PG_URL environment variable"
            )
        return sqlite_url(Path(self.data_dir).expanduser() / "ledger.db")

    def policy(self) -> LedgerPolicy:
        return LedgerPolicy(
            decay_per_day=self.decay_per_day,
            tokens_per_credit=self.tokens_per_credit,
            hydra_enabled=self.hydra,
            hydra_per_credit=self.hydra_per_credit,
            supply_cap=self.supply_cap * MICRO,
            channel_ttl_s=self.channel_ttl_s,
            max_channels_per_peer=self.max_channels_per_peer,
        )
