"""The prefix cache's byte bound follows the served weights (issue 15), and the glibc malloc knobs are safe."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from openhydra.runtime import malloc
from openhydra.runtime.serving import PrefixCacheConfig, ServingConfig, apply_serving
from openhydra.runtime.shard import ShardRuntime

MIB = 2**20


def test_max_bytes_is_the_smaller_of_max_mb_and_the_fraction() -> None:
    cfg = PrefixCacheConfig()  # defaults: 256 MiB, 0.25 of the weights
    assert cfg.max_fraction_of_weights == 0.25
    assert cfg.max_bytes(538_000_000) == 134_500_000  # SmolLM2-135M fp32: a quarter of its weights
    assert cfg.max_bytes(4_000_000_000) == 256 * MIB  # a big model: max_mb is the upper bound
    assert cfg.max_bytes(None) == 256 * MIB  # weights unknown: max_mb alone
    assert PrefixCacheConfig(max_fraction_of_weights=None).max_bytes(538_000_000) == 256 * MIB
    assert PrefixCacheConfig(max_mb=0).max_bytes(538_000_000) == 0


def test_fraction_must_not_be_negative() -> None:
    with pytest.raises(ValidationError, match="max_fraction_of_weights"):
        PrefixCacheConfig(max_fraction_of_weights=-0.1)


def test_apply_serving_bounds_the_cache_by_the_runtime_weights(tiny_model_dirs) -> None:
    rt = ShardRuntime(tiny_model_dirs["llama"])
    assert rt.loaded_bytes > 0
    apply_serving(ServingConfig.parse({"prefix_cache": {"max_mb": 256, "max_fraction_of_weights": 0.5}}), rt)
    assert rt.prefix_cache.max_bytes == int(0.5 * rt.loaded_bytes) < 256 * MIB

    rt2 = ShardRuntime(tiny_model_dirs["llama"])
    apply_serving(ServingConfig.parse({"prefix_cache": {"max_mb": 256, "max_fraction_of_weights": None}}), rt2)
    assert rt2.prefix_cache.max_bytes == 256 * MIB

    rt3 = ShardRuntime(tiny_model_dirs["llama"])
    apply_serving(ServingConfig.parse({"prefix_cache": {"max_fraction_of_weights": 0}}), rt3)
    assert getattr(rt3, "prefix_cache", None) is None  # a zero bound: no cache at all


def test_malloc_trim_is_throttled(monkeypatch) -> None:
    if malloc.glibc() is None:
        assert malloc.maybe_trim(0.001) is False  # not glibc: a no-op
        return
    monkeypatch.setattr(malloc, "_last_trim", -math.inf)  # not 0.0: monotonic time is < 3600 s after boot
    assert malloc.maybe_trim(3600) is True
    assert malloc.maybe_trim(3600) is False  # within the interval: skipped
    assert malloc.maybe_trim(0) is False  # 0: off


def test_limit_arenas_respects_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert malloc.limit_arenas() is None  # glibc already honoured the operator's variable
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("OPENHYDRA_MALLOC_ARENA_MAX", "0")
    assert malloc.limit_arenas() is None  # turned off
    monkeypatch.delenv("OPENHYDRA_MALLOC_ARENA_MAX")
    expected = None if malloc.glibc() is None else malloc.DEFAULT_ARENAS
    assert malloc.limit_arenas() == expected
