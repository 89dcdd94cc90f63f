"""Integer money: splits add up exactly, decay is 5% a day, amounts never round silently."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openhydra.economy.units import MICRO, credits_for_tokens, decayed, split_by_weight, to_micro


@settings(deadline=None)  # a loaded worker can pause past hypothesis's 200 ms per example
@given(st.integers(0, 10**15), st.lists(st.integers(1, 200), min_size=1, max_size=16))
def test_split_adds_up_and_is_proportional(total: int, weights: list[int]) -> None:
    parts = split_by_weight(total, weights)
    assert sum(parts) == total
    for part, w in zip(parts, weights, strict=True):
        exact = total * w / sum(weights)
        assert abs(part - exact) < 1.0 + 1e-9


def test_split_by_layers_example() -> None:
    # 3,000 tokens over layers 8 + 8 + 16: 3 credits -> 0.75, 0.75, 1.5
    assert split_by_weight(credits_for_tokens(3000, 1000), [8, 8, 16]) == [750_000, 750_000, 1_500_000]


def test_thousand_tokens_is_one_credit() -> None:
    assert credits_for_tokens(1000, 1000) == MICRO
    assert credits_for_tokens(1, 1000) == 1000


def test_decay_five_percent_per_day() -> None:
    assert decayed(100 * MICRO, 0.05, 86_400) == 95 * MICRO
    assert decayed(100 * MICRO, 0.05, 2 * 86_400) == round(100 * MICRO * 0.95**2)
    assert decayed(100 * MICRO, 0.05, 0) == 100 * MICRO
    assert decayed(100 * MICRO, 0.0, 10 * 86_400) == 100 * MICRO


@pytest.mark.parametrize("bad", ["0.0000001", "1e-9"])
def test_to_micro_refuses_sub_micro_amounts(bad: str) -> None:
    with pytest.raises(ValueError):
        to_micro(bad)


def test_to_micro_exact() -> None:
    assert to_micro("1.5") == 1_500_000
    assert to_micro("0.000001") == 1
