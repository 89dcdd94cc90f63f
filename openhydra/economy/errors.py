"""Typed ledger errors: every failure a caller can act on has its own class.

Callers never see a raw database error. Lock contention is retried inside the store; what is left is
either a conflict (someone else won, or the money is not there), bad input, or the store being down.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of everything the economy raises."""

    code = "ledger_error"


class LedgerConflict(LedgerError):
    """The operation lost a race or would break an invariant; nothing was changed."""

    code = "conflict"


class InsufficientFunds(LedgerConflict):
    code = "insufficient_funds"

    def __init__(self, holder: str, pocket: str, have: int, need: int) -> None:
        from openhydra.economy.units import whole

        # in whole units, as the API takes and answers amounts (have/need keep the exact micro-units)
        super().__init__(f"{holder} has {whole(have)} {pocket}, needs {whole(need)}")
        self.holder, self.pocket, self.have, self.need = holder, pocket, have, need


class ReceiptAlreadyApplied(LedgerConflict):
    code = "receipt_already_applied"


class SupplyCapReached(LedgerConflict):
    code = "supply_cap_reached"


class ChannelLimitReached(LedgerConflict):
    code = "channel_limit_reached"


class StaleChannelUpdate(LedgerConflict):
    """A channel update whose nonce or amount does not move forward."""

    code = "stale_channel_update"


class ChannelClosed(LedgerConflict):
    code = "channel_closed"


class InvalidRequest(LedgerError):
    """Bad input: a non-positive amount, a transfer to oneself, a channel to oneself."""

    code = "invalid_request"


class InvalidReceipt(InvalidRequest):
    """A receipt or channel update that is malformed, tampered with, or signed by the wrong key."""

    code = "invalid_receipt"


class InvalidSignature(InvalidReceipt):
    code = "invalid_signature"


class UnknownChannel(LedgerError):
    code = "unknown_channel"


class EconomyDisabled(LedgerError):
    code = "economy_disabled"


class LedgerUnavailable(LedgerError):
    """The database stayed locked or unreachable past the retry budget."""

    code = "ledger_unavailable"
