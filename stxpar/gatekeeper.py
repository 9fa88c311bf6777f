"""The receiver's gatekeeper: its listening sockets and every connection until it authenticated.

Theory of operation
-------------------
One thread runs one selector loop over every listening socket and every connection that has not
proven the key yet. Nothing an unauthenticated peer does gets a thread, a process or a disk
file: a connection costs a descriptor and a small record here until it either

* sends a JOIN whose proof verifies (one HMAC): the socket goes to ``on_join`` (the receiver
  hands it to a worker), or
* completes the handshake (its CLIENT_AUTH MAC verified before any X25519 work): the socket and
  the session keys go to ``on_control``, which starts the one thread of that transfer. The last
  handshake frame (KEY_CONFIRMATION) is sent by that thread, so a receiver that cannot start one
  still answers with a plain, retryable "receiver busy" instead of a session it cannot serve.

Frames are read with exact-length non-blocking reads (never beyond the frame), so the socket is
handed on with nothing of the peer's next frame consumed.

Limits, all before authentication:

* a deadline per connection (``handshake_timeout``, from accept until handed on);
* a cap on pending connections in total and per source address (IPv6 per /64). When a cap is
  reached the new connection is admitted and an older one of that address (per-address cap) or
  of anyone (total cap) is evicted: first the oldest that has not yet sent one whole frame (an
  idle or trickling connection), else the oldest. Idle connections cannot hold the door shut,
  and an honest sender, which speaks at once, is not the one evicted;
* handshakes (INIT) are rate-limited per source address and globally (token buckets): one
  address flooding INITs cannot use up what other addresses get;
* descriptor headroom: a connection is accepted and handed on only while the process keeps a
  reserve of descriptors below ``RLIMIT_NOFILE`` (libzmq aborts the process when it runs out).
  Short of it, a pending connection is evicted for the new one as above; with none to evict,
  the new one is refused with a retryable "receiver busy" ERROR.

Every refusal is reported as an event ("rejected", "dropped"); ``LogLimiter`` is what a log
writer uses to keep a flood of them to a few lines a second plus a count.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from . import keyschedule as ks
from .errors import ConnectError, ProtocolError, StxError, VersionError
from .handshake import ReplayCache, ServerHandshake, handshake_cap, now_ms
from .limits import FdBudget as FdBudget
from .limits import GateLimits as GateLimits
from .limits import HandshakeRates, Pending
from .limits import LogLimiter as _LogLimiter
from .limits import TokenBucket as TokenBucket
from .limits import error_text as error_text
from .limits import source_key as source_key
from .netio import FramedSocket, keepalive
from .wire import (
    HEADER,
    MAX_HANDSHAKE_PAYLOAD,
    ErrorMsg,
    FrameType,
    Init,
    encode_frame,
    parse_header,
)

#: The retryable refusals (wire code 4: the sender backs off and tries again).
BUSY_HANDSHAKES = "receiver busy: too many handshakes; try again shortly"
BUSY_DESCRIPTORS = "receiver busy: out of file descriptors; try again shortly"

#: on_event(kind, fields), as the receiver's.
EventFn = Callable[[str, dict[str, Any]], None]
#: on_join(fs, join_payload, release): verify and hand on a data stream, or raise StxError.
JoinFn = Callable[[FramedSocket, bytes, Callable[[], None]], None]
#: on_control(fs, session, peer, frames): start serving an authenticated control connection
#: (``frames``, the handshake's last, are to be sent first), or raise StxError.
ControlFn = Callable[[FramedSocket, ks.SessionKeys, tuple, list[bytes]], None]


def error_frame(exc: StxError, *, generic: bool) -> bytes:
    return encode_frame(
        FrameType.ERROR, ErrorMsg(exc.wire_code, error_text(exc, generic=generic)).encode()
    )


def hand_over(fs: FramedSocket, hand: Callable[[socket.socket], None]) -> None:
    """Give an authenticated data stream's socket to a worker (``hand``); when none takes it
    (ConnectError: busy), tell the sender why, so that it retries the stream, and re-raise."""
    fs.sock.settimeout(None)
    try:
        hand(fs.sock)
    except ConnectError as exc:
        fs.sock.settimeout(1.0)
        with contextlib.suppress(StxError):
            fs.send(error_frame(exc, generic=False))
        raise


def first_cap(ftype: FrameType) -> int:
    """The first frame of a connection is INIT or JOIN, both small."""
    return MAX_HANDSHAKE_PAYLOAD if ftype in (FrameType.INIT, FrameType.JOIN) else -1


class _Conn:
    """One pending connection: its socket, its deadline and its partial frame."""

    __slots__ = (
        "sock",
        "peer",
        "key",
        "deadline",
        "buf",
        "want",
        "ftype",
        "hs",
        "spoke",
        "greeted",
    )

    def __init__(self, sock: socket.socket, peer: tuple, key: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.key = key
        self.deadline = deadline
        self.buf = bytearray()
        self.want = HEADER.size
        self.ftype: FrameType | None = None  # set while the payload is being read
        self.hs: ServerHandshake | None = None
        #: has sent one whole frame (not idle: evicted only after every idle one)
        self.spoke = False
        #: INIT accepted: from now on failures are answered with an ERROR
        self.greeted = False

    def take(self, chunk: bytes) -> tuple[FrameType, bytes] | None:
        """Add what was read (never more than ``want``); the frame, once it is whole."""
        self.buf += chunk
        if len(self.buf) < self.want:
            return None
        if self.ftype is None:
            cap = first_cap if self.hs is None else handshake_cap
            self.ftype, length = parse_header(bytes(self.buf), cap=cap)
            self.buf.clear()
            self.want = length
            if length:
                return None
        frame = self.ftype, bytes(self.buf)
        self.ftype, self.want = None, HEADER.size
        self.buf.clear()
        return frame


class Gatekeeper:
    """Listens on ``listeners`` and runs the pre-authentication phase of every connection in one
    thread (``start``/``stop``); authenticated connections go to ``on_join``/``on_control``."""

    def __init__(
        self,
        listeners: list[socket.socket],
        *,
        keyring: Mapping[bytes, ks.PskKeys],
        replay: ReplayCache,
        window_ms: int,
        limits: GateLimits,
        on_join: JoinFn,
        on_control: ControlFn,
        on_event: EventFn,
    ) -> None:
        self._listeners = listeners
        self._keyring = keyring
        self._replay = replay
        self._window_ms = window_ms
        self.limits = limits
        self._on_join = on_join
        self._on_control = on_control
        self._on_event = on_event
        self._rates = HandshakeRates(
            per_s=limits.handshakes_per_s, per_key_per_s=limits.handshakes_per_ip_per_s
        )
        self._fds = FdBudget(limits.fd_reserve)
        self._sel = selectors.DefaultSelector()
        self._conns: Pending[_Conn] = Pending()
        #: ``_conns`` counted per source, for other threads (``pending_by_source``)
        self._counts: dict[str, int] = {}
        self._counts_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._spare: int | None = None

    # ------------------------------------------------------------ interface

    def start(self) -> None:
        for lsock in self._listeners:
            lsock.setblocking(False)
            self._sel.register(lsock, selectors.EVENT_READ, None)
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._spare = _open_spare()
        thread = threading.Thread(target=self._run, name="stx-gatekeeper", daemon=True)
        thread.start()  # RuntimeError here is the caller's (the receiver does not start)
        self._thread = thread

    def stop(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in list(self._conns):
            self._close(conn)
        for lsock in self._listeners:
            lsock.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def pending_by_source(self) -> dict[str, int]:
        """Pending connections per source address (a snapshot)."""
        with self._counts_lock:
            return dict(self._counts)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as exc:  # a bug here must not leave the port open, unserved
                self._event("dropped", peer="-", reason=f"internal error: {type(exc).__name__}")
                time.sleep(0.05)

    def _turn(self) -> None:
        """One turn of the loop: expire, wait for what is ready, serve it."""
        now = time.monotonic()
        self._expire(now)
        timeout = 0.5
        first = self._conns.oldest()
        if first is not None:
            timeout = max(0.0, min(timeout, first.deadline - now))
        for key, _ in self._sel.select(timeout):
            obj = key.fileobj
            if obj is self._wake_r:
                try:
                    self._wake_r.recv(64)
                except OSError:
                    pass
            elif key.data is None:
                self._accept(obj)  # type: ignore[arg-type]
            else:
                self._readable(key.data)
        self._rates.prune(time.monotonic())

    def _expire(self, now: float) -> None:
        while (conn := self._conns.oldest()) is not None:
            if conn.deadline > now:
                return
            self._fail(conn, ConnectError(f"connection to {conn.peer[0]} lost: timed out"))

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(64):  # then let the other sockets have a turn
            if not self._fds.ok() and not self._make_room():
                self._refuse_one(lsock, BUSY_DESCRIPTORS)
                return
            try:
                sock, peer = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._refuse_one(lsock, BUSY_DESCRIPTORS)
                return
            self._fds.took()
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                keepalive(sock)  # data streams too: a peer gone without a FIN is noticed
            except OSError:
                sock.close()
                continue
            self._admit(sock, peer)

    def _make_room(self) -> bool:
        """Out of descriptors: evict a pending connection (an idle one first) for the new one,
        as when the cap is reached; False if there is none to evict."""
        if not self._conns:
            return False
        self._evict(None, "a new connection", "out of file descriptors")
        self._fds.took(-1)
        return True

    def _refuse_one(self, lsock: socket.socket, why: str) -> None:
        """Out of descriptors: take one connection off the queue (with the spare descriptor kept
        for it) and tell it to come back later, rather than leave it there, readable forever."""
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        try:
            sock, peer = lsock.accept()
        except OSError:
            sock = None
        if sock is not None:
            try:
                sock.send(error_frame(ConnectError(why), generic=False))
            except OSError:
                pass
            self._event("dropped", peer=peer[0], reason=why)
            sock.close()
        self._spare = _open_spare()
        if sock is None:
            time.sleep(0.01)  # nothing could be taken off: do not spin

    def _admit(self, sock: socket.socket, peer: tuple) -> None:
        key = source_key(peer[0])
        lim = self.limits
        if self._conns.count(key) >= lim.max_pending_per_ip:
            self._evict(key, peer[0], "too many unauthenticated connections from this address")
        elif len(self._conns) >= lim.max_pending:
            self._evict(None, peer[0], "too many unauthenticated connections")
        conn = _Conn(sock, peer, key, time.monotonic() + lim.handshake_timeout)
        self._conns.add(conn, key)
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _evict(self, key: str | None, newcomer: str, why: str) -> None:
        victim = self._conns.victim(_spoke, key)
        if victim is None:
            return
        self._event("dropped", peer=victim.peer[0], reason=f"evicted for {newcomer}: {why}")
        self._close(victim)

    def _forget(self, conn: _Conn) -> None:
        if not self._conns.remove(conn):
            return
        with self._counts_lock:
            left = self._counts.get(conn.key, 1) - 1
            if left:
                self._counts[conn.key] = left
            else:
                self._counts.pop(conn.key, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _close(self, conn: _Conn) -> None:
        self._forget(conn)
        try:
            conn.sock.close()
        except OSError:
            pass

    def _fail(self, conn: _Conn, exc: StxError) -> None:
        if conn.greeted:
            try:
                conn.sock.send(error_frame(exc, generic=True))
            except OSError:
                pass
        self._event(
            "rejected", peer=conn.peer[0], error=str(exc), code=exc.exit_code
        )  # before the peer sees
        self._close(conn)  # the close: whoever waits for it finds the event already there

    # ------------------------------------------------------------ frames

    def _readable(self, conn: _Conn) -> None:
        try:
            try:
                chunk = conn.sock.recv(conn.want - len(conn.buf))
            except BlockingIOError:
                return
            except OSError as exc:
                raise ConnectError(f"connection to {conn.peer[0]} lost: {exc.strerror}") from None
            if not chunk:
                raise ConnectError(f"connection closed by {conn.peer[0]}")
            frame = conn.take(chunk)
            if frame is not None:
                self._frame(conn, *frame)
        except StxError as exc:
            self._fail(conn, exc)
        except Exception as exc:  # never let one connection take the gatekeeper down
            self._fail(conn, StxError(f"internal error: {type(exc).__name__}"))

    def _frame(self, conn: _Conn, ftype: FrameType, payload: bytes) -> None:
        conn.spoke = True
        if conn.hs is None:
            if ftype is FrameType.JOIN:
                self._hand_join(conn, payload)
                return
            if ftype is not FrameType.INIT:
                raise ProtocolError(f"unexpected {ftype.name} as the first frame")
            try:
                Init.decode(payload)
            except VersionError:
                conn.greeted = True  # an older or newer peer is told why
                raise
            conn.greeted = True
            if not self._rates.take(conn.key):
                raise ConnectError(BUSY_HANDSHAKES)
            conn.hs = ServerHandshake(
                keyring=self._keyring,
                now_ms=now_ms(),
                replay_cache=self._replay,
                window_ms=self._window_ms,
            )
        frames = conn.hs.receive(ftype, payload, now_ms=now_ms())
        if conn.hs.established:
            self._hand_control(conn, frames)
            return
        data = b"".join(frames)
        if data:
            try:
                sent = conn.sock.send(data)
            except OSError as exc:
                raise ConnectError(f"connection to {conn.peer[0]} lost: {exc.strerror}") from None
            if sent != len(data):  # a few hundred bytes into an empty buffer: it does not read
                raise ConnectError(f"connection to {conn.peer[0]} lost: peer is not reading")

    def _handed(self, conn: _Conn) -> FramedSocket:
        """Take ``conn`` out of the loop; its socket, blocking again, for the next owner."""
        self._forget(conn)
        conn.sock.setblocking(True)
        return FramedSocket(conn.sock, peer=str(conn.peer[0]))

    def _hand_join(self, conn: _Conn, payload: bytes) -> None:
        fs = self._handed(conn)
        try:
            self._on_join(fs, payload, _nothing)
        except StxError as exc:
            self._event("rejected", peer=conn.peer[0], error=str(exc), code=exc.exit_code)
        except Exception as exc:
            self._event(
                "rejected", peer=conn.peer[0], error=f"internal error: {type(exc).__name__}", code=1
            )
        finally:
            fs.close()  # the worker holds its own copy now

    def _hand_control(self, conn: _Conn, frames: list[bytes]) -> None:
        assert conn.hs is not None and conn.hs.session is not None
        if not self._fds.ok():
            raise ConnectError(BUSY_DESCRIPTORS)
        fs = self._handed(conn)
        try:
            self._on_control(fs, conn.hs.session, conn.peer, frames)
        except StxError as exc:
            try:
                fs.sock.settimeout(1.0)
                fs.send(error_frame(exc, generic=True))
            except StxError:
                pass
            self._event("rejected", peer=conn.peer[0], error=str(exc), code=exc.exit_code)
            fs.close()

    def set_keyring(self, keyring: Mapping[bytes, ks.PskKeys]) -> None:
        """Accept these keys from now on; handshakes already under way keep theirs."""
        self._keyring = keyring

    def _event(self, kind: str, **fields: Any) -> None:
        try:
            self._on_event(kind, fields)
        except Exception:  # a faulty callback must not take the gatekeeper down
            pass


class LogLimiter(_LogLimiter):
    """``limits.LogLimiter`` for a log writer that hears events from many threads (the
    receiver's): one call at a time."""

    def __init__(self, *, rate: float = 5.0, burst: float = 10.0, every: float = 1.0) -> None:
        super().__init__(rate=rate, burst=burst, every=every)
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            return super().allow()

    def flush(self, *, force: bool = False) -> str | None:
        with self._lock:
            return super().flush(force=force)


def _spoke(conn: _Conn) -> bool:
    return conn.spoke


def _nothing() -> None:
    pass


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None
