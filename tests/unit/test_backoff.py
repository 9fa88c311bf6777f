"""The reconnect schedule (issue 11: "retries spent in seconds").

When every connect fails at once (network unreachable, nothing listening) the sender's whole
retry budget used to go in about five seconds: full jitter, uniform(0, d), can draw waits near
zero. Now half of every wait is certain ("equal jitter"), and the default budget is sized so
that even the shortest possible schedule waits out a minute.

The schedule's extremes are computed from ``Backoff.delay`` itself: with ``random.uniform``
pinned to its lower (upper) end, the sum of the delays is the least (most) time the default
retries can wait.
"""

from __future__ import annotations

import random

import pytest

from stxpar import SendOptions
from stxpar.netio import Backoff


def _schedule(
    backoff: Backoff, retries: int, pick: str, monkeypatch: pytest.MonkeyPatch
) -> list[float]:
    with monkeypatch.context() as m:
        m.setattr(random, "uniform", (lambda a, b: a) if pick == "low" else (lambda a, b: b))
        return [backoff.delay(n) for n in range(retries)]


def test_default_budget_waits_out_a_minute_long_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = SendOptions()
    shortest = _schedule(opts.backoff, opts.max_retries, "low", monkeypatch)
    longest = _schedule(opts.backoff, opts.max_retries, "high", monkeypatch)
    assert sum(shortest) >= 60.0, f"the default retries can be spent in {sum(shortest):.1f} s"
    assert sum(longest) <= 150.0, f"the default retries can take {sum(longest):.1f} s"
    assert opts.backoff.min_total(opts.max_retries) == pytest.approx(sum(shortest))
    assert opts.backoff.max_total(opts.max_retries) == pytest.approx(sum(longest))


def test_every_wait_has_a_floor_and_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    b = Backoff()
    low = _schedule(b, 12, "low", monkeypatch)
    high = _schedule(b, 12, "high", monkeypatch)
    assert low[0] > 0, "the first retry can come at once"
    for n in range(12):
        assert low[n] == pytest.approx(high[n] / 2)
        assert high[n] <= b.cap
    assert high == sorted(high), "the ceiling must not shrink"
    assert high[-1] == b.cap


def test_waits_are_jittered() -> None:
    b = Backoff()
    draws = [b.delay(3) for _ in range(200)]
    d = b.ceiling(3)
    assert all(d / 2 <= x <= d for x in draws)
    assert max(draws) - min(draws) > d / 4, "no jitter: senders cut off together retry together"


def test_first_retry_is_still_quick() -> None:
    """A dropped connection mid-transfer is usually back at once: the first retry waits well
    under a second."""
    assert Backoff().ceiling(0) <= 0.5
