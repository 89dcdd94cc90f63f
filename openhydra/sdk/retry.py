"""Retries with exponential backoff on 429 and 503 that honour ``Retry-After`` (bounded).

A 429 (rate limit) or 503 (no chain yet, model loading, ledger busy) means the node did no work, so
any request may be sent again. The wait is the server's ``Retry-After`` when it gives one (seconds or
an HTTP date), else ``backoff_base_s * 2**(n-1)`` with jitter, capped at ``backoff_max_s``. A
``Retry-After`` longer than ``max_wait_s`` is not waited for: the typed error is raised at once.
Connection failures (nothing reached the node) are retried the same way.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # attempts in all, the first included (1 = no retries)
    backoff_base_s: float = 0.5  # first backoff without Retry-After, s
    backoff_max_s: float = 20.0  # cap of one backoff without Retry-After, s
    max_wait_s: float = 60.0  # the longest Retry-After honoured; longer: give up at once, s
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.max_wait_s < 0:
            raise ValueError("backoff_base_s, backoff_max_s and max_wait_s must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Wait after failed attempt number ``attempt`` (1-based) when the server named none."""
        base = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)

    def wait_for(self, attempt: int, retry_after: str | None) -> float | None:
        """Seconds to wait before the next attempt, or None to stop retrying."""
        if attempt >= self.max_attempts:
            return None
        server = parse_retry_after(retry_after)
        if server is None:
            return self.backoff(attempt)
        return server if server <= self.max_wait_s else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))
