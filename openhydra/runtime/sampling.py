"""Token sampling on a logits vector: greedy, temperature, top-k, top-p, seeded.

Pure functions on purpose: the last peer of a pipeline runs them, so a request's seed and step index
fully determine the token (no hidden generator state that would differ between a single process,
a pipeline, or a replacement peer after failover).
"""

from __future__ import annotations

import hashlib

import torch
from pydantic import BaseModel, ConfigDict, Field

MAX_TEMPERATURE = 10.0
"""The highest temperature a step carries (the peers check it too): past it sampling is all but uniform."""


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: no top-k cut
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator seeded from (seed, step) alone, so any peer can reproduce step ``step``."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied: the float32 [V] weights ``sample`` draws from (temperature > 0).

    After a top-p cut they are not renormalised (``torch.multinomial`` does that); divide by their sum for
    the distribution itself (speculative decoding's accept/reject rule)."""
    logits = logits.reshape(-1).float() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs


def greedy_token(logits: torch.Tensor) -> int:
    """``torch.argmax`` of ``logits`` (any shape, flattened): the first index of the largest value, a NaN's if there
    is one. On the CPU through NumPy's argmax, which answers the same index (tests/runtime/test_sampling.py) in ~2
    instead of ~26 us for a 49,152-entry vocabulary: a batched node's streams each pay it once per token."""
    flat = logits.reshape(-1).float()
    if flat.device.type == "cpu":
        return int(flat.detach().numpy().argmax())
    return int(torch.argmax(flat))


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """Pick the next token from ``logits`` ([V] or [1, V]) under ``params`` at decode step ``step``."""
    if params.greedy:
        return greedy_token(logits)
    choice = torch.multinomial(filtered_probs(logits, params), 1, generator=step_generator(params.seed, step))
    return int(choice)
