"""Validated settings of the ``compaction/`` config group (Attention Matching, arXiv:2602.16284).

Phases: 1 selects tokens (HAK or OMP) into a standard cache; 2 adds β (NNLS) and a C_v refit;
3 is phase 2 with per-layer/per-head budgets from a JSON file; 4 compacts online whenever a
session's cache passes ``threshold_tokens`` (with phase-2 fitting, or phase-3 budgets if a file is
given). ``mode``: ``off``; ``prefill`` compacts once after the prompt; ``auto`` compacts online.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CompactionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    target: str = Field(default="openhydra.runtime.compaction.config.CompactionConfig", alias="_target_")
    mode: Literal["off", "prefill", "auto"] = "off"
    phase: Literal[1, 2, 3, 4] = 2
    method: Literal["hak", "omp"] = "hak"
    ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    """Kept tokens / tokens before compaction, for layers the budgets file does not name."""
    budgets_path: str | None = None
    """JSON of per-layer, per-KV-head budgets (``budgets.py``); required by phase 3."""
    threshold_tokens: int = Field(default=4096, ge=2)
    """Phase 4: compact when a full-attention layer holds more tokens than this."""
    max_queries: int = Field(default=128, ge=1)
    """Reference queries kept per layer: the most recent ones, per query head (docs/compaction.md)."""
    beta_ridge: float = Field(default=1e-3, ge=0.0)
    value_ridge: float = Field(default=0.03, ge=0.0)
    """Ridge of the C_v refit, relative to the mean diagonal of P̃ᵀP̃ (docs/compaction.md: 0.03 measured best)."""
    nnls_iters: int = Field(default=300, ge=1)
    omp_chunks: int = Field(default=16, ge=1)
    recent_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Share of each head's budget kept verbatim for the newest tokens; the older block is compacted."""

    @model_validator(mode="after")
    def _consistent(self) -> CompactionConfig:
        if self.phase == 3 and self.mode != "off" and not self.budgets_path:
            raise ValueError("compaction.phase=3 needs compaction.budgets_path (a budgets JSON file)")
        if self.phase == 4 and self.mode == "prefill":
            raise ValueError("compaction.phase=4 is online compaction: use compaction.mode=auto")
        if self.mode == "auto" and self.phase != 4:
            raise ValueError(f"compaction.mode=auto is phase 4, got compaction.phase={self.phase}")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def fit(self) -> bool:
        """Whether β and C_v are fitted (phases 2-4) or tokens are only selected (phase 1)."""
        return self.phase >= 2

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> CompactionConfig:
        """Validate a composed Hydra node (DictConfig or dict)."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except ImportError:  # pragma: no cover - omegaconf ships with hydra
            pass
        return cls.model_validate(dict(cfg))
