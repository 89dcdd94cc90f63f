"""The ``speculative`` config group's schema (conf/speculative/*.yaml), apart from the decoder (router/speculative.py)
so that validating a command line does not import torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpeculativeConfig(BaseModel):
    """The ``speculative`` config group (conf/speculative/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "prompt_lookup", "draft"] = "off"
    k: int = Field(4, ge=1, le=32)
    """Draft tokens per verify step (the most; adaptive k moves below it)."""
    adaptive: bool = True
    """Adapt k per session to the acceptance seen so far."""
    min_ngram: int = Field(2, ge=1, le=16)
    max_ngram: int = Field(4, ge=1, le=16)
    """Prompt lookup: suffix lengths matched against the history, longest first."""
    window: int = Field(4, ge=1)
    """Verify steps over which the acceptance rate is judged."""
    min_acceptance: float = Field(0.3, ge=0.0, le=1.0)
    """Below this acceptance rate over a window, decode plainly for ``cooldown_tokens`` tokens."""
    cooldown_tokens: int = Field(8, ge=0)
    exact: bool = True
    """Every hop computes each verified position as the one-position decode step plain decoding runs there, so
    greedy output is speculative=off's bit for bit (bf16 included). false: one forward over the k + 1
    positions, cheaper per verify (on CPUs most of all), but it rounds differently from plain decoding, and a
    near-tie can turn out another greedy token (bench/bench_speculative_api.py measures both)."""

    @model_validator(mode="after")
    def _ngrams(self) -> SpeculativeConfig:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        return self
