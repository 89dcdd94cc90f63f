"""A request's decode steps run back to back on the engine's thread pool, their tokens handed to the event loop.

The engine used to ask for each step from the event loop: ``run_in_executor(decoder.next_tokens)``, await it,
detokenize and send, then ask again. Every token then paid two thread wake-ups on its critical path (the loop
waking a worker, the worker's result waking the loop) and the loop's own work between them. Here a worker runs
the next step as soon as the last one is done, and the loop detokenizes and sends in parallel on another core.
``python bench/bench_token_stream.py`` measures what that buys (docs/benchmarks.md).

What it does not change:

- **the tokens**: the decoder is the same object making the same calls in the same order;
- **what a client sees**: each step's tokens, and what the decoder reported right after that step (its draft
  counts, the detail of a logprobs/constrained step, whether a constrained value is complete), are handed over
  together, so the engine reads them as of the last step it consumed, never as of a step computed ahead;
- **fairness**: at most ``ahead`` steps (default :data:`AHEAD`, ``serving.decode_ahead``) are computed before
  the loop has taken them (a slow client holds no worker: the producer parks and the consumer wakes it), and a
  producer gives its worker up after each step while another request waits for one, so requests beyond the
  pool's size still take turns per step.

The cost: when the output ends on a stop string (which only the loop can see) or the client goes away, up to
``ahead`` steps past that point were computed (on a swarm, by every hop, which signs for no more than the client
got: economy/peer_settlement.py) and are thrown away. EOS and ``max_tokens`` end the producer itself.
``ahead=0`` is the old lockstep (each step asked for by the loop once it has handled the last), kept for A/B
benchmarks and as a way back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from openhydra.router.abandon import abandon_when

log = logging.getLogger(__name__)

AHEAD = 2
"""Steps a producer may compute before the event loop has taken them: one in the loop's hands and one being
computed keep the worker busy; more would only be thrown away when the output ends on a stop string."""


@dataclass(frozen=True)
class Produced:
    """One step's tokens and the decoder's state right after it."""

    tokens: list[int]
    drafted: int = 0
    accepted: int = 0
    detail: Any = None
    """A DetailDecoder's TokenLogprob of this step (logprobs/constrained decoding), None otherwise."""
    ended: bool = False
    constraint_complete: bool | None = None


class ShutDown(RuntimeError):
    """The pool stopped while this request was running (the engine turns it into ShuttingDown)."""


class Waiting:
    """How many producers wait for a worker of one pool (a running producer yields its worker to them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n

    def any(self) -> bool:
        return self._count > 0


class TokenStream:
    """Runs ``decoder.next_tokens`` on ``executor`` back to back until the output ends or :meth:`finish`.

    ``ends(tokens)`` says whether a step's tokens end the output (an EOS the request does not ignore);
    an empty list always does. ``on_done`` runs on a worker after the last step (closing the session), once,
    unless the pool shut down.
    """

    def __init__(self, decoder: Any, executor: ThreadPoolExecutor, waiting: Waiting,
                 ends: Callable[[list[int]], bool], on_done: Callable[[], None], ahead: int = AHEAD) -> None:
        self._decoder = decoder
        self._limit = max(1, ahead)
        self._lockstep = ahead == 0  # the old way: the loop asks for each step once it has handled the last
        self._asked = 0  # lockstep: steps the loop asked for and the producer has not started
        self._executor = executor
        self._waiting = waiting
        self._ends = ends
        self._on_done = on_done
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Produced | BaseException] = asyncio.Queue()
        self._lock = threading.Lock()
        self._ahead = 0  # steps computed and not yet taken by the loop
        self._running = False  # a worker holds this producer (or it is queued for one)
        self._stopped = False  # finish() was called: compute nothing more
        self._over = False  # the output ended (or failed): compute nothing more
        self._done = False  # on_done ran (or was handed to a worker)

    # ---- the event loop's side --------------------------------------------------------------------

    def start(self) -> None:
        self._resume()  # in lockstep nothing is asked for yet: the first next() asks for the first step

    async def next(self) -> Produced:
        """The next step's tokens (an empty list when the output is over); raises what the step raised."""
        if self._lockstep:
            with self._lock:
                self._asked += 1
            self._resume()
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        with self._lock:
            self._ahead -= 1
        if not self._lockstep:
            self._resume()
        return item

    def _resume(self) -> None:
        with self._lock:
            if (self._running or self._stopped or self._over or self._ahead >= self._limit
                    or (self._lockstep and not self._asked)):
                return
            self._running = True
        self._submit()

    def finish(self) -> None:
        """Stop computing (the consumer is done); the session closes after the step in flight, if any."""
        with self._lock:
            self._stopped = True
            close_now = not self._running and not self._done
            self._done = self._done or close_now
        if close_now:
            try:
                self._executor.submit(self._on_done)
            except RuntimeError:  # the pool shut down (the node is stopping): nothing left to close
                log.debug("not closing a session: the decode pool shut down")

    def abort(self, exc: BaseException) -> None:
        """Stop computing and hand ``exc`` to the consumer (the node is stopping: its streams end with an error
        now instead of running on until the server's graceful-shutdown timeout cancels them)."""
        self.finish()
        self._post(exc)

    # ---- the worker's side ------------------------------------------------------------------------

    def _submit(self) -> None:
        self._waiting.add(1)
        try:
            future = self._executor.submit(self._run)
        except RuntimeError:  # the pool shut down
            self._waiting.add(-1)
            self._end_with(ShutDown("the decode pool shut down"))
            return
        future.add_done_callback(self._check_cancelled)

    def _check_cancelled(self, future: Future) -> None:
        if future.cancelled():  # shutdown(cancel_futures=True) dropped it before it ran
            self._waiting.add(-1)
            self._end_with(ShutDown("the decode pool shut down"))

    def _run(self) -> None:
        self._waiting.add(-1)
        steps = 0
        close: bool | None  # None: give the worker up and queue again
        while True:
            with self._lock:
                if self._stopped or self._over:  # the last step is done: close the session, once
                    self._running = False
                    close, self._done = not self._done, True
                    break
                if self._ahead >= self._limit or (self._lockstep and not self._asked):  # park; next() resumes us
                    self._running = False
                    return
                if steps and self._waiting.any():  # another request waits for a worker: take turns
                    close = None
                    break
                self._ahead += 1
                self._asked -= self._lockstep
            steps += 1
            try:
                item = self._step()
            except BaseException as exc:  # handed to the consumer, which raises it
                with self._lock:
                    self._over = True
                self._post(exc)
                continue
            if not item.tokens or self._ends(item.tokens):
                with self._lock:
                    self._over = True
            self._post(item)
        if close is None:
            self._submit()  # to the back of the pool's queue, behind the request that waits
        elif close:
            try:
                self._on_done()
            except Exception:
                log.exception("closing a session failed")

    def _step(self) -> Produced:
        d = self._decoder
        with abandon_when(lambda: self._stopped):  # a long prefill stops between chunks once finish() was called
            tokens = d.next_tokens()
        constraint = getattr(d, "constraint", None)
        return Produced(tokens=tokens, drafted=d.drafted, accepted=d.accepted,
                        detail=getattr(d, "last_detail", None), ended=getattr(d, "ended", False),
                        constraint_complete=constraint.complete if constraint is not None else None)

    def _post(self, item: Produced | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _end_with(self, exc: BaseException) -> None:
        with self._lock:
            self._over = True
            self._running = False
        self._post(exc)
