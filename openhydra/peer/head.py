"""Coordinator-side sampling, so generated token ids never leave the coordinator either (docs/security.md).

The mirror of :mod:`openhydra.peer.embedding` at the other end of the chain. Under ``privacy=onion`` the
last peer returns its final hidden state ``[S, D]`` (before the final norm, sealed with its return key)
instead of a sampled token, and the coordinator applies the model's own final norm and LM head (built from
the checkpoint exactly as the last shard builds them, in the last shard's dtype) and samples itself. The
last peer then sees hidden states only, as every other hop does; the model being public, it can still compute
the same logits from them (a curious last peer, verification/faults.py; docs/security.md says what this buys).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from openhydra.runtime import compute_lane
from openhydra.runtime.quant_cpu import use_bf16_head
from openhydra.runtime.shard_layers import ATTN_IMPLEMENTATION, load_text_config, make_shard_config
from openhydra.runtime.weights import CheckpointError, CheckpointIndex

Head = Callable[[torch.Tensor], torch.Tensor]
"""Final hidden states [S, D] -> float32 logits [S, V]."""


def load_head(model_dir: str | Path, dtype: torch.dtype = torch.float32, matmul: str = "pytorch") -> Head:
    """The checkpoint's final norm and LM head (tied to the embeddings when the model ties them), its matmul where
    the last span's runs (``matmul``: hardware.matmul)."""
    text_config = load_text_config(model_dir)
    total = text_config.num_hidden_layers
    config = make_shard_config(text_config, total - 1, total)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    norm, lm_head = skeleton.get_decoder().norm, skeleton.get_output_embeddings()
    del skeleton
    index = CheckpointIndex.open(model_dir)
    tied = index.head_is_tied(bool(getattr(text_config, "tie_word_embeddings", False)))
    names = {f"norm.{n}": index.source_name(f"norm.{n}") for n, _ in norm.named_parameters()}
    names["lm_head.weight"] = index.source_name("embed_tokens.weight" if tied else "lm_head.weight")
    missing = [target for target, source in names.items() if source is None]
    if missing:
        raise CheckpointError(f"{model_dir} lacks tensors for the coordinator's head: {missing}")
    tensors = index.read(names, dict.fromkeys(names, dtype), keep_casts=matmul != "library")
    norm.load_state_dict({k.removeprefix("norm."): v for k, v in tensors.items() if k.startswith("norm.")},
                         strict=True, assign=True)
    lm_head.load_state_dict({"weight": tensors["lm_head.weight"]}, strict=False, assign=True)
    norm.eval().requires_grad_(False)
    lm_head.eval().requires_grad_(False)
    holder = torch.nn.Module()  # on the bf16 kernel where the last span's head is (runtime/quant_cpu.py)
    holder.lm_head = lm_head
    if matmul == "library" and use_bf16_head(holder, dtype, "cpu"):
        lm_head = holder.lm_head

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return lm_head(norm(hidden.to(dtype).unsqueeze(0)))[0].float()  # [S, V]

    def head(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[-1] != lm_head.in_features:
            raise ValueError(f"final hidden states must be [S, {lm_head.in_features}], got {tuple(hidden.shape)}")
        return compute_lane.run(apply, hidden)  # the node's threads, where it has a lane (runtime/compute_lane.py)

    return head


def runtime_head(runtime) -> Head:
    """The coordinator's own last shard's norm and head (exactly what the last peer would compute)."""
    modules = runtime.modules

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return modules.lm_head(modules.norm(hidden.to(runtime.dtype).unsqueeze(0)))[0].float()

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return compute_lane.run(apply, hidden)

    return head
