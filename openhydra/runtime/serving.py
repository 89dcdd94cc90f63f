"""Settings of the ``serving/`` config group: prefix cache, continuous batching, request coalescing.

Each switch is independent so that a Hydra multirun can compare them
(``openhydra-node -m serving=default,off ...`` or ``serving.batching.max_batch=1,8``).
:func:`apply_serving` installs the runtime-side parts on a loaded :class:`ShardRuntime`; the
coordinator-side parts (prompt block hashing, coalescing) are read by ``node.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class PrefixCacheConfig(_Strict):
    enabled: bool = True
    max_mb: float = Field(256.0, ge=0)
    """Upper bound on cached prefix blocks per runtime (LRU-evicted beyond), in MiB."""
    max_fraction_of_weights: float | None = Field(0.25, ge=0)
    """Also bound the cache to this fraction of the weights the runtime holds (its span's loaded bytes), so a
    small model's cache does not outgrow it (issue 15: 256 MiB was half of SmolLM2-135M fp32). None: only
    ``max_mb``."""

    def max_bytes(self, weight_bytes: int | None) -> int:
        """The cache's byte bound for a runtime holding ``weight_bytes`` of weights (None: unknown)."""
        bound = int(self.max_mb * 2**20)
        if self.max_fraction_of_weights is not None and weight_bytes:
            bound = min(bound, int(self.max_fraction_of_weights * weight_bytes))
        return bound
    block: int = Field(32, ge=1, le=65536)
    """Tokens per hashed block: reuse happens in whole blocks. A runtime with the cache on computes every
    prompt in block-aligned pieces, cold or warm, so that a hit gives exactly the cold run's tokens (the
    coordinator's prefill chunk must be a multiple of it; runtime/prefix_cache.py)."""


class BatchingConfig(_Strict):
    max_batch: int = Field(1, ge=1, le=256)
    """Decode steps of different sessions run as one forward, up to this many (1: off)."""
    window_ms: float = Field(2.0, ge=0, le=1000)
    """How long the scheduler waits for more sessions' steps once one is pending (only while other
    sessions are active; a lone stream never waits)."""


class ServingConfig(_Strict):
    target: str = Field(default="openhydra.runtime.serving.ServingConfig", alias="_target_")
    prefix_cache: PrefixCacheConfig = PrefixCacheConfig()
    batching: BatchingConfig = BatchingConfig()
    coalesce: bool = True
    """Identical greedy requests arriving together are computed once and fanned out (router/coalesce.py)."""
    max_sessions: int = Field(64, ge=1, le=65536)
    """Sessions (KV caches) the runtime keeps: this node's requests' and other coordinators' through its peer.
    Beyond, the least recently used is evicted and its coordinator rebuilds it by replaying what fed it (the same
    tokens, exactly: router/pipeline.py LocalPipeline, router/swarm.py)."""
    max_kv_mb: float | None = Field(None, gt=0)
    """Bytes of the sessions' KV caches the runtime keeps, in MiB; beyond, the least recently used sessions are
    evicted (and replayed by their coordinators when they come back). None: half the memory available when the node
    loads its model. Without it, sessions were bounded only in number: 64 SmolLM2 sessions of 3,490 tokens would hold
    ~10 GiB (a red team measured ~167 MiB for one)."""
    decode_ahead: int = Field(2, ge=0, le=16)
    """Decode steps a request's worker computes before the event loop has taken them (router/token_stream.py):
    the next token is computed while the last one is detokenized and sent. 0: one step at a time, each asked
    for by the event loop once it has handled the last (slower: two thread wake-ups per token)."""

    def kv_bytes(self) -> int:
        """The KV byte bound: ``max_kv_mb``, or half the memory available now."""
        if self.max_kv_mb is not None:
            return int(self.max_kv_mb * 2**20)
        import psutil

        return psutil.virtual_memory().available // 2

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> ServingConfig:
        return cls.model_validate(dict(raw or {}))


def apply_serving(config: ServingConfig, runtime) -> None:
    """Turn on the runtime-side features ``config`` asks for on ``runtime`` (a ShardRuntime)."""
    from openhydra.runtime.batching import DecodeBatcher
    from openhydra.runtime.prefix_cache import PrefixCache

    runtime._sessions.resize(config.max_sessions)  # its SessionStore (ShardRuntime, MlxShardRuntime)
    runtime._sessions.bound_bytes(config.kv_bytes())
    max_bytes = config.prefix_cache.max_bytes(getattr(runtime, "loaded_bytes", None))
    if config.prefix_cache.enabled and max_bytes > 0:
        runtime.prefix_cache = PrefixCache(runtime.layer_types, max_bytes, config.prefix_cache.block)
    if config.batching.max_batch > 1:
        runtime.batcher = DecodeBatcher(runtime, config.batching.max_batch, config.batching.window_ms)


class ServingStatus:
    """What the serving features did, for ``/v1/network/status`` (``serving``) and ``/metrics``."""

    def __init__(self, runtime, coalescer=None, planner=None) -> None:
        self.runtime, self.coalescer, self.planner = runtime, coalescer, planner

    def network_status(self) -> dict:
        cache = getattr(self.runtime, "prefix_cache", None)
        batcher = getattr(self.runtime, "batcher", None)
        body: dict = {"prefix_cache": None, "batching": None, "coalescing": None}
        store = getattr(self.runtime, "_sessions", None)
        if store is not None:
            body["sessions"] = {"held": len(store), "max": store.max_sessions, "kv_bytes": store.nbytes,
                                "max_kv_bytes": store.max_bytes, "evicted_for_bytes": store.evicted_for_bytes}
        if cache is not None:
            s = cache.stats
            body["prefix_cache"] = {"hits": s.hits, "misses": s.misses, "reused_positions": s.reused_positions,
                                    "blocks": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes,
                                    "inserted_blocks": s.inserted_blocks, "evicted_blocks": s.evicted_blocks}
        if self.planner is not None:
            body["prefix_reuse"] = {"reused_positions": self.planner.reused_positions,
                                    "restarts": getattr(self.planner, "restarts", 0)}
        if batcher is not None:
            s = batcher.stats
            body["batching"] = {"max_batch": batcher.max_batch, "batches": s.batches, "batched_steps": s.steps,
                                "unbatched_steps": s.fallback_steps, "largest_batch": s.max_seen}
        if self.coalescer is not None:
            body["coalescing"] = {"runs": self.coalescer.runs, "coalesced": self.coalescer.coalesced}
        return body

    def metrics_text(self) -> str:
        status = self.network_status()
        lines: list[str] = []

        def counter(name: str, help_text: str, value: int) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"])

        if status["prefix_cache"]:
            pc = status["prefix_cache"]
            counter("openhydra_prefix_cache_hits_total", "Sessions seeded from the prefix cache.", pc["hits"])
            counter("openhydra_prefix_cache_reused_positions_total", "Positions not recomputed thanks to it.",
                    pc["reused_positions"])
            lines.extend(["# HELP openhydra_prefix_cache_bytes Bytes of cached prefix blocks.",
                          "# TYPE openhydra_prefix_cache_bytes gauge", f"openhydra_prefix_cache_bytes {pc['bytes']}"])
        if status.get("sessions"):
            lines.extend(["# HELP openhydra_kv_cache_bytes Bytes of the sessions' KV caches (as last measured).",
                          "# TYPE openhydra_kv_cache_bytes gauge",
                          f"openhydra_kv_cache_bytes {status['sessions']['kv_bytes']}"])
            counter("openhydra_sessions_evicted_for_bytes_total", "Sessions evicted to keep the KV caches under "
                    "serving.max_kv_mb.", status["sessions"]["evicted_for_bytes"])
        if status["batching"]:
            counter("openhydra_batched_decode_steps_total", "Decode steps run inside a batch.",
                    status["batching"]["batched_steps"])
            counter("openhydra_decode_batches_total", "Batched forwards.", status["batching"]["batches"])
        if status["coalescing"]:
            counter("openhydra_coalesced_requests_total", "Requests served by an identical request's run.",
                    status["coalescing"]["coalesced"])
        return "\n".join(lines) + "\n" if lines else ""
