"""The comparison rules: log-probabilities within tolerance, tokens exact, near-ties inconclusive."""

from __future__ import annotations

import math

from openhydra.verification.compare import Answer, Verdict, compare, tolerance_for

TABLE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.5}


def _answer(token: int, pairs: dict[int, float]) -> Answer:
    return Answer(token, tuple(pairs), tuple(pairs.values()))


def test_identical_answers_agree_with_zero_diff() -> None:
    a = _answer(5, {5: -0.1, 7: -2.0, 9: -3.0})
    assert compare(a, a, 1e-3, greedy=True).verdict is Verdict.AGREE
    assert compare(a, a, 1e-3, greedy=True).max_diff == 0.0


def test_small_float_noise_agrees_large_noise_disagrees() -> None:
    a = _answer(5, {5: -0.1, 7: -2.0, 9: -3.0})
    close = _answer(5, {5: -0.1004, 7: -2.0006, 9: -3.0})
    far = _answer(5, {5: -0.12, 7: -2.0, 9: -3.0})
    assert compare(a, close, 1e-3, greedy=True).verdict is Verdict.AGREE
    result = compare(a, far, 1e-3, greedy=True)
    assert result.verdict is Verdict.DISAGREE and "log p(5)" in result.reason


def test_an_id_missing_from_the_other_top_k_must_rank_below_its_cut() -> None:
    a = _answer(5, {5: -0.1, 7: -2.0, 9: -3.0})
    swapped_tail = _answer(5, {5: -0.1, 7: -2.0, 11: -3.0005})  # 9 and 11 tie at the cut: fine
    invented = _answer(5, {5: -0.1, 7: -2.0, 12: -1.0})  # 12 would have ranked 2nd in a
    assert compare(a, swapped_tail, 1e-3, greedy=True).verdict is Verdict.AGREE
    assert compare(a, invented, 1e-3, greedy=True).verdict is Verdict.DISAGREE


def test_tokens_compare_exactly_with_near_ties_inconclusive() -> None:
    tie_a = _answer(5, {5: -0.6931, 7: -0.6932})
    tie_b = _answer(7, {7: -0.6931, 5: -0.6932})
    assert compare(tie_a, tie_b, 1e-3, greedy=True).verdict is Verdict.INCONCLUSIVE
    # Same log-probabilities but a greedy token that is not the top one: a lie about the token.
    honest = _answer(5, {5: -0.1, 7: -2.5})
    liar = _answer(7, {5: -0.1, 7: -2.5})
    assert compare(honest, liar, 1e-3, greedy=True).verdict is Verdict.DISAGREE
    # Seeded sampling: agreeing distributions but different draws cannot be blamed on anyone.
    assert compare(honest, liar, 1e-3, greedy=False).verdict is Verdict.INCONCLUSIVE


def test_nan_and_missing_logprobs() -> None:
    a = _answer(5, {5: -0.1})
    nan = _answer(5, {5: math.nan})
    assert compare(a, nan, 1.0, greedy=True).verdict is Verdict.DISAGREE
    bare_a, bare_b = Answer(5, (), ()), Answer(6, (), ())
    assert compare(bare_a, bare_a, 1e-3, True).verdict is Verdict.AGREE
    assert compare(bare_a, bare_b, 1e-3, True).verdict is Verdict.DISAGREE


def test_tolerance_is_the_loosest_dtype_involved() -> None:
    assert tolerance_for(["float32", "float32"], TABLE) == 1e-3
    assert tolerance_for(["float32", "bfloat16"], TABLE) == 0.5
    assert tolerance_for(["int8"], TABLE) == 0.5  # unknown: loosest
