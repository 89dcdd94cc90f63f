"""Sliding-window limiter: 120/60 s per IP, headers, Retry-After, bounded memory; the client behind proxies."""

from __future__ import annotations

import pytest

from openhydra.api.ratelimit import SlidingWindowLimiter, TrustedProxies


class FakeClock:
    def __init__(self, mono: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.mono, self.wall = mono, wall

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall += s


def limiter(clock: FakeClock, **kw: int | float) -> SlidingWindowLimiter:
    return SlidingWindowLimiter(clock=lambda: clock.mono, wall_clock=lambda: clock.wall, **kw)  # type: ignore[arg-type]


def test_121st_request_refused_with_retry_after() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    for i in range(120):
        d = rl.hit("10.0.0.1")
        assert d.allowed and d.limit == 120 and d.remaining == 119 - i
        assert d.reset == 1_800_000_060  # the first request expires first
        clock.advance(0.125)
    d = rl.hit("10.0.0.1")
    assert not d.allowed and d.remaining == 0
    assert 0 < d.retry_after <= 60
    # the first request was at t=0, now t=15: it frees at t=60, i.e. in 45 s
    assert d.retry_after == 45 and d.reset == 1_800_000_060
    h = d.headers()
    assert h == {
        "X-RateLimit-Limit": "120",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(d.reset),
        "Retry-After": "45",
    }
    assert "Retry-After" not in rl.hit("10.0.0.2").headers()  # other clients are unaffected


def test_window_slides_and_refusals_do_not_count() -> None:
    clock = FakeClock()
    rl = limiter(clock, limit=3, window_s=10)
    for _ in range(3):
        assert rl.hit("a").allowed
        clock.advance(2)  # hits at t=0,2,4
    for _ in range(5):
        assert not rl.hit("a").allowed  # t=6, refused; not recorded
    clock.advance(4)  # t=10: the t=0 hit has expired
    d = rl.hit("a")
    assert d.allowed and d.remaining == 0
    assert not rl.hit("a").allowed
    clock.advance(2)  # t=12: t=2 expired
    assert rl.hit("a").allowed
    assert rl.peek("a") == 0
    clock.advance(30)
    assert rl.peek("a") == 3


def test_reset_is_epoch_seconds() -> None:
    clock = FakeClock(wall=1_800_000_000.4)
    rl = limiter(clock, limit=2, window_s=60)
    d = rl.hit("x")
    assert d.reset == 1_800_000_061  # ceil(wall + 60)
    assert d.headers()["X-RateLimit-Reset"] == "1800000061"


def test_memory_bounded_and_idle_clients_evicted() -> None:
    clock = FakeClock()
    rl = limiter(clock, limit=5, window_s=60, max_clients=100)
    for i in range(1000):
        rl.hit(f"198.51.100.{i}")
    assert len(rl) == 100
    assert rl.peek("198.51.100.999") == 4 and rl.peek("198.51.100.0") == 5  # oldest evicted
    clock.advance(61)
    rl.hit("203.0.113.7")
    assert len(rl) == 1  # everyone idle for a window is swept


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter(limit=0)
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/33"])


def test_forwarded_for_only_from_trusted_proxies() -> None:
    none = TrustedProxies()
    assert not none and none.client_ip("1.2.3.4", ["5.6.7.8"]) == "1.2.3.4"
    assert none.client_ip("", ["5.6.7.8"]) == "unknown"
    proxies = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])
    # an untrusted peer's header is ignored
    assert proxies.client_ip("192.0.2.1", ["5.6.7.8"]) == "192.0.2.1"
    # from a trusted peer: the rightmost entry that is not a trusted proxy; what the client wrote to its left is not
    assert proxies.client_ip("10.0.0.1", ["6.6.6.6, 5.6.7.8"]) == "5.6.7.8"
    assert proxies.client_ip("10.0.0.1", ["6.6.6.6, 5.6.7.8, 10.1.1.1"]) == "5.6.7.8"
    assert proxies.client_ip("10.0.0.1", ["6.6.6.6", "5.6.7.8, 10.1.1.1"]) == "5.6.7.8"  # several header lines
    assert proxies.client_ip("2001:db8::1", ["[2001:db8::2]:443, 5.6.7.8:1234"]) == "5.6.7.8"
    assert proxies.client_ip("::ffff:10.0.0.1", ["5.6.7.8"]) == "5.6.7.8"  # IPv4-mapped peer
    assert proxies.client_ip("10.0.0.1", ["2001:db9::7"]) == "2001:db9::7"
    # nothing but proxies: the leftmost; garbage: the last trusted hop (never a string the client chose)
    assert proxies.client_ip("10.0.0.1", ["10.2.2.2, 10.3.3.3"]) == "10.2.2.2"
    assert proxies.client_ip("10.0.0.1", ["6.6.6.6, not-an-ip, 10.3.3.3"]) == "10.3.3.3"
    assert proxies.client_ip("10.0.0.1", ["\udcff"]) == "10.0.0.1"
    assert proxies.client_ip("10.0.0.1", []) == "10.0.0.1"
    assert proxies.client_ip("10.0.0.1", [", ".join(["10.9.9.9"] * 10_000) + ", 5.6.7.8"]) == "5.6.7.8"
    assert proxies.trusts("10.255.0.1") and not proxies.trusts("11.0.0.1") and not proxies.trusts("junk")
