"""Phase 4 of Attention Matching (arXiv:2602.16284): online compaction during generation.

An :class:`OnlineCompactor` belongs to one session. Every forward of the session runs inside
``compactor.capturing()`` so the most recent ``max_queries`` queries of each layer are kept as
reference queries (the prompt's queries first, then the decode steps' own). After each step,
``maybe_compact(cache)`` compacts the full-attention layers whenever one holds more than
``threshold_tokens`` tokens, down to ``ratio`` of its length: the cache then oscillates between
``ratio·threshold`` and ``threshold`` (+ one step), so memory stays flat however long generation
runs. Earlier β are folded into the new fit, so a block can be compacted again and again.

Positions: after compaction the cache holds fewer entries than tokens seen, so callers must pass
explicit ``position_ids`` (the pipeline's coordinator does); the causal mask only needs the cache
length, which stays consistent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from openhydra.runtime.compaction.attention import QueryCapture, capture_queries
from openhydra.runtime.compaction.compactor import (
    CompactionPolicy,
    CompactionReport,
    cache_kv_bytes,
    compact_cache,
    is_full_attention,
)


class OnlineCompactor:
    def __init__(
        self,
        policy: CompactionPolicy,
        threshold_tokens: int,
        layer_types: list[str] | None = None,
        max_queries: int = 1024,
        scale: float | None = None,
    ) -> None:
        if threshold_tokens < 2:
            raise ValueError(f"threshold_tokens must be >= 2, got {threshold_tokens}")
        self.policy = policy
        self.threshold_tokens = threshold_tokens
        self.layer_types = layer_types
        self.scale = scale
        self.capture = QueryCapture(max_queries)
        self.reports: list[CompactionReport] = []
        self.peak_kv_bytes = 0

    @contextlib.contextmanager
    def capturing(self) -> Iterator[QueryCapture]:
        with capture_queries(self.capture) as cap:
            yield cap

    def longest_layer(self, cache: object) -> int:
        return max(
            (
                layer.get_seq_length()
                for i, layer in enumerate(cache.layers)  # type: ignore[attr-defined]
                if is_full_attention(self.layer_types, i) and hasattr(layer, "keys")
            ),
            default=0,
        )

    def maybe_compact(self, cache: object) -> CompactionReport | None:
        """Compact if the cache passed the threshold; records the peak K/V bytes seen."""
        self.peak_kv_bytes = max(self.peak_kv_bytes, cache_kv_bytes(cache, self.layer_types))
        if self.longest_layer(cache) <= self.threshold_tokens:
            return None
        report = compact_cache(cache, self.layer_types, self.capture.as_dict(), self.policy, self.scale)
        self.reports.append(report)
        return report
