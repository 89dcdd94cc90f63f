"""A stream's next decode step, queued on the batcher the moment its token is sampled.

Why. Through the API, eight streams on a batched node left the batcher idle ~2 ms per step (docs/benchmarks.md,
"Continuous batching"): after a batched forward, each stream's thread had to wake, sample its token and ask for the
next step, and the batcher waited until all eight had asked. Here a caller that says how many more steps it will ask
for (``more``) gets its next step queued by the batcher itself, on the batcher's thread, right after the forward:

1. the batcher samples the row's token with the function and arguments the caller would use
   (:func:`~openhydra.runtime.sampling.sample` on the same logits with the request's sampling and step index, which
   alone fix the token), and queues the next position fed with it, before any caller's future is set;
2. the caller's thread, when it asks for that position with that token, finds the step queued (or done) and takes
   the token sampled for it, so the caller and the batcher can never disagree on a token.

The tokens, the cache and every bit are those of the caller asking itself: the same steps at the same positions with
the same inputs (a batched step's rows do not depend on the batch: runtime/batching.py).

Only where it pays: the batcher queues a successor after a forward of at least two sessions (``min_sessions``),
where the others would wait for the slowest caller. A lone session's caller queues its own next step: measured side
by side, chaining it cost the lone stream ~4% (the next step then runs beside its caller's Python and the event
loop's, which contend for the GIL) and gained it nothing.

Bounds. A chain runs at most one step ahead of what its caller has asked for: a step queued by the batcher queues its
own successor only once the caller has asked for it (else the caller queues it when it does). It never queues past
``more`` steps, nor after a token in ``stop_ids``. A step nobody asks for is withdrawn if it has not run, or
waited for (and, unless the session is closing, cut from the cache) if it has: :meth:`StepChains.settle`, which
the pipeline calls before anything else touches the session (close, truncate, verify, a step of another kind).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from openhydra.runtime.batching import DecodeBatcher, _Pending
from openhydra.runtime.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Link:
    """One decode step of a chain: ``token_in`` fed at ``position``; ``token_out`` sampled from its logits."""

    session_id: str
    position: int
    token_in: int
    step: int  # the sampling step index of token_out
    more: int  # steps the caller may ask for after this one
    sampling: SamplingParams
    stop_ids: frozenset[int]
    claimed: bool = False  # the caller has asked for it
    done: bool = False  # its forward ran and token_out is set
    dropped: bool = False  # nobody will ask for it: queue nothing after it
    token_out: int | None = None
    pending: _Pending | None = field(default=None, repr=False)

    def matches(self, position: int, token: int, sampling: SamplingParams, step: int) -> bool:
        return (self.position, self.token_in, self.step, self.sampling) == (position, token, step, sampling)


@dataclass
class ChainStats:
    asked: int = 0  # chained steps callers asked for
    found: int = 0  # ... that the batcher had queued (or run) before the caller asked
    settled: int = 0  # steps queued ahead that nobody asked for (withdrawn, or run and cut)


class StepChains:
    """Per-session decode chains on one :class:`~openhydra.runtime.batching.DecodeBatcher` (module docstring).

    ``truncate(session_id, length)`` cuts a session's cache back to ``length`` positions: it undoes a step that ran
    ahead and that nobody asked for (the runtime must support it: not for recurrent layers)."""

    def __init__(self, batcher: DecodeBatcher, truncate: Callable[[str, int], None], min_sessions: int = 2) -> None:
        self._batcher = batcher
        self._truncate = truncate
        self.min_sessions = min_sessions
        """The batcher queues a successor only after a forward of at least this many sessions. A lone session's
        caller is the only one its next step would wait for, and its turnaround costs less than the contention of
        the next step running beside it (measured: bench/bench_batching.py --with-unchained)."""
        self._lock = threading.Lock()
        self._ahead: dict[str, _Link] = {}  # a session's step queued (or run) before its caller asked
        self.stats = ChainStats()

    def step(self, session_id: str, token: int, position: int, sampling: SamplingParams, step: int, more: int,
             stop_ids: frozenset[int] = frozenset()) -> tuple[torch.Tensor, int]:
        """Feed ``token`` at ``position``; the logits [1, V] and ``sample(logits, sampling, step)``. ``more``: how
        many steps after this one the caller may ask for, each fed the token the step before returned."""
        with self._lock:
            link = self._ahead.pop(session_id, None)
            stale = None
            if link is not None and not link.matches(position, token, sampling, step):
                stale, link = link, None
            late = False
            if link is not None:
                link.claimed = True
                link.more, link.stop_ids = more, stop_ids
                late = link.done  # it ran before we asked, so it queued nothing: we queue its successor
            self.stats.asked += 1
            self.stats.found += link is not None
        if stale is not None:
            log.warning("session %s: a step queued ahead (position %d) is not the one asked for (%d); cut",
                        session_id, stale.position, position)
            self._drop(stale, cut=True)
        if link is None:
            link = _Link(session_id, position, token, step, more, sampling, stop_ids, claimed=True)
            link.pending = self._pending(link)
            self._batcher.queue(link.pending)
        logits = link.pending.future.result()
        if link.token_out is None:  # after a lone forward (min_sessions): nothing was queued after it
            return logits, sample(logits, sampling, step)
        if late:
            with self._lock:
                nxt = self._successor(link)
            if nxt is not None:
                self._queue_or_forget(nxt)
        return logits, link.token_out

    def has_ahead(self, session_id: str) -> bool:
        """Whether a step of ``session_id`` was queued before its caller asked for it."""
        return session_id in self._ahead

    def settle(self, session_id: str, closing: bool = False) -> None:
        """Before anything else touches ``session_id``'s cache: a step queued ahead that nobody asked for is
        withdrawn, or waited for and (unless ``closing``) cut from the cache."""
        with self._lock:
            link = self._ahead.pop(session_id, None)
        if link is not None:
            self._drop(link, cut=not closing)

    # ---- internals --------------------------------------------------------------------------------------------

    def _pending(self, link: _Link) -> _Pending:
        return _Pending(link.session_id, link.position, torch.tensor([link.token_in]), None, False,
                        then=partial(self._follow, link))

    def _follow(self, link: _Link, logits: torch.Tensor) -> _Pending | None:
        """On the batcher's thread, before the link's future is set: its token, and its successor if its caller has
        asked for it."""
        with self._lock:
            if link.claimed and self._batcher.last_sessions < self.min_sessions:
                link.done = True  # its caller samples and queues the next step itself, as without chains
                return None
        token = sample(logits, link.sampling, link.step)
        with self._lock:
            link.token_out, link.done = token, True
            if not link.claimed:
                return None
            nxt = self._successor(link)
        return None if nxt is None else nxt.pending

    def _successor(self, link: _Link) -> _Link | None:
        """(Under the lock.) The step after ``link``, recorded as queued ahead; None where the chain ends."""
        if link.dropped or link.more <= 0 or link.token_out in link.stop_ids:
            return None
        nxt = _Link(link.session_id, link.position + 1, link.token_out, link.step + 1, link.more - 1, link.sampling,
                    link.stop_ids)
        nxt.pending = self._pending(nxt)
        self._ahead[link.session_id] = nxt
        return nxt

    def _queue_or_forget(self, link: _Link) -> None:
        try:
            self._batcher.queue(link.pending)
        except RuntimeError:  # the batcher closed (the node is stopping): nothing runs ahead
            with self._lock:
                if self._ahead.get(link.session_id) is link:
                    del self._ahead[link.session_id]
            link.pending.future.cancel()

    def _drop(self, link: _Link, cut: bool) -> None:
        with self._lock:
            link.dropped = True
            self.stats.settled += 1
        if self._batcher.withdraw(link.pending):
            return  # it never ran
        try:
            link.pending.future.result()
        except BaseException:  # its forward failed or was cancelled: nothing of it is in the cache
            return
        if cut:
            self._truncate(link.session_id, link.position)
