"""The economic rules one ledger applies, in integer micro-units (built from EconomyConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from openhydra.economy.units import MICRO


@dataclass(frozen=True)
class LedgerPolicy:
    decay_per_day: float = 0.05  # barter credits lose 5% per day, compounded continuously per touch
    tokens_per_credit: int = 1000  # 1,000 tokens served = 1 credit, split by layers
    hydra_enabled: bool = True  # mint HYDRA on serve; allow burn / stake / slash / channels
    hydra_per_credit: float = 1.0  # HYDRA minted per credit earned, while under the cap
    supply_cap: int = 69_000_000 * MICRO  # micro-HYDRA; minted - burned never exceeds it
    channel_ttl_s: float = 900.0  # a state channel expires 15 minutes after it opens
    max_channels_per_peer: int = 8  # open channels a peer may be party to

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay_per_day < 1.0:
            raise ValueError(f"decay_per_day must be in [0, 1), got {self.decay_per_day}")
        if self.tokens_per_credit < 1 or self.supply_cap < 0 or self.hydra_per_credit < 0:
            raise ValueError("tokens_per_credit must be >= 1, supply_cap and hydra_per_credit >= 0")
        if self.channel_ttl_s <= 0 or self.max_channels_per_peer < 1:
            raise ValueError("channel_ttl_s must be > 0 and max_channels_per_peer >= 1")
