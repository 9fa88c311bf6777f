"""A token bucket for ``stx recv --limit-rate``: how long to wait before taking in more bytes.

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

#: Bytes read at a time under a limit: a smaller slice smooths the flow, a larger one costs
#: fewer wake-ups.
SLICE = 256 << 10
#: Seconds of credit a bucket may hold: a stream idle for a moment may catch up this much.
BURST_S = 0.05


class TokenBucket:
    """``rate`` bytes a second (0: no limit), shared by threads."""

    def __init__(self, rate: int = 0) -> None:
        self._lock = threading.Lock()
        self.rate = rate
        self._tokens = 0.0
        self._at: float | None = None

    def set_rate(self, rate: int) -> None:
        with self._lock:
            self.rate = max(0, rate)

    def charge(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth now; the seconds to wait before reading them (0: at once).
        Credit can go negative: the next caller then waits for what this one took."""
        with self._lock:
            rate = self.rate
            if not rate:
                self._at = None
                return 0.0
            if self._at is None:
                self._at, self._tokens = now, 0.0
            cap = max(float(SLICE), rate * BURST_S)
            self._tokens = min(cap, self._tokens + (now - self._at) * rate)
            self._at = now
            self._tokens -= n
            return 0.0 if self._tokens >= 0 else -self._tokens / rate
