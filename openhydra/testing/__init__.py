"""Helpers shared by tests and benchmarks: tiny random models built from configs, node processes."""

import os
from pathlib import Path

TEST_CACHE_ROOT = Path(os.environ.get("OPENHYDRA_TEST_CACHE", Path.home() / ".cache" / "openhydra-test"))
"""Where tests and benchmarks keep the converted SmolLM2 and the tiny models (converting takes ~20 s)."""
