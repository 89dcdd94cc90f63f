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
    """Bytes of cached prefix blocks per runtime (LRU-evicted beyond), in MiB."""
    block: int = Field(32, ge=1, le=65536)
    """Tokens per hashed block: reuse happens in whole blocks. Spans with recurrent layers (Qwen3.5)
    run a session's prompt in block-sized pieces to snapshot their state at each boundary."""


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

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> ServingConfig:
        return cls.model_validate(dict(raw or {}))


def apply_serving(config: ServingConfig, runtime) -> None:
    """Turn on the runtime-side features ``config`` asks for on ``runtime`` (a ShardRuntime)."""
    from openhydra.runtime.batching import DecodeBatcher
    from openhydra.runtime.prefix_cache import PrefixCache

    if config.prefix_cache.enabled and config.prefix_cache.max_mb > 0:
        runtime.prefix_cache = PrefixCache(runtime.layer_types, int(config.prefix_cache.max_mb * 2**20))
    if config.batching.max_batch > 1:
        runtime.batcher = DecodeBatcher(runtime, config.batching.max_batch, config.batching.window_ms)
