"""KV compaction inside a :class:`~openhydra.runtime.shard.ShardRuntime`: each peer compacts its own layers.

Attention Matching (arXiv:2602.16284) per pipeline shard. A runtime built with an enabled
:class:`CompactionConfig` gets one :class:`ShardCompaction`, which

* switches the span's attention to ``openhydra_compacted`` (β-aware SDPA, same numbers as ``sdpa`` on
  an uncompacted cache) — the shard config object is shared by all its attention modules;
* gives every session an :class:`OnlineCompactor` holding the reference queries captured from that
  session's own forwards (prefill first, then decode steps);
* compacts only the span's full-attention layers (its slice of ``layer_types``: Qwen3.5's
  linear-attention layers keep their fixed-size state), with per-layer/per-head budgets of the
  budgets JSON shifted from global to local layer indices (``HeadBudgets.shifted(start)``).

When: ``mode=auto`` (phase 4) after every step whose cache passed ``threshold_tokens``;
``mode=prefill`` (phases 1-3) once, just before the session's first single-token (decode) step,
so the whole prompt — however many chunks it came in — is compacted with its own queries.

Positions stay exact: ``session.length`` counts positions seen, not cache entries, so the coordinator
keeps sending absolute positions (RoPE uses them) while the causal mask is built from the cache's
own length (transformers derives the query offset from the cache, not from ``position_ids``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from openhydra.runtime.compaction.attention import register_compacted_attention
from openhydra.runtime.compaction.budgets import HeadBudgets
from openhydra.runtime.compaction.compactor import CompactionPolicy, CompactionReport, cache_kv_bytes
from openhydra.runtime.compaction.config import CompactionConfig
from openhydra.runtime.compaction.online import OnlineCompactor

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SessionCompaction:
    """One session's compaction state (``Session.compaction``)."""

    online: OnlineCompactor
    compactions: int = 0
    appended_since: int = 0
    """Cache entries appended since the last compaction (what a rollback may still crop)."""


class ShardCompaction:
    def __init__(
        self,
        config: CompactionConfig,
        shard_config: Any,
        modules: torch.nn.Module,
        layer_types: list[str],
        start: int,
        end: int,
        num_layers: int,
    ) -> None:
        if not config.enabled:
            raise ValueError("ShardCompaction needs an enabled compaction config (mode prefill or auto)")
        self.config = config
        self.start, self.end = start, end
        self.layer_types = list(layer_types)
        policy = CompactionPolicy.from_config(config)
        if policy.budgets is not None:
            _check_budgets(policy.budgets, config.budgets_path, shard_config, start, end, num_layers)
            policy = dataclasses.replace(policy, budgets=policy.budgets.shifted(start))
        self.policy = policy
        self.scale = _attention_scale(modules)
        shard_config._attn_implementation = register_compacted_attention()
        self.full_layers = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
        log.info(
            "kv compaction: mode=%s phase=%d method=%s ratio=%.3g on layers [%d,%d) (%d full-attention)%s",
            config.mode, config.phase, config.method, config.ratio, start, end, len(self.full_layers),
            f", threshold {config.threshold_tokens} tokens" if config.mode == "auto" else "",
        )

    def new_state(self) -> SessionCompaction:
        threshold = self.config.threshold_tokens if self.config.mode == "auto" else 1 << 62
        online = OnlineCompactor(self.policy, threshold, self.layer_types, self.config.max_queries, self.scale)
        return SessionCompaction(online=online)

    def run(self, session: Any, seq_len: int, run_step: Any) -> torch.Tensor:
        """Run one step of ``session`` (``run_step()``) with query capture, compacting before/after it."""
        state: SessionCompaction | None = session.compaction
        if state is None:
            state = session.compaction = self.new_state()
        if self.config.mode == "prefill" and state.compactions == 0 and seq_len == 1 and session.length > 1:
            self._record(session, state, self._compact_now(state, session.cache))
        with state.online.capturing():
            out = run_step()
        state.appended_since += seq_len
        if self.config.mode == "auto":
            report = state.online.maybe_compact(session.cache)
            if report is not None:
                self._record(session, state, report, extra=seq_len)
        return out

    def check_truncate(self, session: Any, length: int) -> None:
        """A rollback may only crop entries appended since the last compaction."""
        state: SessionCompaction | None = getattr(session, "compaction", None)
        if state is None or state.compactions == 0:
            return
        drop = session.length - length
        if drop > state.appended_since:
            raise NotImplementedError(
                f"session {session.session_id!r}: cannot roll back {drop} positions, the KV cache was compacted "
                f"{state.appended_since} positions ago (compacted blocks cannot be un-merged)"
            )
        state.appended_since -= drop

    def stats(self, session: Any) -> dict[str, int]:
        """Cache entries vs positions of a session (tests, status)."""
        state: SessionCompaction | None = getattr(session, "compaction", None)
        online = state.online if state is not None else None
        longest = online.longest_layer(session.cache) if online is not None else 0
        return {
            "positions": session.length,
            "longest_layer_tokens": longest,
            "kv_bytes": cache_kv_bytes(session.cache, self.layer_types),
            "peak_kv_bytes": online.peak_kv_bytes if online is not None else 0,
            "compactions": state.compactions if state is not None else 0,
        }

    def _compact_now(self, state: SessionCompaction, cache: Any) -> CompactionReport:
        from openhydra.runtime.compaction.compactor import compact_cache

        online = state.online
        report = compact_cache(cache, self.layer_types, online.capture.as_dict(), self.policy, self.scale)
        online.reports.append(report)
        return report

    def _record(self, session: Any, state: SessionCompaction, report: CompactionReport, extra: int = 0) -> None:
        state.compactions += 1
        state.appended_since = 0
        log.info(
            "kv compaction: session %s layers [%d,%d) at %d positions: %d -> %d KV bytes in %.3f s "
            "(longest layer %d tokens, compaction #%d)",
            session.session_id, self.start, self.end, session.length + extra, report.bytes_before,
            report.bytes_after, report.seconds, state.online.longest_layer(session.cache), state.compactions,
        )


def _attention_scale(modules: torch.nn.Module) -> float | None:
    """The softmax scale of the span's attention modules (None: head_dim ** -0.5)."""
    for module in modules.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, float) and hasattr(module, "layer_idx"):
            return scaling
    return None


def _check_budgets(
    budgets: HeadBudgets, path: str | None, shard_config: Any, start: int, end: int, total: int
) -> None:
    """Fail at load, not mid-session, when a budgets file does not fit the model."""
    heads = int(getattr(shard_config, "num_key_value_heads", None) or shard_config.num_attention_heads)
    for layer, entry in budgets.layers.items():
        if layer >= total:
            raise ValueError(f"compaction.budgets_path={path}: layer {layer} is past the model's last layer")
        if start <= layer < end and len(entry) != heads:
            raise ValueError(
                f"compaction.budgets_path={path}: layer {layer} lists {len(entry)} KV heads, the model has {heads}"
            )
