"""Wait for a condition, not for the clock: polling helpers for tests and benches.

A fixed ``sleep(1.5)`` is either too long on a quiet machine or too short on a loaded one (CI at
load average 10 on 2 cores). These helpers poll a predicate until it holds, up to a generous
deadline, and fail with an AssertionError that names what was awaited and the last value seen.

    wait_until(lambda: node.metrics()["peers"] == 2, timeout_s=30, what="both peers in /metrics")
    records = await async_wait_until(lambda: lookup_when_three(), timeout_s=30, what="3 records")

The predicate's return value is handed back when it is truthy, so a test can assert on exactly
the state that satisfied the wait (no second read that may already differ). Exceptions raised by
the predicate count as "not yet" only when they are instances of ``ignore`` (default: none), so
a real bug still fails the test at once; the last ignored one is shown in the timeout message.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0  # generous on purpose: a condition that holds returns at the first poll that sees it
DEFAULT_INTERVAL_S = 0.05


def _describe(what: str, timeout_s: float, polls: int, last: object, error: BaseException | None) -> str:
    seen = f"last error {type(error).__name__}: {error}" if error is not None else f"last value {last!r}"
    text = f"timed out after {timeout_s:g} s ({polls} polls) waiting for {what}; {seen}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    what: str = "condition",
    *,
    ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` every ``interval_s`` until it returns a truthy value; return that value.

    Raises AssertionError naming ``what`` when ``timeout_s`` (monotonic) passes first. The
    predicate is always tried at least once, and once more at the deadline.
    """
    if timeout_s <= 0 or interval_s <= 0:
        raise ValueError(f"timeout_s and interval_s must be > 0, got {timeout_s}, {interval_s}")
    deadline = time.monotonic() + timeout_s
    polls, last, error = 0, None, None
    while True:
        expired = time.monotonic() >= deadline
        polls += 1
        try:
            last, error = predicate(), None
        except ignore as exc:
            last, error = None, exc
        if last:
            return last
        if expired:
            raise AssertionError(_describe(what, timeout_s, polls, last, error))
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


async def async_wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    what: str = "condition",
    *,
    ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> T:
    """:func:`wait_until` for event-loop code: ``predicate`` may be sync or return an awaitable.

    Sleeps with ``asyncio.sleep`` so background tasks (announcers, servers) keep running.
    """
    if timeout_s <= 0 or interval_s <= 0:
        raise ValueError(f"timeout_s and interval_s must be > 0, got {timeout_s}, {interval_s}")
    deadline = time.monotonic() + timeout_s
    polls, last, error = 0, None, None
    while True:
        expired = time.monotonic() >= deadline
        polls += 1
        try:
            value = predicate()
            last, error = (await value) if inspect.isawaitable(value) else value, None
        except ignore as exc:
            last, error = None, exc
        if last:
            return last  # type: ignore[return-value]
        if expired:
            raise AssertionError(_describe(what, timeout_s, polls, last, error))
        await asyncio.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
