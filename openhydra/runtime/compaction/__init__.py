"""KV-cache compaction by Attention Matching (Zweiger et al., arXiv:2602.16284).

Phase 1 selects tokens (HAK / OMP), phase 2 fits a per-key logit bias β (NNLS) and refits values
(ridge least squares), phase 3 takes per-layer/per-head budgets from JSON, phase 4 compacts online.
Only full-attention layers are compacted. See ``docs/compaction.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Resolved when first used (PEP 562), so importing ``openhydra.runtime.compaction.config`` (the config schema does,
# to validate a command line) does not import torch and transformers' modeling code: a config error is named in
# about a second instead of after several seconds of imports.
_HOME = {
    "ATTN_IMPLEMENTATION": "attention",
    "QueryCapture": "attention",
    "capture_queries": "attention",
    "register_compacted_attention": "attention",
    "use_compacted_attention": "attention",
    "HeadBudgets": "budgets",
    "load_budgets": "budgets",
    "save_budgets": "budgets",
    "CompactionPolicy": "compactor",
    "CompactionReport": "compactor",
    "cache_kv_bytes": "compactor",
    "compact_cache": "compactor",
    "CompactionConfig": "config",
    "CompactedLayer": "layer",
    "OnlineCompactor": "online",
}

if TYPE_CHECKING:
    from openhydra.runtime.compaction.attention import (
        ATTN_IMPLEMENTATION,
        QueryCapture,
        capture_queries,
        register_compacted_attention,
        use_compacted_attention,
    )
    from openhydra.runtime.compaction.budgets import HeadBudgets, load_budgets, save_budgets
    from openhydra.runtime.compaction.compactor import (
        CompactionPolicy,
        CompactionReport,
        cache_kv_bytes,
        compact_cache,
    )
    from openhydra.runtime.compaction.config import CompactionConfig
    from openhydra.runtime.compaction.layer import CompactedLayer
    from openhydra.runtime.compaction.online import OnlineCompactor


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ATTN_IMPLEMENTATION",
    "CompactedLayer",
    "CompactionConfig",
    "CompactionPolicy",
    "CompactionReport",
    "HeadBudgets",
    "OnlineCompactor",
    "QueryCapture",
    "cache_kv_bytes",
    "capture_queries",
    "compact_cache",
    "load_budgets",
    "register_compacted_attention",
    "save_budgets",
    "use_compacted_attention",
]
