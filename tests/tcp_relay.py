"""A small threaded TCP relay for tests: put it in front of a server to count, watch or damage
the connections that reach it.

    with TcpRelay(("127.0.0.1", receiver_port)) as relay:
        send(path, *relay.address, ...)
        assert relay.accepted == 5

Every accepted connection gets a :class:`RelayConnection` with one pump thread per direction.
Each chunk read from one side goes through :meth:`TcpRelay.transform` before it is written to
the other side. The default passes data through unchanged, or calls the ``transform`` given to
the constructor; subclasses override :meth:`transform` (and :meth:`on_connect`) to drop, stall,
flip bytes or cut connections:

* return the bytes to forward (``b""`` forwards nothing: the chunk is dropped);
* return ``None`` to cut the connection (both sockets closed with a reset);
* sleep inside the hook to stall that direction of that connection.

Half-closes are forwarded (a FIN from one side becomes ``shutdown(SHUT_WR)`` on the other), so
protocols that shut down their write side and then wait for the peer keep working.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Self

#: ``"up"``: client -> target; ``"down"``: target -> client.
Direction = Literal["up", "down"]
UP: Direction = "up"
DOWN: Direction = "down"

TransformFn = Callable[["RelayConnection", Direction, bytes], "bytes | None"]

CHUNK = 256 << 10


@dataclass
class RelayConnection:
    """One relayed connection: client side, target side and what went through."""

    id: int
    client: socket.socket
    upstream: socket.socket
    peer: tuple[str, int]
    #: bytes read from each side (before the hook; what was forwarded may differ)
    bytes_up: int = 0
    bytes_down: int = 0
    chunks_up: int = 0
    chunks_down: int = 0
    #: set when the hook cut this connection (returned None) or ``close()`` was called
    cut: bool = False
    #: set once both pumps have finished and both sockets are closed
    finished: threading.Event = field(default_factory=threading.Event)
    #: free for hooks to keep per-connection state in
    state: dict[str, object] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pumps_left: int = 2

    def bytes(self, direction: Direction) -> int:
        return self.bytes_up if direction == UP else self.bytes_down

    def close(self, *, reset: bool = True) -> None:
        """Close both sides now (with a TCP reset unless ``reset=False``)."""
        with self._lock:
            self.cut = True
        for sock in (self.client, self.upstream):
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _pump_done(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            for sock in (self.client, self.upstream):
                with contextlib.suppress(OSError):
                    sock.close()
            self.finished.set()


class TcpRelay:
    """Listen on ``host:port`` (default 127.0.0.1, a free port) and forward every accepted
    connection to ``target``. ``start()`` / ``stop()``, or use it as a context manager."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        transform: TransformFn | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self._transform = transform
        self.connect_timeout = connect_timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        #: every connection accepted so far, in order
        self.connections: list[RelayConnection] = []
        #: connections accepted whose target could not be reached (closed at once)
        self.failed_connects = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> Self:
        if self._accept_thread is None:
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name="relay-accept", daemon=True
            )
            self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every open connection, join the threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        for conn in self.snapshot():
            if not conn.finished.is_set():
                conn.close()
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- counters

    def snapshot(self) -> list[RelayConnection]:
        with self._lock:
            return list(self.connections)

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self.connections)

    @property
    def active(self) -> int:
        """Connections still open."""
        return sum(1 for c in self.snapshot() if not c.finished.is_set())

    @property
    def bytes_up(self) -> int:
        return sum(c.bytes_up for c in self.snapshot())

    @property
    def bytes_down(self) -> int:
        return sum(c.bytes_down for c in self.snapshot())

    def wait_accepted(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` connections were accepted."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.connections) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted connection has finished."""
        deadline = time.monotonic() + timeout
        for conn in self.snapshot():
            if not conn.finished.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # ---------------------------------------------------------------- hooks

    def on_connect(self, conn: RelayConnection) -> None:
        """Called once per connection, after the target connected and before any data flows."""

    def transform(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        """What to forward for ``data`` read in ``direction``: bytes (``b""`` drops the
        chunk) or None (cut the connection). Runs on that direction's pump thread."""
        if self._transform is not None:
            return self._transform(conn, direction, data)
        return data

    # ---------------------------------------------------------------- internals

    def _accept_loop(self) -> None:
        next_id = 0
        while not self._stopping.is_set():
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError:
                with self._lock:
                    self.failed_connects += 1
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = RelayConnection(id=next_id, client=client, upstream=upstream, peer=peer[:2])
            next_id += 1
            with self._cond:
                self.connections.append(conn)
                self._cond.notify_all()
            try:
                self.on_connect(conn)
            except Exception:
                conn.close()
                conn._pump_done()
                conn._pump_done()
                continue
            for direction, src, dst in ((UP, client, upstream), (DOWN, upstream, client)):
                t = threading.Thread(
                    target=self._pump,
                    args=(conn, direction, src, dst),
                    name=f"relay-{conn.id}-{direction}",
                    daemon=True,
                )
                self._threads.append(t)
                t.start()

    def _pump(
        self,
        conn: RelayConnection,
        direction: Direction,
        src: socket.socket,
        dst: socket.socket,
    ) -> None:
        try:
            while True:
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    conn.close()
                    return
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                out = self.transform(conn, direction, data)
                if out is None:
                    conn.close()
                    return
                if direction == UP:
                    conn.bytes_up += len(data)
                    conn.chunks_up += 1
                else:
                    conn.bytes_down += len(data)
                    conn.chunks_down += 1
                if out:
                    try:
                        dst.sendall(out)
                    except OSError:
                        conn.close()
                        return
        except Exception:
            conn.close()
        finally:
            conn._pump_done()


class UplinkThrottle(TcpRelay):
    """Forwards sender -> receiver at about ``rate`` bytes/s per connection, so a transfer on
    loopback takes long enough to act on at chosen points of its progress. Bursts of one
    chunk then a pause: the receiver's workers see idle gaps and record progress often."""

    def __init__(self, target: tuple[str, int], rate: float) -> None:
        super().__init__(target)
        self.rate = rate

    def transform(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        if direction == UP and self.rate > 0 and len(data) > 4096:
            time.sleep(len(data) / self.rate)
        return data
