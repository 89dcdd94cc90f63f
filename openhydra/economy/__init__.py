"""The AppChain economy: barter credits and the HYDRA token on an append-only ledger.

Built from the ``economy/`` config group by :func:`openhydra.economy.factory.build_economy`.
See docs/economy.md for the rules, the storage choices and the measured numbers.
"""

from openhydra.economy.channels import ChannelUpdate, ChannelView, sign_update
from openhydra.economy.config import EconomyConfig
from openhydra.economy.economy import Economy, OffEconomy
from openhydra.economy.errors import (
    EconomyDisabled,
    InsufficientFunds,
    InvalidReceipt,
    InvalidRequest,
    LedgerConflict,
    LedgerError,
    LedgerUnavailable,
    ReceiptAlreadyApplied,
)
from openhydra.economy.ledger import Ledger
from openhydra.economy.policy import LedgerPolicy
from openhydra.economy.receipts import ServedShare, SettlementRequest, build_settlement, sign_settlement

__all__ = [
    "ChannelUpdate",
    "ChannelView",
    "Economy",
    "EconomyConfig",
    "EconomyDisabled",
    "InsufficientFunds",
    "InvalidReceipt",
    "InvalidRequest",
    "Ledger",
    "LedgerConflict",
    "LedgerError",
    "LedgerPolicy",
    "LedgerUnavailable",
    "OffEconomy",
    "ReceiptAlreadyApplied",
    "ServedShare",
    "SettlementRequest",
    "build_settlement",
    "sign_settlement",
    "sign_update",
]
