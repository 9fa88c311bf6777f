"""Receiver coordinator: listens, authenticates, admits transfers, hands streams to workers.

Theory of operation
-------------------
One listening TCP port (one socket per address the host name resolves to) carries everything:
the client speaks first on every connection, with INIT (a control connection: handshake,
metadata, end, receipt) or JOIN (a data stream of an established session, proving its stream
key). Until a connection has proven the key it belongs to the gatekeeper (``gatekeeper.py``): one
selector loop, no thread per connection, with deadlines, caps, rate limits and eviction. Only an
authenticated control connection gets a thread (a bounded number of them), and a verified data
stream goes straight to a worker.

An admitted transfer gets a preallocated partial file ``.NAME.stxpart`` in the destination. A
JOIN that proves its key is passed, socket and stream secret, to the least busy worker process
over a private SEQPACKET socketpair; workers report landed blocks (index, digest) on a ZeroMQ
PULL socket. When END arrives and every block is durable, the coordinator checks the whole-file
digest, fsyncs, renames the partial file to its final name and sends the RECEIPT. Anything else
removes the partial file: nothing half-written ever takes the final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from . import ipc
from .config import check_workers
from .control import ControlHandler
from .destination import LOCK_SUFFIX as LOCK_SUFFIX
from .destination import PART_SUFFIX as PART_SUFFIX
from .destination import STATE_SUFFIX as STATE_SUFFIX
from .destination import check_dest
from .destination import create_partial as _create_preallocated  # noqa: F401  (tests use it)
from .destination import is_tmpfs as _is_tmpfs  # noqa: F401  (tests import it from here)
from .destination import list_partials as list_partials
from .destination import purge_partials as purge_partials
from .destination import safe_name as safe_name
from .errors import ConnectError, StxError, UsageError
from .gatekeeper import Gatekeeper, GateLimits, error_frame
from .handshake import DEFAULT_WINDOW_MS, ReplayCache, keyring_for
from .keyschedule import SessionKeys
from .messages import Landed, StreamFailed
from .netio import FramedSocket
from .recv_session import DigestMismatch as DigestMismatch
from .registry import COMPLETED_KEEP, CompletedList, SessionRegistry
from .registry import ReceivedFile as ReceivedFile
from .state import load as load_state  # noqa: F401  (tests count its calls)
from .wire import Join

#: on_event(kind, fields): "listening", "accepted", "received", "failed", "rejected", "dropped",
#: "warning".
EventFn = Callable[[str, dict[str, Any]], None]
DEFAULT_SYNC_BYTES = 64 << 20
#: Seconds a session may go without a block landing and without a control frame before the
#: receiver ends it (``stx recv --stall-timeout``): a stopped or vanished sender must not hold
#: its session, its streams and the file's name forever.
DEFAULT_STALL_TIMEOUT = 60.0


#: Data streams a receiver serves at once, over all its sessions (``Receiver(max_streams=)``):
#: each is a thread in a worker with a block-sized buffer or two.
DEFAULT_MAX_STREAMS = 256
#: Data streams one worker process serves at once (``Receiver(max_worker_streams=)``).
DEFAULT_MAX_WORKER_STREAMS = 128
#: A worker not heard from (its heartbeat, ``workers/receiver.py``) for this many seconds is
#: killed and replaced (``Receiver(worker_timeout=)``).
WORKER_TIMEOUT = 5.0
#: ... and one not heard from for this long gets new streams only if no other worker can.
WORKER_QUIET_S = 1.5
#: A new worker may take this long to start before its silence counts.
WORKER_START_S = 15.0
#: Descriptors that must be free before a replacement worker is started: its socketpair, the
#: pipe ``subprocess`` uses while it starts it, and the IPC connection its reports arrive on.
#: libzmq aborts the whole process when it cannot accept that last one (EMFILE), so a worker is
#: rather not replaced yet (the next check tries again).
SPAWN_DESCRIPTORS = 8
#: The data streams of a completed session still open this long after its RECEIPT are cut:
#: an honest sender closes them within milliseconds, one that vanished never does.
FINISHED_GRACE_S = 2.0


class _Pool:
    """Receiver worker processes and their fd-passing channels.

    A worker that exited is replaced. So is one that stopped beating: a process that is alive
    but does not run (SIGSTOP, a frozen cgroup, a paused container) would otherwise keep its
    streams, and keep getting new ones, forever. It is left out of new hand-overs once it is
    quiet for ``WORKER_QUIET_S``, and killed (SIGKILL works on a stopped process, and frees
    whatever it held, the landing lock included) and replaced after ``stuck_after``; its
    streams are gone and their senders replace them. Silence is judged after reading every
    heartbeat already queued on the channel, so a coordinator that was itself busy or
    stopped for a while does not take its healthy workers for stuck ones.

    Hand-overs are capped: ``max_streams`` open streams in all and ``max_worker_streams`` per
    worker; past either, ``hand_over`` refuses with ConnectError and the sender replaces the
    stream later. Channels are written without blocking, so a stopped worker whose channel
    is full cannot block the pool.
    """

    def __init__(
        self,
        n: int,
        report_endpoint: str,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_worker_streams: int = DEFAULT_MAX_WORKER_STREAMS,
        stuck_after: float = WORKER_TIMEOUT,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        self.report_endpoint = report_endpoint
        self.max_streams = max_streams
        self.max_worker_streams = max_worker_streams
        self.stuck_after = stuck_after
        self.quiet_after = min(WORKER_QUIET_S, stuck_after / 2)
        self._on_event = on_event
        self.members: list[tuple[socket.socket, subprocess.Popen[bytes]]] = []
        self.load = [0] * n
        #: when each worker was last heard from (a time in the future: still starting)
        self.heard = [0.0] * n
        self.where: dict[tuple[bytes, int], int] = {}
        self.lock = threading.Lock()
        self.replaced = 0
        self._cancels: list[tuple[float, bytes]] = []
        self._spawn_failed = False
        self._last_check = time.monotonic()
        for i in range(n):
            self.members.append(self._spawn())
            self.heard[i] = time.monotonic() + WORKER_START_S
        self._await_ready()

    def _await_ready(self, timeout: float = 10.0) -> None:
        """Wait until every worker has started (its interpreter and imports take ~0.1 s each),
        so that "listening" means a transfer can start at full speed. A worker that dies or
        is slow is not waited for past ``timeout``: check() and hand_over() cope."""
        deadline = time.monotonic() + timeout
        for i, (chan, _) in enumerate(self.members):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            chan.settimeout(left)
            try:
                if chan.recv(16):  # b"ready", or b"" from a worker that died
                    self.heard[i] = time.monotonic()
            except OSError:
                pass
            finally:
                chan.settimeout(None)

    def _spawn(self) -> tuple[socket.socket, subprocess.Popen[bytes]]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = ipc.spawn_worker(
                "stxpar.workers.receiver",
                str(theirs.fileno()),
                self.report_endpoint,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return mine, proc

    def _hear(self, i: int, now: float) -> None:
        """Read what worker ``i`` sent on its channel (heartbeats) without waiting."""
        chan = self.members[i][0]
        while True:
            try:
                data = chan.recv(16, socket.MSG_DONTWAIT)
            except OSError:
                return  # nothing queued (or a closed channel)
            if not data:
                return  # the worker exited; poll() says so
            self.heard[i] = max(self.heard[i], now)

    def check(self) -> None:
        """Replace every worker that exited or went silent; cut the streams of completed
        sessions whose grace ran out. Called by the report thread every 0.5 s."""
        events: list[dict[str, Any]] = []
        now = time.monotonic()
        with self.lock:
            if now - self._last_check > self.stuck_after / 2:
                # This process itself did not run for a while (stopped with its workers by
                # ^Z, or its report thread held up): it cannot tell who else was silent.
                self.heard = [max(h, now) for h in self.heard]
            self._last_check = now
            for i, (_, proc) in enumerate(self.members):
                self._hear(i, now)
                if proc.poll() is not None:
                    self._replace(i, events, None)
                elif now - self.heard[i] > self.stuck_after:
                    self._replace(
                        i, events, f"no heartbeat for {now - self.heard[i]:.1f} s (stopped?)"
                    )
            due = [sid for t, sid in self._cancels if t <= now]
            self._cancels = [(t, sid) for t, sid in self._cancels if t > now]
        for sid in due:
            self.cancel(sid)
        for fields in events:
            if self._on_event is not None:
                self._on_event("worker_replaced", **fields)

    def _replace(self, i: int, events: list[dict[str, Any]], stuck: str | None) -> None:
        """Start a new worker in place of worker ``i``, killing it first if it is ``stuck``.
        Its streams are gone (their connections close with it; the senders replace them).
        Where no process can be started now (a pids limit), the slot stays dead and the next
        check tries again."""
        chan, proc = self.members[i]
        if stuck is not None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass  # in uninterruptible I/O: it dies when that returns; replaced now
        chan.close()
        self.load[i] = 0
        self.where = {k: v for k, v in self.where.items() if v != i}
        try:
            if self._descriptors_free() < SPAWN_DESCRIPTORS:
                raise OSError(errno.EMFILE, "too few file descriptors free")
            self.members[i] = self._spawn()
        except OSError as exc:
            if not self._spawn_failed:
                why = exc.strerror or str(exc)
                events.append({"pid": proc.pid, "reason": f"cannot start a worker yet: {why}"})
            self._spawn_failed = True
            return
        self._spawn_failed = False
        self.heard[i] = time.monotonic() + WORKER_START_S
        self.replaced += 1
        if stuck is not None:
            events.append({"pid": proc.pid, "reason": stuck})

    @staticmethod
    def _descriptors_free() -> int:
        """How many more descriptors this process may open (a large number where that cannot
        be told)."""
        try:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft == resource.RLIM_INFINITY:
                return 1 << 30
            return soft - len(os.listdir("/proc/self/fd"))
        except (OSError, ValueError):
            return 1 << 30

    def replace_dead(self) -> None:
        """Kept for callers of the old name: ``check()``."""
        self.check()

    def hand_over(self, job: dict[str, Any], conn: socket.socket) -> None:
        """Give a verified data stream to the least busy live worker that is heard from;
        ConnectError if the receiver serves as many streams as it may, or if no worker takes
        it (the sender then replaces the stream, later)."""
        with self.lock:
            open_streams = sum(self.load)
            if open_streams >= self.max_streams:
                raise ConnectError(
                    f"receiver busy: {open_streams} data streams open, the most it serves;"
                    " try again shortly"
                )
            now = time.monotonic()
            for i in range(len(self.members)):
                self._hear(i, now)

            def rank(k: int) -> tuple[bool, bool, int]:
                dead = self.members[k][1].poll() is not None
                return dead, now - self.heard[k] > self.quiet_after, self.load[k]

            for i in sorted(range(len(self.members)), key=rank):
                if self.load[i] >= self.max_worker_streams:
                    continue
                try:
                    socket.send_fds(
                        self.members[i][0],
                        [ipc.pack("stream", job)],
                        [conn.fileno()],
                        socket.MSG_DONTWAIT,
                    )
                except OSError:
                    continue  # that worker just died, or is not reading: check() replaces it
                self.load[i] += 1
                self.where[(job["session_id"], job["stream"])] = i
                return
        raise ConnectError("receiver busy: no worker could take the data stream; try again shortly")

    def released(self, session_id: bytes, stream: int) -> None:
        with self.lock:
            i = self.where.pop((session_id, stream), None)
            if i is not None:
                self.load[i] -= 1

    def cancel(self, session_id: bytes) -> None:
        """End every stream of a session, now."""
        with self.lock:
            for chan, _ in self.members:
                try:
                    chan.send(ipc.pack("cancel", session_id), socket.MSG_DONTWAIT)
                except OSError:
                    pass  # a dead or stuck worker: its streams go with it

    def cancel_later(self, session_id: bytes, delay: float = FINISHED_GRACE_S) -> None:
        """End every stream of a completed session still open ``delay`` seconds from now."""
        with self.lock:
            self._cancels.append((time.monotonic() + delay, session_id))

    def stop(self) -> None:
        for chan, _ in self.members:
            chan.close()
        for _, proc in self.members:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Receiver:
    """An STX receiver: ``with Receiver(dest, psk=key) as r: ... r.address ...``.

    ``start()`` binds and starts the worker pool and the accept loop in background threads;
    ``stop()`` ends them. ``once=True`` stops after the first completed transfer (``wait()``
    returns then). ``completed`` lists what arrived: the most recent ``COMPLETED_KEEP``
    transfers (oldest first), with ``completed.total`` counting all of them.

    ``stall_timeout``: seconds a session may go without a landed block and without a control
    frame before it is ended (its partial kept for a resume), so that a stopped sender does
    not hold the file's name forever. ``allow_shared_dest``: accept a destination that other
    users can write into (``start()`` refuses it otherwise, with UsageError, and warns with a
    "warning" event if allowed): such a user can plant, swap or delete files there.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        *,
        psk: bytes | Sequence[bytes],
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int | None = None,
        once: bool = False,
        handshake_timeout: float = 10.0,
        window_ms: int = DEFAULT_WINDOW_MS,
        max_handshakes_per_s: float = 50.0,
        max_pending: int = 256,
        max_pending_per_ip: int = 32,
        sync_bytes: int = DEFAULT_SYNC_BYTES,
        on_event: EventFn | None = None,
        max_handshakes_per_ip_per_s: float | None = None,
        max_sessions: int = 64,
        fd_reserve: int | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_worker_streams: int = DEFAULT_MAX_WORKER_STREAMS,
        worker_timeout: float = WORKER_TIMEOUT,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        allow_shared_dest: bool = False,
    ) -> None:
        """``max_handshakes_per_s`` and ``max_handshakes_per_ip_per_s`` (default: half the former,
        at least 2) limit handshakes started, overall and per source address; ``max_pending`` and
        ``max_pending_per_ip`` cap connections that have not authenticated yet (the oldest idle
        one is evicted for a newcomer); ``max_sessions`` caps authenticated control connections
        served at once (beyond it a sender is told "receiver busy" and retries); ``fd_reserve``
        descriptors are kept free below RLIMIT_NOFILE (default: automatic). ``window_ms``: how
        far the sender's clock may be from ours. ``max_streams`` / ``max_worker_streams`` cap
        data streams served at once over all sessions / per worker (beyond them a stream is
        refused with a retryable "receiver busy"); a worker silent for ``worker_timeout`` s
        (no heartbeat) is killed and replaced."""
        if max_streams < 1 or max_worker_streams < 1 or not worker_timeout > 0:
            raise UsageError("max_streams, max_worker_streams and worker_timeout must be positive")
        self.max_streams, self.max_worker_streams = max_streams, max_worker_streams
        self.worker_timeout = worker_timeout
        psks = [psk] if isinstance(psk, bytes | bytearray) else list(psk)
        if not psks or any(len(k) < 32 for k in psks):
            raise UsageError("the key must be at least 256 bits")
        self._keyring = keyring_for([bytes(k) for k in psks])
        self.dest = Path(dest)
        self.host, self.port = host, port
        self.workers = check_workers(workers)
        self.once = once
        self.handshake_timeout = handshake_timeout
        self.window_ms = window_ms
        self.sync_bytes = sync_bytes
        self._on_event = on_event
        if window_ms <= 0 or handshake_timeout <= 0 or max_handshakes_per_s <= 0:
            raise UsageError("window, handshake timeout and handshake rate must be positive")
        if min(max_pending, max_pending_per_ip, max_sessions) < 1:
            raise UsageError("connection and session caps must be at least 1")
        per_ip = (
            min(max_handshakes_per_s, max(2.0, max_handshakes_per_s / 2))
            if max_handshakes_per_ip_per_s is None
            else max_handshakes_per_ip_per_s
        )
        if per_ip <= 0:
            raise UsageError("the per-address handshake rate must be positive")
        self._limits = GateLimits(
            handshake_timeout=handshake_timeout,
            max_pending=max_pending,
            max_pending_per_ip=max_pending_per_ip,
            handshakes_per_s=max_handshakes_per_s,
            handshakes_per_ip_per_s=per_ip,
            fd_reserve=fd_reserve,
        )
        self._control_slots = threading.BoundedSemaphore(max_sessions)
        self._control_threads: set[threading.Thread] = set()
        self._replay = ReplayCache(ttl_ms=2 * window_ms)
        #: Active sessions, names, recent completions (``registry.snapshot()`` for tests).
        self.registry = SessionRegistry(completed_keep=COMPLETED_KEEP)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listeners: list[socket.socket] = []
        self._gate: Gatekeeper | None = None
        self._pool: _Pool | None = None
        self._zctx: zmq.Context | None = None
        self._workdir = ""
        if not stall_timeout > 0:
            raise UsageError("the stall timeout must be a positive number of seconds")
        self.stall_timeout = float(stall_timeout)
        self.allow_shared_dest = allow_shared_dest
        self._umask = os.umask(0o077)  # read once, here, not racing other threads later
        os.umask(self._umask)
        self.dropped_streams = 0

    # ---------------------------------------------------------------- lifecycle

    @property
    def address(self) -> tuple[str, int]:
        """The first listening address (``addresses`` has every one)."""
        return self.addresses[0]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every address listened on: one per address the listen host resolves to."""
        if not self._listeners:
            raise RuntimeError("receiver not started")
        return [(s.getsockname()[0], s.getsockname()[1]) for s in self._listeners]

    @property
    def _preauth_by_ip(self) -> dict[str, int]:
        """Connections that have not authenticated yet, per source address (a snapshot)."""
        return self._gate.pending_by_source() if self._gate is not None else {}

    def start(self) -> Receiver:
        self._check_dest()
        self._listeners = self._listen()
        try:
            ipc.remove_stale_dirs()
            self._workdir = ipc.private_dir("stx-recv-")
            self._zctx = zmq.Context()
            report_ep = f"ipc://{self._workdir}/report"
            pull = ipc.configure(self._zctx.socket(zmq.PULL))
            pull.bind(report_ep)
            self._pool = _Pool(
                self.workers,
                report_ep,
                max_streams=self.max_streams,
                max_worker_streams=self.max_worker_streams,
                stuck_after=self.worker_timeout,
                on_event=self._event,
            )
            t = threading.Thread(target=self._report_loop, args=(pull,), daemon=True)
            t.start()
            self._threads.append(t)
            self._gate = Gatekeeper(
                self._listeners,
                keyring=self._keyring,
                replay=self._replay,
                window_ms=self.window_ms,
                limits=self._limits,
                on_join=self._serve_join,
                on_control=self._hand_control,
                on_event=lambda kind, fields: self._event(kind, **fields),
            )
            self._gate.start()
        except RuntimeError as exc:  # no thread could be started (pids / tasks limits)
            self.stop()
            raise StxError(f"cannot start the receiver: {exc}") from None
        except BaseException:
            self.stop()
            raise
        host, port = self.address
        self._event(
            "listening",
            host=host,
            port=port,
            workers=self.workers,
            also=[f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.addresses[1:]],
        )
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop()`` (or, with ``once``, the first completed transfer)."""
        return self._done.wait(timeout)

    def serve_forever(self) -> None:
        while not self._done.wait(0.5):
            pass

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._done.set()
        if self._gate is not None:
            self._gate.stop()  # closes the listening sockets too
        else:
            for lsock in self._listeners:
                lsock.close()
        self._end_sessions()
        if self._pool is not None:
            for sid in self.registry.session_ids():
                self._pool.cancel(sid)
            self._pool.stop()
        for t in self._threads:
            t.join(timeout=5)
        if self._zctx is not None:
            self._zctx.destroy(linger=0)
        ipc.remove_dir(self._workdir)

    def _end_sessions(self, timeout: float = 3.0) -> None:
        """Let every session in progress end the way a lost connection ends it (partial and
        state kept for a resume, the name and its lock file released), instead of leaving
        that to threads the process is about to abandon."""
        with self._lock:
            threads = list(self._control_threads)
        self.registry.stop_all()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def completed(self) -> CompletedList:
        """The most recent ``COMPLETED_KEEP`` transfers received, oldest first."""
        return self.registry.completed

    def _event(self, kind: str, **fields: Any) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, fields)
            except Exception:  # a faulty callback must not take the receiver down
                pass

    def _check_dest(self) -> None:
        warning = check_dest(self.dest, allow_shared=self.allow_shared_dest)
        if warning is not None:
            self._event("warning", message=warning)

    def _listen(self) -> list[socket.socket]:
        """One listening socket per address the host resolves to (``localhost`` is often both
        ::1 and 127.0.0.1), all on one port (the first one's, when the port is 0)."""
        try:
            infos = socket.getaddrinfo(
                self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise UsageError(
                f"cannot resolve listen address {self.host!r}: {exc.strerror}"
            ) from None
        addrs: list[tuple[int, tuple]] = []
        for info in infos:
            if info[0] in (socket.AF_INET, socket.AF_INET6) and (info[0], info[4]) not in addrs:
                addrs.append((info[0], info[4]))
        socks: list[socket.socket] = []
        port = self.port
        try:
            for family, addr in addrs:
                addr = (addr[0], port, *addr[2:])
                socks.append(self._bind(family, addr, several=len(addrs) > 1))
                port = socks[0].getsockname()[1]
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _bind(self, family: int, addr: tuple, *, several: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shown = f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}"
        named = f" ({shown}, one of the addresses {self.host} resolves to)" if several else ""
        try:
            if family == socket.AF_INET6 and several:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # :: beside 0.0.0.0
            sock.bind(addr)
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"cannot listen on {self.host}:{self.port}{named}: address already in use"
                ) from None
            raise UsageError(
                f"cannot listen on {self.host}:{self.port}{named}: {exc.strerror}"
            ) from None
        return sock

    def _hand_control(
        self, fs: FramedSocket, session: SessionKeys, peer: tuple, frames: list[bytes]
    ) -> None:
        """Serve an authenticated control connection in a thread of its own, if one more may
        run and can start; else ConnectError ("receiver busy", retryable), all released."""
        if not self._control_slots.acquire(blocking=False):
            raise ConnectError("receiver busy: too many transfers at once; try again shortly")
        thread = threading.Thread(
            target=self._control_thread, args=(fs, session, peer, frames), daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # a pids / tasks / RLIMIT_NPROC limit: refuse this one, go on
            self._control_slots.release()
            raise ConnectError("receiver busy: cannot start a thread; try again shortly") from None

    def _control_thread(
        self, fs: FramedSocket, session: SessionKeys, peer: tuple, frames: list[bytes]
    ) -> None:
        with self._lock:
            self._control_threads.add(threading.current_thread())
        try:
            fs.sock.settimeout(self.handshake_timeout)
            for frame in frames:  # the handshake's last (KEY_CONFIRMATION)
                fs.send(frame)
            assert self._pool is not None
            ControlHandler(
                fs,
                session,
                peer,
                dest=self.dest,
                registry=self.registry,
                pool=self._pool,
                stall_timeout=self.stall_timeout,
                handshake_timeout=self.handshake_timeout,
                mode=0o666 & ~self._umask,
                on_event=lambda kind, fields: self._event(kind, **fields),
                on_done=self._done.set if self.once else lambda: None,
            ).run()
        except StxError as exc:
            self._event("rejected", peer=peer[0], error=str(exc))
        except Exception as exc:  # never let one connection take the receiver down
            self._event("rejected", peer=peer[0], error=f"internal error: {type(exc).__name__}")
        finally:
            fs.close()
            with self._lock:
                self._control_threads.discard(threading.current_thread())
            self._control_slots.release()

    # ---------------------------------------------------------------- data streams

    def _serve_join(self, fs: FramedSocket, payload: bytes, release: Callable[[], None]) -> None:
        try:
            target = self.registry.accept_stream(Join.decode(payload))
        except StxError:
            self.dropped_streams += 1
            raise
        release()
        md = target.md
        job = {
            "session_id": target.session_id,
            "stream": target.stream,
            "secret": target.secret,
            "path": target.path,
            "size": md.size,
            "block_size": md.block_size,
            "file_id": md.file_id,
            "rekey_records": md.rekey_records,
            "rekey_bytes": md.rekey_bytes,
            "sync_bytes": self.sync_bytes,
            "streams": md.streams,  # the worker lands blocks by mapping when there are many
            # The partial this session created and holds open: the worker opens it by path and
            # writes nothing unless it is this inode (a local user who swapped it gets no data).
            "inode": None if target.inode is None else list(target.inode),
        }
        fs.sock.settimeout(None)
        assert self._pool is not None
        try:
            self._pool.hand_over(job, fs.sock)
        except ConnectError as exc:
            fs.sock.settimeout(1.0)
            with contextlib.suppress(StxError):  # retryable: the sender replaces the stream
                fs.send(error_frame(exc, generic=False))
            raise

    def _report_loop(self, pull: zmq.Socket) -> None:
        last_check = 0.0
        while not self._stopping.is_set():
            if self._pool is not None and time.monotonic() - last_check > 0.5:
                last_check = time.monotonic()
                try:
                    self._pool.check()
                except Exception:  # this thread must outlive any one check
                    pass
            try:
                if not pull.poll(200):
                    continue
                msg = ipc.unpack(pull.recv())
            except zmq.ZMQError:
                return
            if msg[0] in ("closed", "fail") and self._pool is not None:
                self._pool.released(msg[1], msg[2])
            # The old list messages, as the typed reports the registry takes.
            if msg[0] == "blocks":
                self.registry.deliver(Landed(msg[1], -1, tuple(msg[2])))
            elif msg[0] == "fail":
                self.registry.deliver(StreamFailed(msg[1], msg[2], msg[3], msg[4]))


def _now_ms() -> int:
    return int(time.time() * 1000)
