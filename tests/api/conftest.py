"""A real node process on a tiny random Llama (fp32), plus the transformers reference for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from openhydra.testing.processes import NodeProcess


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_node(tiny_llama: Path, tmp_path_factory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("node-data")
    overrides = ["model=local", f"model.path={tiny_llama}", "hardware=cpu", "hardware.dtype=float32",
                 f"node.data_dir={data}", "api.rate_limit_requests=100000"]
    with NodeProcess(overrides, threads=1) as node:
        yield node


class Reference:
    """transformers' own generate on the same weights, for token-exact comparisons."""

    def __init__(self, path: Path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.eval()

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        return out[0, len(prompt_ids):].tolist()

    def text(self, tokens: list[int]) -> str:
        eos = self.tokenizer.eos_token_id
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="session")
def tiny_reference(tiny_llama: Path) -> Reference:
    return Reference(tiny_llama, torch.float32)
