"""Tiny random models of the families we serve, built from configs and saved like real checkpoints.

They go through the same loading code as real weights (``save_pretrained`` + safetensors), so the
tests exercise the real path. The tokenizer is the embedded SmolLM2 tokenizer, so the vocabulary is
a real one and chat templates work.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen3", "qwen3_5")


def tiny_config(family: str, vocab_size: int, num_layers: int = 6):
    """A config small enough for a unit test (~1-4M parameters, mostly the embedding)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family == "llama":
        # Untied: a random model with tied embeddings mostly repeats its input token, which would make
        # "greedy output matches" a trivially true check. Tied heads are covered by real SmolLM2 tests.
        return AutoConfig.for_model("llama", tie_word_embeddings=False, **common)
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", head_dim=16, tie_word_embeddings=False, **common)
    if family == "qwen3_5":
        # Hybrid: three Gated-DeltaNet (linear attention) layers then one full-attention layer.
        pattern = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
        layer_types = [pattern[i % 4] for i in range(num_layers)]
        return AutoConfig.for_model(
            "qwen3_5_text",
            head_dim=16,
            layer_types=layer_types,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            full_attention_interval=4,
            tie_word_embeddings=False,
            **common,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_tiny_model(family: str, out_dir: Path, tokenizer_dir: Path, num_layers: int = 6, seed: int = 0) -> Path:
    """Write a random ``family`` model plus the tokenizer from ``tokenizer_dir`` into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(family, vocab_size=len(tokenizer), num_layers=num_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves logits nearly flat; scale the head so greedy decoding is decisive.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2 and param.shape[0] == config.vocab_size:
                param.mul_(4.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
