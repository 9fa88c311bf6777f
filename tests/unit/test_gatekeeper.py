"""The gatekeeper's small parts, in memory: token buckets, the log limiter, what per-address
limits count by, what a refused peer is told, and descriptor headroom."""

from __future__ import annotations

import os
import resource

import pytest

from stxpar.errors import AuthError, ConnectError, ProtocolError
from stxpar.gatekeeper import FdBudget, LogLimiter, TokenBucket, error_text, source_key
from stxpar.handshake import ClockSkewError


def test_token_bucket_bursts_then_refills() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0, now=100.0)
    assert [bucket.take(now=100.0) for _ in range(5)] == [True] * 4 + [False]
    assert not bucket.ready(now=100.4)
    assert bucket.ready(now=100.5)  # one token after 0.5 s at 2/s
    assert bucket.take(now=100.5) and not bucket.take(now=100.5)
    assert bucket.full(now=110.0)  # never above the burst
    assert [bucket.take(now=110.0) for _ in range(5)] == [True] * 4 + [False]


def test_ready_spends_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, now=0.0)
    for _ in range(10):
        assert bucket.ready(now=0.0)
    assert bucket.take(now=0.0) and not bucket.ready(now=0.0)


def test_log_limiter_counts_what_it_holds_back() -> None:
    limiter = LogLimiter(rate=1.0, burst=3.0, every=0.0)
    allowed = [limiter.allow() for _ in range(1000)]
    assert sum(allowed) <= 4  # the burst (and perhaps a refill)
    line = limiter.flush()
    assert line is not None and line.startswith(f"{1000 - sum(allowed)} more similar lines")
    assert limiter.flush() is None  # counted once


def test_log_limiter_summarises_at_most_every_interval() -> None:
    limiter = LogLimiter(rate=0.001, burst=1.0, every=60.0)
    assert limiter.allow()
    assert not limiter.allow()
    assert limiter.flush() is None  # not yet: one summary a minute at most
    assert limiter.flush(force=True) == "1 more similar lines suppressed in the last 0 s"


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not an address", "not an address"),
    ],
)
def test_source_key(ip: str, key: str) -> None:
    assert source_key(ip) == key


def test_only_clock_skew_keeps_its_words_before_authentication() -> None:
    skew = ClockSkewError(skew_ms=-400_000, window_ms=300_000)
    assert error_text(skew, generic=True) == (
        "clock skew: the sender's clock differs from the receiver's by 400 s (behind);"
        " allowed ±300 s (the receiver's --clock-window)"
    )
    assert isinstance(skew, AuthError) and skew.exit_code == 3
    for exc in (AuthError("replayed handshake"), ProtocolError("unexpected INIT")):
        assert error_text(exc, generic=True) == "authentication failed"
        assert error_text(exc, generic=False) == str(exc)
    busy = ConnectError("receiver busy: too many handshakes; try again shortly")
    assert error_text(busy, generic=True) == str(busy)


def test_fd_budget_keeps_a_reserve() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = FdBudget(reserve=8, refresh=0.0)
    assert budget.ok()
    opened = FdBudget.open_count()
    assert opened > 0
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 12, hard))
        assert budget.ok()  # 12 free, 8 kept
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
        assert not budget.ok()  # 7 free: into the reserve
        os.close(held.pop())
        os.close(held.pop())
        assert budget.ok()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fd_budget_default_reserve_fits_small_limits() -> None:
    budget = FdBudget()
    assert budget.reserve(40) == 10
    assert budget.reserve(1024) == 32
    assert budget.reserve(8) == 4
