"""Pacing for ``stx recv --limit-rate``: how long to wait before taking in more bytes.

Pure: the clock is passed in, and ``charge`` says how long to wait instead of waiting. A
receiver worker holds one bucket for all its streams (each stream thread charges the bytes it is
about to read, in slices of ``SLICE`` bytes, and sleeps as told), and its coordinator sets its
rate: its share of the limit, by its share of the open streams (``recvpool.pace_shares``).
Reading at that pace keeps the TCP receive windows small, so the senders are held back by TCP's
flow control rather than by loss. (The sending side needs no bucket: the kernel paces each
socket, ``SO_MAX_PACING_RATE``.)
"""

from __future__ import annotations

import threading

from .limits import TokenBucket

#: Bytes read at a time under a limit: a smaller slice smooths the flow, a larger one costs
#: fewer wake-ups.
SLICE = 256 << 10
#: Seconds of credit a bucket may hold: a stream idle for a moment may catch up this much.
BURST_S = 0.05


class Pacer:
    """``rate`` bytes a second (0: no limit), shared by threads: a ``limits.TokenBucket`` of
    bytes whose credit may go negative (a read is never refused, only delayed), starting with
    none."""

    def __init__(self, rate: int = 0) -> None:
        self._lock = threading.Lock()
        self._bucket: TokenBucket | None = None
        self.rate = 0
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        with self._lock:
            self.rate = max(0, rate)
            if not self.rate:
                self._bucket = None
            elif self._bucket is not None:
                self._bucket.rate = self.rate
                self._bucket.burst = _burst(self.rate)

    def charge(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth now; the seconds to wait before reading them (0: at once).
        Credit can go negative: the next caller then waits for what this one took."""
        with self._lock:
            rate = self.rate
            if not rate:
                return 0.0
            bucket = self._bucket
            if bucket is None:
                bucket = self._bucket = TokenBucket(rate=rate, burst=_burst(rate), now=now)
                bucket.tokens = 0.0
            else:
                bucket.full(now)  # (refills)
            bucket.tokens -= n
            return 0.0 if bucket.tokens >= 0 else -bucket.tokens / rate


def _burst(rate: int) -> float:
    return max(float(SLICE), rate * BURST_S)
