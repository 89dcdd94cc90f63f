"""The acceptance rule on its own: it reproduces the target distribution (chi-square over many seeds), its
target distribution is exactly what ``sample`` draws from, and the controller adapts k and falls back."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from openhydra.router.drafters import Draft, draw_generator, lookup_continuation
from openhydra.router.speculative import KController, SpeculativeConfig, accept_drafts, target_probs
from openhydra.runtime.sampling import SamplingParams, sample, step_generator

V = 6
P_LOGITS = torch.log(torch.tensor([0.35, 0.25, 0.2, 0.1, 0.07, 0.03]))  # target p at temperature 1
Q_PROBS = torch.tensor([0.05, 0.1, 0.5, 0.2, 0.1, 0.05])  # a draft that disagrees with p


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=1.3, top_k=5),
                                    SamplingParams(temperature=1.0, top_p=0.8, seed=9),
                                    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=1)])
def test_target_probs_is_what_sample_draws_from(params):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    probs = target_probs(logits, params)
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    for step in range(40):  # same generator, same distribution: the same token, draw for draw
        drawn = int(torch.multinomial(probs, 1, generator=step_generator(params.seed, step)))
        assert drawn == sample(logits, params, step)


def _output_distribution(draft_fn, n: int) -> torch.Tensor:
    counts = torch.zeros(V)
    params = SamplingParams(temperature=1.0, seed=0)
    logits = torch.stack([P_LOGITS, P_LOGITS])  # [k + 1, V] for one draft token
    for seed in range(n):
        params = params.model_copy(update={"seed": seed})
        accepted, token = accept_drafts(logits, draft_fn(seed), params, step=0)
        counts[token if accepted == 0 else draft_fn(seed).tokens[0]] += 1
    return counts


def _chi2_pvalue(counts: torch.Tensor) -> float:
    expected = P_LOGITS.exp() / P_LOGITS.exp().sum() * counts.sum()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def test_rule_with_a_draft_distribution_reproduces_p():
    def draft(seed: int) -> Draft:
        token = int(torch.multinomial(Q_PROBS, 1, generator=draw_generator(seed, 0, "draft")))
        return Draft([token], Q_PROBS.unsqueeze(0))

    counts = _output_distribution(draft, 4000)
    assert _chi2_pvalue(counts) > 0.001, counts
    # the draft alone would be far off: the rule is doing the work
    assert float(chisquare(counts.numpy(), (Q_PROBS * counts.sum()).numpy()).pvalue) < 1e-6


def test_point_mass_draft_reproduces_p():
    counts = _output_distribution(lambda seed: Draft([2]), 4000)  # prompt lookup always proposes token 2
    assert _chi2_pvalue(counts) > 0.001, counts


def test_greedy_accepts_exactly_the_argmax_prefix():
    logits = torch.full((4, V), -5.0)
    for row, best in enumerate([1, 4, 0, 3]):
        logits[row, best] = 5.0
    assert accept_drafts(logits, Draft([1, 4, 0]), SamplingParams(), 7) == (3, 3)  # all accepted + bonus
    assert accept_drafts(logits, Draft([1, 5, 0]), SamplingParams(), 7) == (1, 4)  # corrected at the mismatch
    with pytest.raises(ValueError, match="rows"):
        accept_drafts(logits, Draft([1]), SamplingParams(), 0)


def test_prompt_lookup_finds_the_latest_longest_match():
    history = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 6, 7]
    assert lookup_continuation(history, 3, 1, 3) == [3, 4, 6]  # "6 7" last seen before "3 4 6"
    assert lookup_continuation([1, 2, 3, 4], 2, 1, 3) == []  # no earlier occurrence
    assert lookup_continuation([1, 2, 1, 2, 1, 2], 8, 2, 2) == [1, 2]  # bounded by what follows the match


def test_controller_adapts_k_and_falls_back_on_low_acceptance():
    control = KController(SpeculativeConfig(mode="prompt_lookup", k=4, window=3, min_acceptance=0.5,
                                            cooldown_tokens=2))
    assert control.want(remaining=100) == 2  # a long draft is earned by acceptance
    assert control.want(remaining=2) == 1  # never drafts past max_tokens
    control.record(2, 2)
    assert control.want(remaining=100) == 4  # doubled, capped at k
    control.record(4, 1)
    assert control.k == 2  # accepted + 1
    assert control.record(2, 0) is True  # 3 / 8 accepted over the window < 0.5: cool down
    assert [control.want(100) for _ in range(3)] == [0, 0, 2]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_ngram"):
        SpeculativeConfig(mode="prompt_lookup", min_ngram=5, max_ngram=2)
    with pytest.raises(ValueError):
        SpeculativeConfig(mode="medusa")
