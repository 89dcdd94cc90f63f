"""Sliding-window rate limiting per client IP (SPEC.md "API": 120 requests per 60-second window).

Every response carries ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset``
(epoch seconds, when the next slot frees up; the headers of the IETF httpapi RateLimit draft's
predecessors, as GitHub and Cloudflare send them); a refused request gets 429 with ``Retry-After``
(RFC 9110 §10.2.3, whole seconds).

The window is an exact sliding log: a client is allowed if fewer than ``limit`` of *its accepted*
requests fall within the last ``window_s`` seconds (refused requests are not counted, so a client
that backs off as told recovers on time). Memory is bounded: at most ``limit`` timestamps per
client, clients with nothing in the window are swept out, and beyond ``max_clients`` the least
recently seen client is evicted (it then gets a fresh window; a flood of spoofed sources cannot grow
memory). Pure and synchronous: the app wires :meth:`SlidingWindowLimiter.hit` into middleware.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_LIMIT = 120
DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_CLIENTS = 10_000


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    allowed: bool
    limit: int
    remaining: int
    reset: int
    """Epoch seconds at which at least one more request will be allowed."""
    retry_after: int
    """Whole seconds to wait before retrying; 0 when allowed."""

    def headers(self) -> dict[str, str]:
        out = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


class SlidingWindowLimiter:
    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        window_s: float = DEFAULT_WINDOW_S,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if limit < 1 or window_s <= 0 or max_clients < 1:
            raise ValueError(f"limit ({limit}), window_s ({window_s}) and max_clients ({max_clients}) must be positive")
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._wall = wall_clock
        self._clients: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def __len__(self) -> int:
        return len(self._clients)

    def hit(self, client: str) -> RateLimitDecision:
        """Count one request from ``client`` (an IP) and say whether it may proceed."""
        with self._lock:
            now = self._clock()
            self._maybe_sweep(now)
            log = self._clients.get(client)
            if log is None:
                log = deque()
                self._clients[client] = log
                while len(self._clients) > self.max_clients:
                    self._clients.popitem(last=False)
            else:
                self._clients.move_to_end(client)
            cutoff = now - self.window_s
            while log and log[0] <= cutoff:
                log.popleft()
            allowed = len(log) < self.limit
            if allowed:
                log.append(now)
            # the oldest request in the window is the next to expire and free a slot
            frees_at = log[0] + self.window_s if log else now
            wait = max(0.0, frees_at - now)
            return RateLimitDecision(
                allowed=allowed,
                limit=self.limit,
                remaining=self.limit - len(log),
                reset=math.ceil(self._wall() + wait),
                retry_after=0 if allowed else max(1, math.ceil(wait)),
            )

    def peek(self, client: str) -> int:
        """Requests ``client`` has left in the current window, without counting one."""
        with self._lock:
            log = self._clients.get(client)
            if not log:
                return self.limit
            cutoff = self._clock() - self.window_s
            return self.limit - sum(1 for t in log if t > cutoff)

    def _maybe_sweep(self, now: float) -> None:
        """Drop clients idle for a whole window; amortized, at most once per window."""
        if now - self._last_sweep < self.window_s:
            return
        self._last_sweep = now
        cutoff = now - self.window_s
        for key in [k for k, log in self._clients.items() if not log or log[-1] <= cutoff]:
            del self._clients[key]


def client_ip(remote_addr: str, forwarded_for: str | None = None, trust_proxy: bool = False) -> str:
    """The key to limit on: the socket peer, or the first ``X-Forwarded-For`` hop only when the
    operator says a trusted proxy sits in front (otherwise clients could pick their own key)."""
    if trust_proxy and forwarded_for:
        first = forwarded_for.split(",", 1)[0].strip()
        if first:
            return first
    return remote_addr or "unknown"
