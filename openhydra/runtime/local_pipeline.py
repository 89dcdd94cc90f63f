"""Chaining ``ShardRuntime`` spans in one process: the reference the networked pipeline must match.

Used by tests and benchmarks (and usable as a full-model fallback): a step runs every span in
order, handing hidden states [S, D] from one to the next, exactly as peers do over the wire.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openhydra.runtime.shard import ShardRuntime


def check_tiling(runtimes: Sequence[ShardRuntime]) -> None:
    """Spans must tile [0, L) in order; anything else computes garbage silently."""
    if not runtimes:
        raise ValueError("a pipeline needs at least one span")
    expected = 0
    for rt in runtimes:
        if rt.start != expected:
            raise ValueError(f"span [{rt.start},{rt.end}) does not start at {expected}")
        expected = rt.end
    if expected != runtimes[0].num_layers:
        raise ValueError(f"spans end at {expected}, the model has {runtimes[0].num_layers} layers")


def pipeline_step(
    runtimes: Sequence[ShardRuntime],
    session_id: str,
    input_ids: torch.Tensor,
    start_position: int,
    all_logits: bool = False,
) -> torch.Tensor:
    """Token ids [S] at positions start..start+S -> float32 logits [1, V] (or [S, V])."""
    positions = torch.arange(start_position, start_position + input_ids.numel())
    out = runtimes[0].forward(session_id, positions, input_ids=input_ids, all_logits=all_logits)
    for rt in runtimes[1:]:
        out = rt.forward(session_id, positions, hidden_states=out, all_logits=all_logits)  # [S, D] between spans
    return out


def greedy_generate(
    runtimes: Sequence[ShardRuntime],
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    session_id: str = "local",
    prefill_chunk: int | None = None,
) -> list[int]:
    """Greedy decoding through the chained spans; the prompt optionally fed in chunks."""
    check_tiling(runtimes)
    chunk = prefill_chunk or prompt_ids.numel()
    position = 0
    logits = None
    for begin in range(0, prompt_ids.numel(), chunk):
        piece = prompt_ids[begin : begin + chunk]
        logits = pipeline_step(runtimes, session_id, piece, position)
        position += piece.numel()
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            break
        logits = pipeline_step(runtimes, session_id, torch.tensor([token]), position)
        position += 1
    return tokens
