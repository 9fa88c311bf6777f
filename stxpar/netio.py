"""Blocking TCP helpers: framed reads with caps, connects with backoff. The only socket code
shared by the coordinators and the workers; OSError becomes ConnectError here."""

from __future__ import annotations

import errno
import os
import random
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConnectError, UsageError
from .wire import HEADER, FrameType, parse_header


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); UsageError otherwise."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise UsageError(f"bad address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise UsageError(f"bad address {text!r}: port must be 0-65535")
    return host, port


def keepalive(sock: socket.socket) -> None:
    """Short TCP keepalive: a peer that vanished without a FIN (a dead host, a black-holing
    middlebox) is noticed within about a minute instead of the kernel's default two hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": ``d = min(cap, initial * factor**n)``, delay_n =
    uniform(d/2, d).

    Half of every delay is certain, so a retry budget is a budget of time as well as of
    attempts: when every connect fails at once (the network is unreachable, nothing listens)
    the attempts are still spread out. (Full jitter, uniform(0, d), could spend a whole budget
    in a few seconds.) With the defaults and ``SendOptions.max_retries`` (9) the waits add up to
    at least 60.75 s and at most 121.5 s (``min_total`` / ``max_total``): the sender rides out
    a minute-long outage. The other half is random, so many senders cut off together do not
    come back in lockstep.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.initial * self.factor**attempt)

    def delay(self, attempt: int) -> float:
        d = self.ceiling(attempt)
        return random.uniform(d / 2, d)

    def min_total(self, retries: int) -> float:
        """The least time ``retries`` delays can add up to."""
        return sum(self.ceiling(n) / 2 for n in range(retries))

    def max_total(self, retries: int) -> float:
        return sum(self.ceiling(n) for n in range(retries))


#: RFC 8305's "Connection Attempt Delay": the next address is tried this long after the
#: previous attempt started, or at once when that one failed.
ATTEMPT_DELAY = 0.25

Address = tuple[int, tuple]


def listen_all(host: str, port: int) -> list[socket.socket]:
    """One listening socket per address ``host`` resolves to (``localhost`` is often both ::1
    and 127.0.0.1), all on one port (the first one's, when ``port`` is 0); UsageError with
    the reason when one cannot be had."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    addrs: list[tuple[int, tuple]] = []
    for info in infos:
        if info[0] in (socket.AF_INET, socket.AF_INET6) and (info[0], info[4]) not in addrs:
            addrs.append((info[0], info[4]))
    socks: list[socket.socket] = []
    chosen = port
    try:
        for family, addr in addrs:
            addr = (addr[0], chosen, *addr[2:])
            socks.append(_bind(host, port, family, addr, several=len(addrs) > 1))
            chosen = socks[0].getsockname()[1]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind(host: str, port: int, family: int, addr: tuple, *, several: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shown = f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
    named = f" ({shown}, one of the addresses {host} resolves to)" if several else ""
    try:
        if family == socket.AF_INET6 and several:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # :: beside 0.0.0.0
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"cannot listen on {host}:{port}{named}: address already in use"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port}{named}: {exc.strerror}") from None
    return sock


def resolve_all(host: str, port: int) -> list[Address]:
    """Every (family, sockaddr) ``host`` resolves to, without duplicates, in RFC 8305's order:
    getaddrinfo's first address, then alternating families (v6, v4, v6... when v6 came first)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    seen: set[tuple[int, tuple]] = set()
    ordered: list[Address] = []
    for family, _, _, _, addr in infos:
        if (family, addr) not in seen:
            seen.add((family, addr))
            ordered.append((family, addr))
    if not ordered:
        raise UsageError(f"cannot resolve host {host!r}: no address")
    return interleave(ordered)


def interleave(addrs: list[Address]) -> list[Address]:
    """RFC 8305 section 4: the first address's family first, then the other family's first,
    and so on alternating; each family keeps its own order."""
    if not addrs:
        return []
    first = [a for a in addrs if a[0] == addrs[0][0]]
    other = [a for a in addrs if a[0] != addrs[0][0]]
    out: list[Address] = []
    for k in range(max(len(first), len(other))):
        out.extend(x[k] for x in (first, other) if k < len(x))
    return out


def resolve(host: str, port: int) -> Address:
    """The first address of ``resolve_all`` (kept for callers that need only one)."""
    return resolve_all(host, port)[0]


def connect_first(
    addrs: list[Address], *, timeout: float, attempt_delay: float = ATTEMPT_DELAY
) -> socket.socket:
    """Happy eyeballs (RFC 8305 section 5): start a connect to the first address; start the
    next one ``attempt_delay`` later, or at once when every running attempt has failed; the
    first to connect wins and the others are closed. Each attempt has ``timeout`` seconds.

    A name that resolves to an address nobody serves (``::1`` first in /etc/hosts while the
    receiver listens on 127.0.0.1) or that black-holes costs ``attempt_delay``, not the whole
    connect. Returns a blocking socket with ``timeout`` set; raises OSError (the first
    address's error, with the others' added to its text) when every attempt failed.
    """
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}  # running attempt -> its own deadline
    errors: list[tuple[tuple, OSError]] = []
    queue = list(addrs)
    next_start = time.monotonic()
    try:
        while queue or pending:
            now = time.monotonic()
            if queue and (now >= next_start or not pending):
                family, addr = queue.pop(0)
                next_start = now + attempt_delay
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                except OSError as exc:  # e.g. no IPv6 on this host
                    errors.append((addr, exc))
                    continue
                sock.setblocking(False)
                try:
                    rc = sock.connect_ex(addr)
                except OSError as exc:
                    rc = exc.errno or errno.EINVAL
                if rc == 0:
                    return _won(sock, timeout)
                if rc not in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
                    sock.close()
                    errors.append((addr, OSError(rc, os.strerror(rc))))
                    next_start = now  # failed at once: the next address now
                    continue
                sel.register(sock, selectors.EVENT_WRITE, addr)
                pending[sock] = now + timeout
                continue
            wake = min(pending.values(), default=now)
            if queue:
                wake = min(wake, next_start)
            for key, _ in sel.select(max(0.0, wake - now)):
                sock = key.fileobj  # type: ignore[assignment]
                assert isinstance(sock, socket.socket)
                sel.unregister(sock)
                del pending[sock]
                rc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if rc == 0:
                    return _won(sock, timeout)
                sock.close()
                errors.append((key.data, OSError(rc, os.strerror(rc))))
                if not pending:
                    next_start = time.monotonic()
            now = time.monotonic()
            for sock, until in list(pending.items()):
                if now >= until:
                    errors.append((sel.get_key(sock).data, TimeoutError("timed out")))
                    sel.unregister(sock)
                    del pending[sock]
                    sock.close()
    finally:
        for sock in pending:
            sock.close()
        sel.close()
    raise _combined(errors)


def _won(sock: socket.socket, timeout: float) -> socket.socket:
    sock.setblocking(True)
    sock.settimeout(timeout)
    return sock


def _combined(errors: list[tuple[tuple, OSError]]) -> OSError:
    """One OSError for a race that every address lost: the reason when they agree, else each
    address with its reason."""
    if not errors:
        return OSError("no address to connect to")
    reasons = [_why(exc) for _, exc in errors]
    if len(set(reasons)) == 1:
        first = errors[0][1]
        return first if isinstance(first, TimeoutError) else OSError(first.errno, reasons[0])
    return OSError(
        errors[0][1].errno,
        "; ".join(f"{addr[0]}: {why}" for (addr, _), why in zip(errors, reasons, strict=True)),
    )


def connect(
    host: str,
    port: int,
    *,
    max_retries: int = 5,
    timeout: float = 10.0,
    backoff: Backoff = Backoff(),
    deadline: float | None = None,
    on_retry: Callable[[int, float, str], None] | None = None,
) -> socket.socket:
    """Connect with up to ``max_retries`` retries after the first attempt; ConnectError after.

    Each attempt tries every address ``host`` resolves to (``connect_first``); the winner gets
    TCP_NODELAY and short keepalive."""
    addrs = resolve_all(host, port)
    last = ""
    for attempt in range(max_retries + 1):
        try:
            sock = connect_first(addrs, timeout=timeout)
        except OSError as exc:
            last = _why(exc)
        else:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                keepalive(sock)
                return sock
            except OSError as exc:
                sock.close()
                last = _why(exc)
        if attempt == max_retries:
            break
        delay = backoff.delay(attempt)
        if deadline is not None and time.monotonic() + delay > deadline:
            break
        if on_retry is not None:
            on_retry(attempt + 1, delay, last)
        time.sleep(delay)
    tries = f" after {attempt + 1} attempts" if attempt else ""
    raise ConnectError(f"cannot connect to {host}:{port}{tries}: {last}")


class FramedSocket:
    """Frames over a blocking TCP socket. Caps are checked on the header before any payload
    is read; every socket failure becomes ConnectError."""

    def __init__(self, sock: socket.socket, *, peer: str = "peer") -> None:
        self.sock = sock
        self.peer = peer
        #: time.monotonic() by which every read must be done (None: only the socket timeout).
        #: A peer trickling one byte at a time cannot stretch a bounded phase past it.
        self.deadline: float | None = None
        self._hdr = bytearray(HEADER.size)

    def send(self, data: bytes | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ConnectError(f"connection to {self.peer} lost: {_why(exc)}") from None

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, or raise ConnectError."""
        got = 0
        n = len(view)
        try:
            while got < n:
                if self.deadline is not None:
                    left = self.deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    current = self.sock.gettimeout()
                    if current is None or current > left:
                        self.sock.settimeout(left)
                k = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
                if k == 0:
                    raise ConnectError(f"connection closed by {self.peer}")
                got += k
        except OSError as exc:
            raise ConnectError(f"connection to {self.peer} lost: {_why(exc)}") from None

    def recv_header(self, *, cap: Callable[[FrameType], int]) -> tuple[FrameType, int]:
        self.recv_into(memoryview(self._hdr))
        return parse_header(bytes(self._hdr), cap=cap)

    def recv_header_or_eof(
        self, *, cap: Callable[[FrameType], int]
    ) -> tuple[FrameType, int] | None:
        """Like ``recv_header`` but returns None when the peer closed cleanly between frames."""
        view = memoryview(self._hdr)
        try:
            k = self.sock.recv_into(view, len(view), socket.MSG_WAITALL)
        except OSError as exc:
            raise ConnectError(f"connection to {self.peer} lost: {_why(exc)}") from None
        if k == 0:
            return None
        if k < len(view):
            self.recv_into(view[k:])
        return parse_header(bytes(self._hdr), cap=cap)

    def recv_frame(self, *, cap: Callable[[FrameType], int]) -> tuple[FrameType, bytes]:
        ftype, length = self.recv_header(cap=cap)
        buf = bytearray(length)
        self.recv_into(memoryview(buf))
        return ftype, bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _why(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
