"""Background re-announcement: a peer refreshes its record every ``interval_s`` with a TTL.

``make_record(announced_at, ttl_s)`` builds a fresh record each round (current throughput, load,
and a new signature when the security layer signs records). A failed announce is retried sooner,
with exponential backoff capped at the interval; the loop never stops on errors, and every call
has a deadline. ``stop()`` cancels the loop and withdraws the record.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from openhydra.discovery.base import Discovery
from openhydra.discovery.records import PeerAnnouncement

logger = logging.getLogger(__name__)

RecordFactory = Callable[[float, float], PeerAnnouncement]  # (announced_at unix s, ttl_s) -> record


class Announcer:
    def __init__(
        self,
        discovery: Discovery,
        make_record: RecordFactory,
        *,
        interval_s: float | None = None,
        ttl_s: float | None = None,
        retry_s: float = 1.0,
        jitter: float = 0.1,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.discovery = discovery
        self.make_record = make_record
        self.interval_s = interval_s or discovery.announce_interval_s  # seconds between announcements
        self.ttl_s = ttl_s or discovery.ttl_s  # record lifetime, seconds
        if self.ttl_s <= self.interval_s:
            logger.warning(
                "ttl_s=%s <= interval_s=%s: records will lapse between announcements", self.ttl_s, self.interval_s
            )
        self.retry_s = retry_s  # first retry delay after a failure, seconds (doubles, capped at interval)
        self.jitter = jitter  # +- fraction of the interval, so a swarm does not announce in lockstep
        self._clock = clock
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self.announced = 0  # successful announcements
        self.failures = 0  # consecutive failures
        self.last_error: str | None = None
        self.last_record: PeerAnnouncement | None = None

    async def announce_once(self) -> PeerAnnouncement:
        record = self.make_record(self._clock(), self.ttl_s)
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancel that arrives as the call completes,
        # and the loop then kept announcing after stop() (a 60 s stop in the suite, until its caller gave up).
        async with asyncio.timeout(self.discovery.timeout_s * 2):
            await self.discovery.announce(record)
        self.last_record = record
        self.announced += 1
        return record

    def next_delay(self) -> float:
        if self.failures:
            return min(self.interval_s, self.retry_s * 2 ** (self.failures - 1))
        return self.interval_s * (1.0 + self._rng.uniform(-self.jitter, self.jitter))

    async def _run(self) -> None:
        while True:
            try:
                await self.announce_once()
                self.failures = 0
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("announce failed (%d in a row): %s", self.failures, self.last_error)
            await asyncio.sleep(self.next_delay())

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="openhydra-announcer")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, withdraw: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            await _cancel(task)
        if withdraw and self.last_record is not None:
            try:
                await asyncio.wait_for(self.discovery.withdraw(self.last_record.peer_id), self.discovery.timeout_s * 2)
            except Exception as exc:  # the record expires by itself anyway
                logger.warning("withdraw failed: %s", exc)


async def _cancel(task: asyncio.Task, patience_s: float = 1.0) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again each ``patience_s`` in case a cancel was lost
    (swallowed by code under it). A cancel of the caller itself is not swallowed: it propagates."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=patience_s)
        if not task.done():
            logger.warning("the announce loop did not end %.1f s after a cancel: cancelling again", patience_s)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("the announce loop had failed: %r", task.exception())

