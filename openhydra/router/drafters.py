"""Drafters for speculative decoding: who guesses the next k tokens at the coordinator.

* :class:`PromptLookupDrafter` (prompt lookup decoding, Saxena 2023): find the most recent earlier
  occurrence of the history's last n tokens (n from ``max_ngram`` down to ``min_ngram``) and propose
  what followed it. No model; the proposal is a point mass (q = δ), so the verifier can use the
  coupled rule in :mod:`openhydra.router.speculative`. It shines when the output copies the input
  (summaries, edits, code changes) and proposes nothing when there is no match.
* :class:`DraftModelDrafter` (Leviathan et al. 2023; Chen et al. 2023): a small model of the same
  tokenizer family run in the coordinator's process, one cache per session, rolled back by cropping
  to the prefix it shares with the accepted history. Greedy requests get its argmax (a point mass);
  sampled requests get tokens drawn from its distribution q, returned with q for the accept/reject rule.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from openhydra.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    q: torch.Tensor | None = None
    """float32 [len(tokens), V]: the distribution each token was drawn from; None for a point mass."""


class Drafter(Protocol):
    name: str

    def propose(self, session_id: str, history: list[int], k: int, sampling: SamplingParams, step: int) -> Draft:
        """Up to ``k`` tokens following ``history`` (prompt + accepted output); ``step`` is the index of the
        first proposed token in the output (seeds the draft's own sampling)."""
        ...

    def close(self, session_id: str) -> None: ...


def draw_generator(seed: int, step: int, tag: str) -> torch.Generator:
    """A generator keyed by (seed, step, tag): the speculative rule's draws are reproducible per request."""
    digest = hashlib.blake2b(f"{seed}:{step}:{tag}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class PromptLookupDrafter:
    name = "prompt_lookup"

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4, max_history: int = 8192) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram, self.max_history = min_ngram, max_ngram, max_history

    def propose(self, session_id: str, history: list[int], k: int, sampling: SamplingParams, step: int) -> Draft:
        return Draft(lookup_continuation(history[-self.max_history :], k, self.min_ngram, self.max_ngram))

    def close(self, session_id: str) -> None:
        return None


def lookup_continuation(history: list[int], k: int, min_ngram: int, max_ngram: int) -> list[int]:
    """The ``k`` tokens that followed the most recent earlier occurrence of the longest matching suffix."""
    size = len(history)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = history[size - n :]
        last = suffix[-1]
        # scan candidate ends from the most recent backwards; the suffix itself (end == size - 1) is skipped
        for end in range(size - 2, n - 2, -1):
            if history[end] == last and history[end - n + 1 : end + 1] == suffix:
                follow = history[end + 1 : end + 1 + k]
                if follow:
                    return follow
    return []


class DraftModelDrafter:
    """A small full model in this process (a :class:`ShardRuntime` holding every layer)."""

    name = "draft"

    def __init__(self, runtime, target_vocab_size: int, prefill_chunk: int = 512) -> None:
        if not (runtime.is_first and runtime.is_last):
            raise ValueError("the draft model must hold every layer")
        if runtime.is_recurrent:
            raise ValueError(f"draft model {runtime.model_type} has recurrent layers: its cache cannot be rolled back")
        self.runtime = runtime
        self.vocab = min(runtime.vocab_size, target_vocab_size)
        self.target_vocab_size = target_vocab_size
        self.prefill_chunk = prefill_chunk
        self._cached: dict[str, list[int]] = {}  # session -> tokens in the draft cache, in order
        self._lock = threading.Lock()

    def propose(self, session_id: str, history: list[int], k: int, sampling: SamplingParams, step: int) -> Draft:
        from openhydra.router.speculative import target_probs  # one definition of the processed distribution

        if max(history) >= self.runtime.vocab_size:  # a token the draft's embedding table lacks: no draft
            return Draft([])
        session_id = f"draft:{session_id}"  # the runtime may be shared (a model drafting for itself)
        logits = self._sync(session_id, history)  # [V_draft]: the draft's prediction after history
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for i in range(k):
            masked = logits[: self.vocab]
            if sampling.greedy:
                token = int(torch.argmax(masked))
            else:
                q = target_probs(masked, sampling)  # [vocab]
                token = int(torch.multinomial(q, 1, generator=draw_generator(sampling.seed, step + i, "draft")))
                rows.append(torch.nn.functional.pad(q, (0, self.target_vocab_size - self.vocab)))  # [V]
            tokens.append(token)
            if i + 1 < k:
                logits = self._feed(session_id, [token])
        q_rows = torch.stack(rows) if rows else None  # [k, V] when sampling
        return Draft(tokens, q_rows)

    def _sync(self, session_id: str, history: list[int]) -> torch.Tensor:
        """Bring the draft cache to exactly ``history`` (crop to the shared prefix, feed the rest)."""
        cached = self._cached.get(session_id, [])
        if self.runtime.session_length(session_id) != len(cached):  # evicted by the runtime's idle/LRU policy
            self.runtime.close_session(session_id)
            cached = self._cached[session_id] = []
        common = 0
        limit = min(len(cached), len(history) - 1)  # always feed at least one token to get logits
        while common < limit and cached[common] == history[common]:
            common += 1
        if common < len(cached):
            self.runtime.truncate_session(session_id, common)
            self._cached[session_id] = cached[:common]
        logits = None
        rest = history[common:]
        for offset in range(0, len(rest), self.prefill_chunk):
            logits = self._feed(session_id, rest[offset : offset + self.prefill_chunk])
        assert logits is not None
        return logits

    def _feed(self, session_id: str, tokens: list[int]) -> torch.Tensor:
        cached = self._cached.setdefault(session_id, [])
        positions = torch.arange(len(cached), len(cached) + len(tokens))  # [S]
        with torch.inference_mode():
            logits = self.runtime.forward(session_id, positions, input_ids=torch.tensor(tokens))  # [1, V]
        cached.extend(tokens)
        return logits[-1]

    def close(self, session_id: str) -> None:
        self._cached.pop(f"draft:{session_id}", None)
        self.runtime.close_session(f"draft:{session_id}")
