"""Stop a step's long work once nobody waits for its result: a client that went away during a prefill.

A request's steps run on a worker thread (router/token_stream.py). Its first step is the whole prompt's prefill,
chunk after chunk, which on a CPU node can take a minute for a long prompt; before this module a client that
disconnected meanwhile left the worker computing every remaining chunk (the session closed only after the step).

The producer runs each step inside :func:`abandon_when` with a test of its own stop flag. Code that does long work
for the step on that thread asks :func:`check` between pieces (the local pipeline between prefill chunks), or waits
with :func:`wait` (the swarm's coordinator waiting for its peers): both raise :class:`Abandoned` once the flag is
set, and the producer then closes the session as after any last step. Outside such a scope both do nothing, so
every other caller of a pipeline is unaffected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.05
"""How often :func:`wait` looks at the stop flag: what a disconnect may cost in extra waiting, nothing more."""

_scope = threading.local()


class Abandoned(Exception):
    """The step's consumer went away; the step stopped between pieces of its work."""


@contextmanager
def abandon_when(stopped: Callable[[], bool]) -> Iterator[None]:
    """Run a step on this thread that :func:`check` and :func:`wait` stop once ``stopped()`` is true."""
    outer = getattr(_scope, "stopped", None)
    _scope.stopped = stopped
    try:
        yield
    finally:
        _scope.stopped = outer


def abandoned() -> bool:
    stopped = getattr(_scope, "stopped", None)
    return stopped is not None and stopped()


def check() -> None:
    """Raise :class:`Abandoned` if this thread's step is no longer wanted."""
    if abandoned():
        raise Abandoned("the client went away; the step stopped")


def wait(future: Future[T], timeout: float | None) -> T:
    """``future.result(timeout)``, but cancel the future and raise :class:`Abandoned` once the step is unwanted."""
    if getattr(_scope, "stopped", None) is None:
        return future.result(timeout=timeout)
    waited = 0.0
    while True:
        piece = POLL_S if timeout is None else min(POLL_S, max(timeout - waited, 0.0))
        try:
            return future.result(timeout=piece)
        except TimeoutError:
            if future.done():  # it finished as the poll ran out, or the work itself raised TimeoutError
                return future.result()
            waited += piece
            if abandoned():
                future.cancel()
                raise Abandoned("the client went away; the step stopped") from None
            if timeout is not None and waited >= timeout:
                raise
