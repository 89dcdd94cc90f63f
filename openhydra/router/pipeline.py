"""The coordinator's view of a model: something that turns (session, new tokens) into the next token.

`LocalPipeline` runs a `ShardRuntime` holding every layer in this process; the swarm pipeline (gRPC
peers, push forwarding, failover) implements the same protocol, so generation code is one piece.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from openhydra.metrics import METRICS
from openhydra.peer.client import StepResult
from openhydra.router import abandon
from openhydra.runtime.prefix_cache import PrefixKey, block_hashes
from openhydra.runtime.sampling import SamplingParams, sample
from openhydra.runtime.shard import PositionMismatchError
from openhydra.runtime.step_chain import ChainStats, StepChains

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAINS_SWITCH = "OPENHYDRA_STEP_CHAINS"
"""``OPENHYDRA_STEP_CHAINS=0``: no decode chains (each step queued by its caller, the earlier behaviour; for A/B
benchmarks: bench/bench_batching.py --with-unchained)."""


class Pipeline(Protocol):
    def step(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int
    ) -> int:
        """Feed ``token_ids`` at positions ``start_pos...``; return the token sampled after them."""
        ...

    def close(self, session_id: str) -> None: ...


class VerifyingPipeline(Pipeline, Protocol):
    """A pipeline that can verify speculative drafts (openhydra/router/speculative.py)."""

    supports_truncate: bool
    """False where caches cannot be cropped (recurrent layers): no speculation then."""

    def verify(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int,
        *, one_pass: bool = False,
    ) -> torch.Tensor:
        """Feed ``token_ids`` at ``start_pos...`` in one step; float32 logits for every position [S, V]: each
        position's the plain decode step's bits, or (``one_pass``) from one forward over all of them."""
        ...

    def truncate(self, session_id: str, length: int) -> None:
        """Crop the session to its first ``length`` positions on every hop."""
        ...


class DetailedPipeline(Pipeline, Protocol):
    """A pipeline that can report logprobs and return logits (OpenAI ``logprobs``, constrained decoding)."""

    def step_detail(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int,
        *, top_k: int = 0, logits: bool = False,
    ) -> StepResult:
        """``step``, plus the sampled token's logprob and the ``top_k`` most likely (ids, logprobs) of the
        last position, and with ``logits`` its float32 logits [1, V] (the coordinator masks and samples)."""
        ...


def detail_result(logits: torch.Tensor, token: int, last_hop: str, top_k: int, want_logits: bool) -> StepResult:
    """A StepResult for logits [V] the coordinator holds (local pipeline, coordinator-side head)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    if top_k:
        top = torch.topk(logprobs, min(top_k, logprobs.numel()))
        top_ids, top_logprobs = tuple(top.indices.tolist()), tuple(top.values.tolist())
    return StepResult(token=token, last_hop=last_hop, logits=logits.reshape(1, -1) if want_logits else None,
                      top_ids=top_ids, top_logprobs=top_logprobs, token_logprob=float(logprobs[token]))


class SessionEvicted(RuntimeError):
    """A session's cache was evicted from the node's runtime again and again while it generated: other sessions
    (this node's, or other coordinators' through its peer) keep taking its place. The API answers 503 with
    Retry-After: the node is overloaded, not broken."""

    retry_after_s = 2
    api_code = "overloaded"


@dataclass
class _Fed:
    """One call that fed a local session: replayed the same way (same function, positions and chunking) when the
    runtime evicted the session, so the rebuilt cache holds the first run's bits."""

    tokens: list[int]
    start: int
    verify: bool = False
    one_pass: bool = False
    keep: int | None = None
    """Positions of it kept after a truncate cut into it: replayed whole, then cut as the first run was."""

    @property
    def end(self) -> int:
        """The session's length after this feed."""
        return self.start + len(self.tokens) if self.keep is None else self.keep


class LocalPipeline:
    """All layers in one process. Prefill is chunked so a long prompt never needs one giant activation.

    The runtime's session store is shared with other coordinators (through this node's peer) and evicts the least
    recently used session beyond its bound; a session evicted between two steps is rebuilt here by replaying what
    fed it (at most :attr:`REPLAYS` times in one step), so a request never fails because others came."""

    REPLAYS = 3
    REPLAY_RUN = 256
    """Consecutive decode steps replayed in one call (1: each as its own step). A verify by position gives each
    position the bits of the decode step there (runtime/shard.py is_verify; through the batcher, batched decoding's),
    in one call that runs the positions layer by layer (4-4.6x faster on SmolLM2: bench/bench_replay.py)."""

    def __init__(self, runtime, prefill_chunk: int = 2048, prefix_block: int = 32) -> None:
        if not (runtime.is_first and runtime.is_last):
            raise ValueError(f"LocalPipeline needs a runtime with every layer, got [{runtime.start}, {runtime.end})")
        self.runtime = runtime
        # Chunks end on block boundaries: the runtime's exact mode computes block-aligned pieces, and a chunk
        # boundary inside a block would cut it differently in a cold run and a warm one (runtime/prefix_cache.py).
        self.prefill_chunk = max(prefix_block, prefill_chunk // prefix_block * prefix_block)
        self.prefix_block = prefix_block
        self._prefix_secret = os.urandom(32)  # block hashes are HMACs under this coordinator's own key
        self.reused_positions = 0
        self._lock = threading.Lock()
        self.supports_truncate = not runtime.is_recurrent
        self._chains: tuple[object, StepChains] | None = None  # (the batcher they run on, the chains)
        self._chaining = os.environ.get(CHAINS_SWITCH, "1") != "0"
        self._fed: dict[str, list[_Fed]] = {}  # each open session's feeds, for a replay after an eviction
        self.replays = 0

    @property
    def chains_steps(self) -> bool:
        """Whether :meth:`step` takes ``more``: decode steps queued by the batcher as soon as their token is
        sampled (runtime/step_chain.py). Needs the batcher, and a cache that can be cut (no recurrent layers)."""
        return self._step_chains() is not None

    @property
    def chain_stats(self) -> ChainStats | None:
        """How often a decode step was queued by the batcher before its caller asked (None: no chains yet)."""
        return None if self._chains is None else self._chains[1].stats

    def _step_chains(self) -> StepChains | None:
        batcher = getattr(self.runtime, "batcher", None)
        if batcher is None or not self.supports_truncate or not self._chaining:
            return None
        if self._chains is None or self._chains[0] is not batcher:
            with self._lock:
                if self._chains is None or self._chains[0] is not batcher:
                    self._chains = (batcher, StepChains(batcher, self.runtime.truncate_session))
        return self._chains[1]

    def _settle(self, session_id: str, closing: bool = False) -> None:
        if self._chains is not None:
            self._chains[1].settle(session_id, closing)

    def step(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int,
        *, more: int = 0, stop_ids: frozenset[int] = frozenset(),
    ) -> int:
        """The token sampled after feeding ``token_ids`` at ``start_pos``. ``more`` > 0 (plain decoding, where
        :attr:`chains_steps`): the caller may ask for that many steps after this one, each feeding the token the
        step before returned, until one in ``stop_ids``; the batcher queues each as soon as its token is sampled."""
        def run() -> int:
            chains = self._step_chains() if more > 0 else None if self._chains is None else self._chains[1]
            if chains is not None:
                if len(token_ids) == 1 and start_pos > 0 and (more > 0 or chains.has_ahead(session_id)):
                    return chains.step(session_id, token_ids[0], start_pos, sampling, step, more, stop_ids)[1]
                chains.settle(session_id)
            return sample(self._logits(session_id, token_ids, start_pos), sampling, step)

        return self._evictable(session_id, _Fed(list(token_ids), start_pos), run)

    def step_detail(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int,
        *, top_k: int = 0, logits: bool = False,
    ) -> StepResult:
        """``step`` plus what logprobs and constrained decoding need (DetailedPipeline)."""
        self._settle(session_id)
        out = self._evictable(session_id, _Fed(list(token_ids), start_pos),
                              lambda: self._logits(session_id, token_ids, start_pos)).reshape(-1).float()  # [V]
        token = sample(out, sampling, step)
        return detail_result(out, token, "local", top_k, logits)

    def _logits(self, session_id: str, token_ids: list[int], start_pos: int) -> torch.Tensor:
        if not token_ids:
            raise ValueError("a step needs at least one token")
        prefix_cache = getattr(self.runtime, "prefix_cache", None)
        if start_pos != 0 or prefix_cache is None:
            return self._feed(session_id, token_ids, start_pos, None)
        # A new session: reuse the longest cached prefix of its prompt (runtime/prefix_cache.py).
        key = PrefixKey(tuple(block_hashes(token_ids, self.prefix_block, self._prefix_secret)), self.prefix_block)
        skip = prefix_cache.available(key)
        while True:
            try:
                logits = self._feed(session_id, token_ids[skip:], skip, key)
                break
            except PositionMismatchError as exc:  # evicted since `available`: retry with what is left
                if exc.expected >= skip:
                    raise
                skip = exc.expected
        self.reused_positions += skip
        return logits

    def _feed(self, session_id: str, token_ids: list[int], start_pos: int, key: PrefixKey | None) -> torch.Tensor:
        logits = None
        with torch.inference_mode():
            for offset in range(0, len(token_ids), self.prefill_chunk):
                if offset:
                    abandon.check()  # the client went away during a long prefill: stop here (router/abandon.py)
                chunk = token_ids[offset : offset + self.prefill_chunk]
                ids = torch.tensor(chunk, dtype=torch.long)  # [S]
                positions = torch.arange(start_pos + offset, start_pos + offset + len(chunk))  # [S]
                extra = {"prefix": key} if key is not None and offset == 0 else {}
                batcher = getattr(self.runtime, "batcher", None)
                if batcher is not None and len(chunk) == 1 and not extra:  # decode: joins other sessions' steps
                    logits = batcher.forward(session_id, start_pos + offset, input_ids=ids)  # [1, V]
                else:
                    logits = self.runtime.forward(session_id, positions, input_ids=ids, **extra)  # [1, V]
        assert logits is not None
        return logits

    def verify(
        self, session_id: str, token_ids: list[int], start_pos: int, sampling: SamplingParams, step: int,
        *, one_pass: bool = False,
    ) -> torch.Tensor:
        self._settle(session_id)
        fed = _Fed(list(token_ids), start_pos, verify=True, one_pass=one_pass)
        return self._evictable(session_id, fed, lambda: self._verify(session_id, fed))

    def _verify(self, session_id: str, fed: _Fed) -> torch.Tensor:
        positions = torch.arange(fed.start, fed.start + len(fed.tokens))  # [S]
        ids = torch.tensor(fed.tokens, dtype=torch.long)
        batcher = getattr(self.runtime, "batcher", None)
        if batcher is not None and not fed.one_pass:  # rows of batched forwards: plain batched decoding's bits
            return batcher.submit_verify(session_id, fed.start, input_ids=ids).result()  # [S, V]
        with torch.inference_mode():  # per position inside too, unless one_pass (runtime/shard.py is_verify)
            return self.runtime.forward(session_id, positions, input_ids=ids, all_logits=True,
                                        **({"one_pass_verify": True} if fed.one_pass else {}))  # [S, V]

    def truncate(self, session_id: str, length: int) -> None:
        self._settle(session_id)
        self.runtime.truncate_session(session_id, length)
        kept: list[_Fed] = []
        for fed in self._fed.get(session_id, []):
            if fed.start >= length:
                break
            if fed.end > length:
                fed = _Fed(fed.tokens, fed.start, fed.verify, fed.one_pass, keep=length)
            kept.append(fed)
        self._fed[session_id] = kept

    def close(self, session_id: str) -> None:
        self._fed.pop(session_id, None)
        self._settle(session_id, closing=True)
        self.runtime.close_session(session_id)

    def _evictable(self, session_id: str, fed: _Fed, call: Callable[[], T]) -> T:
        """``call()``, which feeds ``fed`` to the session; where the runtime evicted the session since its last step
        (it then holds no position of it), the session is rebuilt from its recorded feeds and the call made again."""
        for attempt in range(self.REPLAYS + 1):
            try:
                if attempt:
                    self._replay(session_id)
                out = call()
            except PositionMismatchError as exc:
                if exc.expected != 0 or exc.got == 0 or (fed.start > 0 and not self._fed.get(session_id)):
                    raise  # not an eviction: a caller's mistake (a session it never fed), a prefix-cache seed
                if attempt == self.REPLAYS:
                    raise SessionEvicted(f"session {session_id}: evicted from this node's cache {attempt + 1} "
                                         "times while generating (more sessions than it keeps); try again "
                                         "later") from exc
                log.warning("session %s was evicted from the runtime at position %d; replaying its %d feeds",
                            session_id, exc.got, len(self._fed.get(session_id, [])))
                continue
            self._fed.setdefault(session_id, []).append(fed)
            return out
        raise AssertionError("unreachable")

    def _replay(self, session_id: str) -> None:
        """The session's cache again, fed as it was the first time (a decode step through the batcher, a verify
        by position or in one pass, a truncate where one cut a feed), so every bit is the first run's."""
        self.replays += 1
        METRICS.replays.inc()
        METRICS.replayed_steps.inc(len(self._fed.get(session_id, [])))
        self._settle(session_id)
        self.runtime.close_session(session_id)  # the empty session the refused step left
        run: list[int] = []  # consecutive decode steps' tokens, not replayed yet
        run_start = 0
        for fed in self._fed.get(session_id, []):
            step = fed.start > 0 and len(fed.tokens) == 1 and not fed.verify and fed.keep is None
            if step and run and fed.start == run_start + len(run) and len(run) < self.REPLAY_RUN:
                run.append(fed.tokens[0])
                continue
            self._replay_steps(session_id, run, run_start)
            run = []
            if step:
                run, run_start = [fed.tokens[0]], fed.start
                continue
            if fed.verify:
                self._verify(session_id, fed)
            else:
                self._logits(session_id, fed.tokens, fed.start)
            if fed.keep is not None:
                self.runtime.truncate_session(session_id, fed.keep)
        self._replay_steps(session_id, run, run_start)

    def _replay_steps(self, session_id: str, tokens: list[int], start: int) -> None:
        """Decode steps ``tokens`` at ``start...`` again, in one verify by position (each position gets the bits of
        the decode step there; without a batcher no logits are computed)."""
        if len(tokens) == 1:
            self._logits(session_id, tokens, start)
        elif tokens:
            if getattr(self.runtime, "batcher", None) is not None:
                self._verify(session_id, _Fed(tokens, start, verify=True))
                return
            with torch.inference_mode():
                self.runtime.forward(session_id, torch.arange(start, start + len(tokens)),
                                     input_ids=torch.tensor(tokens, dtype=torch.long), all_logits=True,
                                     return_hidden=True)
