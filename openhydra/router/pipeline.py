"""The coordinator's view of a model: something that turns (session, new tokens) into the next token.

`LocalPipeline` runs a `ShardRuntime` holding every layer in this process; the swarm pipeline (gRPC
peers, push forwarding, failover) implements the same protocol, so generation code is one piece.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from openhydra.runtime.sampling import SamplingParams, sample


class Pipeline(Protocol):
    def step(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int
    ) -> int:
        """Feed ``token_ids`` at positions ``start_pos...``; return the token sampled after them."""
        ...

    def close(self, session_id: str) -> None: ...


class LocalPipeline:
    """All layers in one process. Prefill is chunked so a long prompt never needs one giant activation."""

    def __init__(self, runtime, prefill_chunk: int = 2048) -> None:
        if not (runtime.is_first and runtime.is_last):
            raise ValueError(f"LocalPipeline needs a runtime with every layer, got [{runtime.start}, {runtime.end})")
        self.runtime = runtime
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Lock()

    def step(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int
    ) -> int:
        if not token_ids:
            raise ValueError("a step needs at least one token")
        logits = None
        with torch.inference_mode():
            for offset in range(0, len(token_ids), self.prefill_chunk):
                chunk = token_ids[offset : offset + self.prefill_chunk]
                ids = torch.tensor(chunk, dtype=torch.long)  # [S]
                positions = torch.arange(start_pos + offset, start_pos + offset + len(chunk))  # [S]
                logits = self.runtime.forward(session_id, positions, input_ids=ids)  # [1, V]
        assert logits is not None
        return sample(logits, sampling, step)

    def close(self, session_id: str) -> None:
        self.runtime.close_session(session_id)
