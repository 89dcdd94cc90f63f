"""Coordinator-side embedding, so token ids never leave the coordinator (docs/security.md).

Under ``privacy=encrypted``/``onion`` the coordinator turns token ids into embeddings itself and the
first peer receives hidden states ``[S, D]`` like every other hop. The coordinator either reuses its
own first shard's ``ShardRuntime.embed`` or maps just ``embed_tokens.weight`` from the checkpoint
(:func:`load_embedder`: ``vocab x hidden`` values, e.g. 28 M for SmolLM2-135M, read without a copy).

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


class MappedEmbedder:
    """The checkpoint's embedding table as stored, a view of the mapped file (nothing copied, whatever ``dtype``):
    a lookup gathers its rows and casts only those. A gather commutes with an element-wise cast, so this is
    bit for bit the lookup in a table cast to ``dtype`` first, without the private copy of the whole table
    (vocab x hidden values) that every node coordinating a model it does not hold the first layers of used to
    keep. Only the pages of rows looked up become resident, and they are shared with other processes mapping
    the file."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype) -> None:
        self.table = table  # [V, D], in the file's dtype
        self.dtype = dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 1 or int(ids.min()) < 0 or int(ids.max()) >= self.table.shape[0]:
            raise ValueError(f"token ids must be [S] in [0, {self.table.shape[0]})")
        return torch.nn.functional.embedding(ids, self.table).to(self.dtype)  # [S, D]


def load_embedder(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> MappedEmbedder:
    """Only the embedding table of the checkpoint at ``model_dir``, as an :data:`Embedder`."""
    index = CheckpointIndex.open(model_dir)
    name = index.source_name("embed_tokens.weight")
    if name is None:
        raise CheckpointError(f"{model_dir} has no embed_tokens.weight")
    return MappedEmbedder(index.read_as_stored(name), dtype)


def runtime_embedder(runtime) -> Embedder:
    """The coordinator's own first shard's embedding (exactly what the first peer would compute)."""
    return runtime.embed
