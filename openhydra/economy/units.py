"""Integer money: every balance is an integer count of micro-units (1 credit = 1 HYDRA = 10**6 units).

Floats never touch a balance; splits use the largest-remainder method so the parts always add up to the
whole, which is what lets the ledger prove "sum of balances == minted - burned" exactly.
"""

from __future__ import annotations

import math
from decimal import ROUND_DOWN, Decimal

MICRO = 1_000_000


def to_micro(amount: Decimal | int | str) -> int:
    """Whole units (at most 6 decimals) to micro-units; rejects finer amounts instead of rounding."""
    value = Decimal(amount)
    micro = value * MICRO
    if micro != micro.to_integral_value(rounding=ROUND_DOWN):
        raise ValueError(f"amount {amount} has more than 6 decimal places")
    return int(micro)


def from_micro(micro: int) -> float:
    return micro / MICRO


def whole(micro: int) -> str:
    """Micro-units as exact whole units for messages: 17333 -> '0.017333', 10**9 -> '1000'."""
    text = format(Decimal(micro) / MICRO, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def credits_for_tokens(tokens: int, tokens_per_credit: int) -> int:
    """Micro-credits earned for serving ``tokens`` tokens (1,000 tokens = 1 credit by default)."""
    return tokens * MICRO // tokens_per_credit


def split_by_weight(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, ties to the earlier entry)."""
    if total < 0 or not weights or any(w < 0 for w in weights) or sum(weights) == 0:
        raise ValueError(f"cannot split {total} by weights {weights}")
    weight_sum = sum(weights)
    floors = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    left = total - sum(floors)
    for i in sorted(range(len(weights)), key=lambda i: (-remainders[i], i))[:left]:
        floors[i] += 1
    return floors


def decayed(balance: int, decay_per_day: float, elapsed_s: float) -> int:
    """Balance left after ``elapsed_s`` seconds of compound decay, in whole units (see :func:`decay_step`)."""
    return decay_step(balance, decay_per_day, elapsed_s)[0]


def decay_step(balance: int, decay_per_day: float, elapsed_s: float) -> tuple[int, float]:
    """(units left, seconds of decay they account for) after ``elapsed_s`` seconds of compound decay.

    Only whole units decay: the exact balance is rounded up, and the seconds returned are those whose decay the
    whole units lost (at most ``elapsed_s``). The holder's clock moves on by those seconds only, so the fraction
    not yet lost is carried to the next look instead of dropped: an account looked at every few seconds decays as
    one left alone (rounding each look to the nearest unit lost nothing below half a unit per look, so a balance
    touched every 30 s under ~28,000 units never decayed at all)."""
    if balance <= 0 or decay_per_day <= 0 or elapsed_s <= 0:
        return balance, max(elapsed_s, 0.0)
    keep = 1.0 - decay_per_day
    exact = balance * keep ** (elapsed_s / 86_400.0)
    left = min(balance, math.ceil(exact - 1e-6 * max(1.0, exact * 1e-9)))  # float noise is not a unit
    if left == balance:
        return balance, 0.0
    if left <= 0:
        return 0, elapsed_s
    return left, min(elapsed_s, 86_400.0 * math.log(left / balance) / math.log(keep))


def decay_rebased(balance: int, new_balance: int, decay_per_day: float, carried_s: float) -> float:
    """Seconds of carried decay for ``new_balance`` that owe what ``carried_s`` seconds owed on ``balance`` (under a
    unit, after :func:`decay_step`): the fraction moves with the account when its balance changes."""
    if new_balance <= 0 or balance <= 0 or decay_per_day <= 0 or carried_s <= 0:
        return 0.0
    keep = 1.0 - decay_per_day
    owed = balance * (1.0 - keep ** (carried_s / 86_400.0))
    if owed >= new_balance:
        return 0.0
    return 86_400.0 * math.log1p(-owed / new_balance) / math.log(keep)
