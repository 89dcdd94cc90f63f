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

The key is the client's IP as :class:`TrustedProxies` sees it: the socket peer, or, behind a configured
reverse proxy, the rightmost ``X-Forwarded-For`` address that is not one of the proxies.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

DEFAULT_LIMIT = 120
DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_CLIENTS = 10_000

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


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


MAX_FORWARDED_HOPS = 32
"""X-Forwarded-For entries looked at (from the right); a real chain of proxies is a handful."""


def _address(hop: str) -> IPAddress | None:
    """An X-Forwarded-For entry as an address: ``1.2.3.4``, ``1.2.3.4:567``, ``2001:db8::1``, ``[2001:db8::1]:80``."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return ip_address(hop)
    except ValueError:
        return None


class TrustedProxies:
    """Who the client is when reverse proxies sit in front (``api.trusted_proxies``, a list of CIDRs).

    ``X-Forwarded-For`` is honoured only when the direct peer is a trusted proxy; then the entries are read
    from the right (each proxy appends the address it saw) and the first one that is *not* a trusted proxy
    is the client. Entries to its left were written by the client itself and are ignored, so a client cannot
    pick its own rate-limit key. With no trusted proxies the socket peer is always the client.
    """

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self.networks: list[IPNetwork] = [ip_network(c.strip(), strict=False) for c in cidrs]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str | IPAddress) -> bool:
        if not self.networks:
            return False
        if isinstance(address, str):
            parsed = _address(address)
            if parsed is None:
                return False
            address = parsed
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks)

    def client_ip(self, peer: str, forwarded_for: Iterable[str] = ()) -> str:
        """The address to key limits on, from the socket ``peer`` and every ``X-Forwarded-For`` header value."""
        if not peer:
            return "unknown"
        if not self.trusts(peer):
            return peer
        hops = [hop for value in forwarded_for for hop in value.split(",")][-MAX_FORWARDED_HOPS:]
        client = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:  # garbage from beyond the trusted chain: the last trusted hop is all we know
                break
            client = str(address)
            if not self.trusts(address):
                break
        return client
