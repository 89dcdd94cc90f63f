"""Coordinator-side embedding, so token ids never leave the coordinator (docs/security.md).

Under ``privacy=encrypted``/``onion`` the coordinator turns token ids into embeddings itself and the
first peer receives hidden states ``[S, D]`` like every other hop. The coordinator either reuses its
own first shard's ``ShardRuntime.embed`` or loads just ``embed_tokens.weight`` from the checkpoint
(:func:`load_embedder`: ``vocab x hidden`` values, e.g. 28 M for SmolLM2-135M).

:func:`forward_embedded` runs a first shard on such hidden states. ``ShardRuntime.forward`` accepts
only token ids on the first shard, so this mirrors it step for step (positions check, one session
lock, cache advanced by exactly the new positions) with the embedding lookup skipped. A
``hidden_states=`` path for the first shard in ``ShardRuntime.forward`` would replace it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from openhydra.runtime.shard import PositionMismatchError
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


def forward_embedded(rt, session_id: str, positions: torch.Tensor, hidden: torch.Tensor, all_logits: bool):
    """``rt.forward`` for a first shard given embeddings ``hidden`` [S, D] instead of token ids."""
    rt = getattr(rt, "inner", rt)  # a verification FaultyRuntime wraps the real one
    seq_len = rt._check_positions(positions)
    if tuple(hidden.shape) != (seq_len, rt.hidden_size):
        raise ValueError(f"hidden_states must be [{seq_len}, {rt.hidden_size}], got {tuple(hidden.shape)}")
    h = hidden.to(device=rt.device, dtype=rt.dtype).unsqueeze(0)  # [1, S, D]
    first = int(positions[0])
    session = rt._sessions.acquire(session_id)
    with session.lock:
        if first != session.length:
            raise PositionMismatchError(session_id, session.length, first)
        try:
            with torch.inference_mode():
                out = rt._run_layers(session, h, positions.to(rt.device).view(1, seq_len))
        except Exception:
            rt._sessions.drop(session_id)  # a failed step may have moved some caches
            raise
        session.length += seq_len
    return rt._output(out, all_logits)
