"""The receiver's limits before authentication, as plain values and clock-driven counters.

Theory of operation
-------------------
The gatekeeper (``gatekeeper.py``) owns the sockets and the one selector loop; what it decides
with lives here, apart from any I/O: the limits themselves (``GateLimits``), token buckets for
handshake rates (``TokenBucket``: the clock is passed in, or read from ``time.monotonic``), the
key per-address limits count by (``source_key``: an IPv4 address, an IPv6 /64), the
descriptor headroom (``FdBudget``: it reads ``/proc/self/fd`` and ``RLIMIT_NOFILE``, nothing
else), what a refused peer is told (``error_text``) and the log-flood guard a log writer uses
(``LogLimiter``), the handshake rate limits (``HandshakeRates``) and the book of pending
connections with its eviction rule (``Pending``).

None of these objects locks: each belongs to one thread (the gatekeeper's loop), or its user
serialises the calls (``gatekeeper.LogLimiter`` is the locked one the CLI's event writer uses).
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import AuthError, ProtocolError, StxError, VersionError
from .handshake import ClockSkewError


@dataclass(frozen=True)
class GateLimits:
    """Pre-authentication limits (one object, validated by the receiver that builds it)."""

    #: Seconds from accept until the connection must have authenticated.
    handshake_timeout: float = 10.0
    #: Connections that have not authenticated yet, in total and per source address.
    max_pending: int = 256
    max_pending_per_ip: int = 32
    #: Handshakes started (INIT) per second, in total and per source address; bursts of twice.
    handshakes_per_s: float = 50.0
    handshakes_per_ip_per_s: float = 25.0
    #: Descriptors kept free below RLIMIT_NOFILE (None: a quarter of a small limit, at most 32).
    fd_reserve: int | None = None


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take`` spends one if there is one."""

    def __init__(self, *, rate: float, burst: float, now: float | None = None) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic() if now is None else now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float | None = None) -> bool:
        self._refill(time.monotonic() if now is None else now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def ready(self, now: float | None = None) -> bool:
        """Whether ``take`` would succeed now (nothing is spent)."""
        self._refill(time.monotonic() if now is None else now)
        return self.tokens >= 1

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class LogLimiter:
    """Keeps a flood of log lines to ``rate`` a second (bursts of ``burst``). What is held back
    is counted; ``flush`` returns one summary line for it, at most once every ``every`` s."""

    def __init__(self, *, rate: float = 5.0, burst: float = 10.0, every: float = 1.0) -> None:
        self._bucket = TokenBucket(rate=rate, burst=burst)
        self._every = every
        self._held = 0
        self._since = 0.0

    def allow(self) -> bool:
        """Whether one more line may be written now (else it is counted as suppressed)."""
        if self._bucket.take():
            return True
        if not self._held:
            self._since = time.monotonic()
        self._held += 1
        return False

    def flush(self, *, force: bool = False) -> str | None:
        """The summary of what was suppressed, once ``every`` s passed since the first of it."""
        if not self._held:
            return None
        took = time.monotonic() - self._since
        if took < self._every and not force:
            return None
        held, self._held = self._held, 0
        return f"{held} more similar lines suppressed in the last {took:.0f} s"


def source_key(ip: str) -> str:
    """What per-address limits count by: the IPv4 address (also when IPv4-mapped), or the
    IPv6 /64 (one host usually holds a whole /64)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class FdBudget:
    """Whether the process may take one more descriptor and still keep ``reserve`` free below
    its soft ``RLIMIT_NOFILE``. Counting ``/proc/self/fd`` costs a directory read, so the count
    is refreshed at most every ``refresh`` s, or when the estimate (the last count plus every
    descriptor taken since) comes near the limit."""

    def __init__(self, reserve: int | None = None, *, refresh: float = 0.25) -> None:
        self._reserve = reserve
        self._refresh = refresh
        self._count = 0
        self._taken = 0
        self._stamp = -1e9
        self._limit = -1

    @staticmethod
    def soft_limit() -> int:
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return -1
        return -1 if soft == resource.RLIM_INFINITY else int(soft)

    @staticmethod
    def open_count() -> int:
        try:
            return len(os.listdir("/proc/self/fd")) - 1  # less the directory's own
        except OSError:
            return -1

    def reserve(self, limit: int) -> int:
        return self._reserve if self._reserve is not None else max(4, min(32, limit // 4))

    def took(self, n: int = 1) -> None:
        self._taken += n

    def ok(self) -> bool:
        now = time.monotonic()
        if now - self._stamp > self._refresh or (
            self._limit > 0 and self._count + self._taken + self.reserve(self._limit) >= self._limit
        ):
            self._limit, self._count = self.soft_limit(), self.open_count()
            self._taken, self._stamp = 0, now
        if self._limit <= 0 or self._count < 0:
            return True  # no limit, or no way to count: nothing to check against
        return self._count + self._taken + self.reserve(self._limit) < self._limit


def error_text(exc: StxError, *, generic: bool) -> str:
    """What the peer is told: before authentication, one text for every authentication and
    protocol failure, so a guesser learns nothing; the clock-skew error is raised only after the
    key was proven, so its own text leaks nothing, and a version mismatch says nothing of the
    key (an old peer must learn why it is refused)."""
    if (
        generic
        and isinstance(exc, AuthError | ProtocolError)
        and not isinstance(exc, ClockSkewError | VersionError)
    ):
        return "authentication failed"
    return str(exc)


class HandshakeRates:
    """Handshakes started (INIT), limited globally and per source key: token buckets of
    ``per_s`` and ``per_key_per_s``, bursts of twice as many. At most ``max_keys`` addresses
    are remembered (the least recent go first); ``prune`` forgets those that are quiet again."""

    def __init__(
        self, *, per_s: float, per_key_per_s: float, max_keys: int = 65536, now: float | None = None
    ) -> None:
        self._global = TokenBucket(rate=per_s, burst=max(1.0, 2 * per_s), now=now)
        self._per_key_per_s = per_key_per_s
        self._max_keys = max_keys
        self._per_key: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> bool:
        """Spend a token of either bucket only when both have one: a refusal for lack of the
        global token must not cost this address its own."""
        bucket = self._per_key.get(key)
        if bucket is None:
            rate = self._per_key_per_s
            bucket = self._per_key[key] = TokenBucket(rate=rate, burst=max(1.0, 2 * rate), now=now)
        self._per_key.move_to_end(key)
        while len(self._per_key) > self._max_keys:
            self._per_key.popitem(last=False)
        return bucket.ready(now) and self._global.take(now) and bucket.take(now)

    def prune(self, now: float) -> None:
        """Forget the buckets of addresses that are quiet again (they would be full anyway)."""
        while self._per_key:
            key, bucket = next(iter(self._per_key.items()))
            if not bucket.full(now):
                return
            del self._per_key[key]

    def __len__(self) -> int:
        return len(self._per_key)


C = TypeVar("C", bound=Hashable)


class Pending(Generic[C]):
    """Connections that have not authenticated yet, in arrival order (which is deadline
    order), and grouped by source key."""

    def __init__(self) -> None:
        self._all: OrderedDict[C, str] = OrderedDict()
        self._by_key: dict[str, OrderedDict[C, None]] = {}

    def add(self, conn: C, key: str) -> None:
        self._all[conn] = key
        self._by_key.setdefault(key, OrderedDict())[conn] = None

    def remove(self, conn: C) -> bool:
        """Whether ``conn`` was pending (it is not now)."""
        key = self._all.pop(conn, None)
        if key is None:
            return False
        mine = self._by_key[key]
        del mine[conn]
        if not mine:
            del self._by_key[key]
        return True

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[C]:
        return iter(self._all)

    def oldest(self) -> C | None:
        return next(iter(self._all), None)

    def count(self, key: str) -> int:
        return len(self._by_key.get(key, ()))

    def victim(self, spoke: Callable[[C], bool], key: str | None = None) -> C | None:
        """Whom to evict for a newcomer (of ``key``'s address, or of anyone): the oldest that
        has not sent one whole frame yet (an idle or trickling connection), else the oldest.
        Idle connections cannot hold the door shut, and an honest sender, which speaks at
        once, is not the one evicted."""
        among = self._all if key is None else self._by_key.get(key, OrderedDict())
        for conn in among:
            if not spoke(conn):
                return conn
        return next(iter(among), None)
