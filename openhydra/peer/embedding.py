"""Coordinator-side embedding, so token ids never leave the coordinator (docs/security.md).

Under ``privacy=encrypted``/``onion`` the coordinator turns token ids into embeddings itself and the
first peer receives hidden states ``[S, D]`` like every other hop. The coordinator either reuses its
own first shard's ``ShardRuntime.embed`` or loads just ``embed_tokens.weight`` from the checkpoint
(:func:`load_embedder`: ``vocab x hidden`` values, e.g. 28 M for SmolLM2-135M).

The first peer runs ``ShardRuntime.forward(hidden_states=...)`` on them: a first shard accepts either
token ids or embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from openhydra.runtime.weights import CheckpointError, CheckpointIndex

Embedder = Callable[[torch.Tensor], torch.Tensor]
"""Token ids [S] (int64) -> embeddings [S, D]."""


def load_embedder(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Embedder:
    """Only the embedding table of the checkpoint at ``model_dir``, as an :data:`Embedder`."""
    index = CheckpointIndex.open(model_dir)
    name = index.source_name("embed_tokens.weight")
    if name is None:
        raise CheckpointError(f"{model_dir} has no embed_tokens.weight")
    table = index.read({"embed": name}, {"embed": dtype})["embed"]  # [V, D]

    def embed(ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 1 or int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]:
            raise ValueError(f"token ids must be [S] in [0, {table.shape[0]})")
        return torch.nn.functional.embedding(ids, table)  # [S, D]

    return embed


def runtime_embedder(runtime) -> Embedder:
    """The coordinator's own first shard's embedding (exactly what the first peer would compute)."""
    return runtime.embed
