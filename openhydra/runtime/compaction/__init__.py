"""KV-cache compaction by Attention Matching (Zweiger et al., arXiv:2602.16284).

Phase 1 selects tokens (HAK / OMP), phase 2 fits a per-key logit bias β (NNLS) and refits values
(ridge least squares), phase 3 takes per-layer/per-head budgets from JSON, phase 4 compacts online.
Only full-attention layers are compacted. See ``docs/compaction.md``.
"""

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
