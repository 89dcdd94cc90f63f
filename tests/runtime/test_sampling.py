"""Greedy sampling (runtime/sampling.py ``greedy_token``) picks exactly ``torch.argmax``'s token: the first index of
the largest value, a NaN's where there is one, for every shape and dtype a step hands it."""

from __future__ import annotations

import pytest
import torch

from openhydra.runtime.sampling import SamplingParams, greedy_token, sample


def _cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(49_152, generator=g), torch.randn(1, 300, generator=g)]
    ties = torch.zeros(1000)
    ties[[17, 400, 999]] = 3.0  # several maxima: the first
    cases.append(ties)
    infinite = torch.full((64,), float("-inf"))
    infinite[[5, 9]] = float("inf")
    cases.append(infinite)
    all_low = torch.full((64,), float("-inf"))  # nothing finite: index 0, as torch
    cases.append(all_low)
    nan = torch.randn(500, generator=g)
    nan[[33, 60]] = float("nan")  # a NaN wins, the first one
    cases.append(nan)
    cases.append(torch.randn(4, 1, 100, generator=g)[2])  # a [1, V] view of a batched step's logits
    cases.append(torch.randn(100, 2, generator=g)[:, 1])  # not contiguous
    cases.append(torch.randn(300, generator=g).bfloat16())  # bf16 rounds to ties: still the first
    cases.append(torch.randn(300, generator=g, requires_grad=True))
    return cases


@pytest.mark.parametrize("index", range(len(_cases())))
def test_greedy_token_is_torch_argmax(index):
    logits = _cases()[index]
    expected = int(torch.argmax(logits.reshape(-1).float()))
    assert greedy_token(logits) == expected
    assert sample(logits, SamplingParams(), step=3) == expected
    with torch.inference_mode():
        assert greedy_token(logits.detach().clone()) == expected
