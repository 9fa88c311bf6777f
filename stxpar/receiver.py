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
import select
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

from . import ipc
from .config import DEFAULT_MAX_STREAMS as DEFAULT_MAX_STREAMS
from .config import DEFAULT_MAX_WORKER_STREAMS as DEFAULT_MAX_WORKER_STREAMS
from .config import DEFAULT_STALL_TIMEOUT as DEFAULT_STALL_TIMEOUT
from .config import DEFAULT_SYNC_BYTES as DEFAULT_SYNC_BYTES
from .config import WORKER_TIMEOUT as WORKER_TIMEOUT
from .config import RecvOptions
from .destination import LOCK_SUFFIX as LOCK_SUFFIX
from .destination import PART_SUFFIX as PART_SUFFIX
from .destination import STATE_SUFFIX as STATE_SUFFIX
from .destination import (
    NameLock,
    Names,
    check_dest,
    check_final,
    open_ours,
    partial_still_there,
)
from .destination import create_partial as _create_preallocated
from .destination import disk_error as _disk_error
from .destination import finish as _finish_file
from .destination import free_bytes as _free_bytes
from .destination import is_tmpfs as _is_tmpfs  # noqa: F401  (tests import it from here)
from .destination import list_partials as list_partials
from .destination import purge_partials as purge_partials
from .destination import safe_name as safe_name
from .destination import unlink as _unlink
from .digest import BLOCK_DIGEST_LEN, file_digest
from .errors import (
    AuthError,
    ConnectError,
    IntegrityError,
    ProtocolError,
    RejectedError,
    StxError,
    UsageError,
    error_from_wire,
)
from .gatekeeper import Gatekeeper, GateLimits, error_text
from .handshake import ReplayCache, keyring_for
from .keyschedule import SessionKeys
from .messages import Landed, StreamFailed
from .netio import FramedSocket
from .placement import FINISHED_GRACE_S as FINISHED_GRACE_S
from .placement import WORKER_QUIET_S as WORKER_QUIET_S
from .placement import WORKER_START_S as WORKER_START_S
from .placement import ReportRouter
from .records import ControlChannel, verify_join
from .recvpool import SPAWN_DESCRIPTORS as SPAWN_DESCRIPTORS
from .recvpool import WorkerPool, route_reports
from .state import Identity, StateLog
from .state import load as load_state
from .wire import (
    MAX_HANDSHAKE_PAYLOAD,
    MAX_NAME_BYTES,
    End,
    ErrorMsg,
    FrameType,
    Join,
    Metadata,
    MetadataAck,
    Receipt,
    bitmap,
    encode_frame,
    held_bytes,
)

#: on_event(kind, fields): "listening", "accepted", "received", "failed", "rejected", "dropped",
#: "warning".
EventFn = Callable[[str, dict[str, Any]], None]
_RESERVED = object()
#: Seconds one send on a control connection may block (the peer is authenticated by then).
SEND_TIMEOUT = 120.0
#: After END, how long the receiver waits for workers' last reports before it asks the sender
#: to reconnect and send what is still missing.
COMPLETE_TIMEOUT = 10.0
#: How many ``ReceivedFile`` records ``Receiver.completed`` keeps (the most recent ones).
COMPLETED_KEEP = 1000


@dataclass
class ReceivedFile:
    """One completed transfer, as the receiver saw it."""

    path: str
    name: str
    size: int
    digest: str
    seconds: float
    blocks_total: int
    streams: int
    bytes_resumed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "bytes_resumed": self.bytes_resumed,
            "file": self.path,
            "bytes": self.size,
            "seconds": round(self.seconds, 3),
            "blocks_total": self.blocks_total,
            "streams": self.streams,
            "digest": self.digest,
        }


@dataclass
class _Incoming:
    md: Metadata
    session: SessionKeys
    final: Path
    part: Path
    state: Path
    log: StateLog | NullLog
    identity: Identity
    started: float
    received: bytearray
    digests: bytearray
    control: FramedSocket
    count: int = 0
    resumed_bytes: int = 0
    streams: set[int] = field(default_factory=set)
    failure: StxError | None = None
    superseded: bool = False
    closed: bool = False
    #: The blocks held at admission, as (index, digest): what a forged session reverts to.
    initial: list[tuple[int, bytes]] = field(default_factory=list)
    #: The file was completed moments ago and only the receipt got lost.
    already_complete: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    #: The partial file, opened at admission (-1 when there is none): what is renamed to the
    #: final name must be this inode, whatever happened to the path meanwhile.
    part_fd: int = -1
    #: The per-name lock in the destination, held until the session ends (handed on to the
    #: session that supersedes this one).
    name_lock: NameLock | None = None
    #: ``time.monotonic()`` of the last landed blocks or control frame (the stall timeout).
    active_at: float = field(default_factory=time.monotonic)

    def held_digests(self) -> bytes:
        return b"".join(
            self.digests[i * BLOCK_DIGEST_LEN : (i + 1) * BLOCK_DIGEST_LEN]
            for i, v in enumerate(self.received)
            if v
        )

    def close_partial(self) -> None:
        if self.part_fd >= 0:
            os.close(self.part_fd)
            self.part_fd = -1


class NullLog:
    """The state log of a transfer that is already complete: nothing to record."""

    def append(self, records: list[tuple[int, bytes]]) -> None:
        pass

    def close(self) -> None:
        pass


class _Completed(list[ReceivedFile]):
    """``Receiver.completed``: the most recent ``keep`` transfers (a long-running receiver must
    not grow without bound), plus ``total``, how many there were in all."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.total = 0

    def append(self, item: ReceivedFile) -> None:
        super().append(item)
        self.total += 1
        if len(self) > self.keep:
            del self[: len(self) - self.keep]


@dataclass(frozen=True)
class _Recent:
    """A transfer completed moments ago, kept in memory in case its receipt was lost."""

    identity: Identity
    digests: bytes


#: Completed transfers remembered (in memory only) so that a sender that missed the receipt
#: gets it again instead of sending the whole file once more.
RECENT_KEEP = 16
RECENT_MAX_BLOCKS = 1 << 18


def _process_umask() -> int:
    """The process's umask, read without changing it (``Umask:`` in ``/proc/self/status``);
    where that is missing, set and restored at once (a race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class ReceiverSnapshot:
    """What a receiver holds at one moment (``Receiver.snapshot()``), for tests and monitoring."""

    #: The worker processes, and the data streams each serves.
    worker_pids: tuple[int, ...]
    worker_streams: tuple[int, ...]
    #: Workers replaced since the start (exited or stuck).
    workers_replaced: int
    #: Connections that have not authenticated yet, per source address.
    preauth_by_source: Mapping[str, int]
    #: Sessions (authenticated transfers) in progress, and the file names they hold.
    sessions_active: int
    names_active: tuple[str, ...]
    #: Handshake nonces remembered against replay.
    replay_entries: int

    @property
    def streams_open(self) -> int:
        return sum(self.worker_streams)


class Receiver:
    """An STX receiver: ``with Receiver(dest, psk=key) as r: ... r.address ...``.

    ``start()`` binds and starts the worker pool and the accept loop in background threads;
    ``stop()`` ends them. ``completed`` lists what arrived: the most recent ``COMPLETED_KEEP``
    transfers (oldest first), with ``completed.total`` counting all of them.

    How it behaves is ``options`` (``RecvOptions``: workers, limits, timeouts, ``once``, ...);
    each of its fields may also be given as a keyword argument (``Receiver(dest, psk=key,
    workers=2, once=True)``), which overrides the one in ``options``. Invalid values raise
    UsageError here.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        *,
        psk: bytes | Sequence[bytes],
        options: RecvOptions | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        on_event: EventFn | None = None,
        **kw: Any,
    ) -> None:
        self.options = replace(options or RecvOptions(), **kw).resolved()
        psks = [psk] if isinstance(psk, bytes | bytearray) else list(psk)
        if not psks or any(len(k) < 32 for k in psks):
            raise UsageError("the key must be at least 256 bits")
        self._keyring = keyring_for([bytes(k) for k in psks])
        self.dest = Path(dest)
        self.host, self.port = host, port
        o = self.options
        self.workers = o.workers
        self.once = o.once
        self.handshake_timeout = o.handshake_timeout
        self.window_ms = o.window_ms
        self.sync_bytes = o.sync_bytes
        self.max_streams, self.max_worker_streams = o.max_streams, o.max_worker_streams
        self.worker_timeout = o.worker_timeout
        self.stall_timeout = o.stall_timeout
        self.allow_shared_dest = o.allow_shared_dest
        self._on_event = on_event
        self._limits = GateLimits(
            handshake_timeout=o.handshake_timeout,
            max_pending=o.max_pending,
            max_pending_per_ip=o.max_pending_per_ip,
            handshakes_per_s=o.max_handshakes_per_s,
            handshakes_per_ip_per_s=o.max_handshakes_per_ip_per_s,
            fd_reserve=o.fd_reserve,
        )
        self._control_slots = threading.BoundedSemaphore(o.max_sessions)
        self._control_threads: set[threading.Thread] = set()
        self._replay = ReplayCache(ttl_ms=2 * o.window_ms)
        self._sessions: dict[bytes, _Incoming] = {}
        self._active: dict[Path, Any] = {}  # final path -> _Incoming (or _RESERVED)
        self._recent: OrderedDict[Path, _Recent] = OrderedDict()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listeners: list[socket.socket] = []
        self._gate: Gatekeeper | None = None
        self._pool: WorkerPool | None = None
        self._zctx: zmq.Context | None = None
        self._workdir = ""
        self.completed = _Completed(COMPLETED_KEEP)
        self._umask = _process_umask()  # read once, here
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

    def snapshot(self) -> ReceiverSnapshot:
        """What this receiver holds now (each part consistent in itself)."""
        pool = self._pool
        pids: tuple[int, ...] = ()
        load: tuple[int, ...] = ()
        replaced = 0
        if pool is not None:
            with pool.lock:
                pids = tuple(m.pid for m in pool.members)
                load = tuple(pool.placement.load)
                replaced = pool.replaced
        with self._lock:
            sessions = len(self._sessions)
            names = tuple(p.name for p in self._active)
        return ReceiverSnapshot(
            worker_pids=pids,
            worker_streams=load,
            workers_replaced=replaced,
            preauth_by_source=self._gate.pending_by_source() if self._gate is not None else {},
            sessions_active=sessions,
            names_active=names,
            replay_entries=len(self._replay),
        )

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
            self._pool = WorkerPool(
                self.workers,
                report_ep,
                max_streams=self.max_streams,
                max_worker_streams=self.max_worker_streams,
                stuck_after=self.worker_timeout,
                sync_bytes=self.sync_bytes,
                on_event=self._event,
            )
            router = ReportRouter(self._pool.released, self._on_report)
            t = threading.Thread(
                target=route_reports, args=(pull, router, self._pool, self._stopping), daemon=True
            )
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
        with self._lock:
            sessions = list(self._sessions)
        if self._pool is not None:
            for sid in sessions:
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
            live = list(self._sessions.values())
            threads = list(self._control_threads)
        for inc in live:
            with contextlib.suppress(OSError):
                inc.control.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
            self._serve_control(fs, session, peer)
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
            join = Join.decode(payload)
            with self._lock:
                inc = self._sessions.get(join.session_id)
            if inc is None:
                raise AuthError("data stream for an unknown session")
            verify_join(
                stream_secret=inc.session.stream_secret(join.stream),
                session_id=join.session_id,
                stream=join.stream,
                tag=join.mac,
            )
            with inc.cond:
                if join.stream in inc.streams or len(inc.streams) >= 4 * inc.md.streams + 64:
                    raise AuthError(f"stream {join.stream} refused (repeated or too many)")
                inc.streams.add(join.stream)
        except StxError:
            self.dropped_streams += 1
            raise
        release()
        # What rctl's SessionRegistry.accept_stream(join) answers with, built here from the
        # session (the lead swaps it in at the merge).
        target = _StreamTarget(
            session_id=join.session_id,
            stream=join.stream,
            secret=inc.session.stream_secret(join.stream),
            path=os.fspath(inc.part),
            md=inc.md,
            # The partial this session created and holds open: the worker opens it by path and
            # writes nothing unless it is this inode (a local user who swapped it gets no data).
            inode=_inode_of(inc.part_fd),
        )
        fs.sock.settimeout(None)
        assert self._pool is not None
        try:
            self._pool.hand_over_stream(target, fs.sock)
        except ConnectError as exc:
            fs.sock.settimeout(1.0)
            _send_error(fs, exc, generic=False)  # retryable: the sender replaces the stream
            raise

    def _on_report(self, msg: Landed | StreamFailed) -> None:
        """A worker's report, routed to its session (if that still exists)."""
        with self._lock:
            inc = self._sessions.get(msg.session_id)
        if inc is None:
            return
        if isinstance(msg, Landed):
            self._record_blocks(inc, msg.blocks)
        elif msg.code != ConnectError.wire_code:
            # A stream that merely lost its connection is replaced by the sender; anything
            # else (forgery, repeated damage, disk errors) ends the whole transfer.
            with inc.cond:
                if inc.failure is None:
                    inc.failure = type(error_from_wire(msg.code, msg.message))(msg.message)
                inc.cond.notify_all()

    def _record_blocks(self, inc: _Incoming, blocks: Sequence[tuple[int, bytes]]) -> None:
        fresh = [
            (seq, bytes(d))
            for seq, d in blocks
            if isinstance(seq, int) and 0 <= seq < len(inc.received) and len(d) == BLOCK_DIGEST_LEN
        ]
        with inc.cond:
            if inc.failure is not None or inc.closed or inc.superseded:
                return
            try:
                inc.log.append(fresh)  # the blocks are durable; now say so, durably
            except OSError as exc:
                inc.failure = _disk_error(exc, "cannot record progress")
                inc.cond.notify_all()
                return
            inc.active_at = time.monotonic()
            for seq, digest in fresh:
                inc.digests[seq * BLOCK_DIGEST_LEN : (seq + 1) * BLOCK_DIGEST_LEN] = digest
                if not inc.received[seq]:
                    inc.received[seq] = 1
                    inc.count += 1
            inc.cond.notify_all()

    # ---------------------------------------------------------------- control connection

    def _serve_control(self, fs: FramedSocket, session: SessionKeys, peer: tuple) -> None:
        """An authenticated control connection (the gatekeeper ran the handshake), from
        METADATA on."""
        channel = ControlChannel(session=session, client=False)
        inc: _Incoming | None = None
        try:
            fs.deadline = time.monotonic() + self.handshake_timeout
            ftype, payload = fs.recv_frame(cap=_metadata_cap)
            fs.deadline = None
            fs.sock.settimeout(SEND_TIMEOUT)  # a large resume bitmap may take a while to send
            if ftype is not FrameType.METADATA:
                raise ProtocolError(f"expected METADATA, got {ftype.name}")
            md = Metadata.decode(channel.open(ftype, payload))
            inc = self._admit(md, session, fs)
            self._event(
                "accepted",
                peer=peer[0],
                file=inc.final.name,
                bytes=md.size,
                streams=md.streams,
                resumed_blocks=inc.count,
            )
            ack = MetadataAck(have=bitmap(inc.received), digests=inc.held_digests())
            fs.send(channel.seal(FrameType.METADATA_ACK, ack.encode()))
            end = self._await_end(fs, channel, inc)
            received = self._finish(inc, end)
            assert self._pool is not None
            self._pool.cancel_later(inc.session.session_id)
            # Complete, durable and renamed: recorded and reported before it is acknowledged,
            # so a receiver killed after the RECEIPT has always reported the file. A sender
            # that misses the RECEIPT reconnects and is told the file is complete.
            self.completed.append(received)
            inc = None
            self._event("received", **received.as_json())
            try:
                fs.send(
                    channel.seal(
                        FrameType.RECEIPT,
                        Receipt(digest=bytes.fromhex(received.digest), size=md.size).encode(),
                    )
                )
            except StxError:
                pass  # the sender is gone: reconnecting, it finds the file complete
            finally:
                if self.once:
                    self._done.set()
        except StxError as exc:
            if inc is None:
                _send_error(fs, exc, generic=False, channel=channel)
                raise  # refused before admission: reported as "rejected"
            if inc.superseded:
                self._event("superseded", file=inc.final.name)
                inc = None
                return
            _send_error(fs, exc, generic=False, channel=channel)
            # A wrong whole-file digest: no block of the partial can be trusted. A forged block:
            # nothing this session recorded is trusted (the state goes back to its admission).
            forged = isinstance(exc, AuthError)
            discard = isinstance(exc, DigestMismatch) or (forged and not inc.initial)
            with inc.cond:
                have = held_bytes(inc.received, size=inc.md.size, block_size=inc.md.block_size)
                # What is really there: the partial may have been deleted or replaced under us.
                gone = not inc.already_complete and not partial_still_there(inc.part, inc.part_fd)
            if forged:
                have = inc.resumed_bytes
            partial = "gone" if gone else "discarded" if discard else "kept"
            self._event(
                "failed",
                file=inc.final.name,
                error=str(exc),
                kept=partial == "kept",
                partial=partial,
                have_bytes=have if partial == "kept" else 0,
                bytes=inc.md.size,
            )
            self._abort(inc, discard=discard, revert=forged and not gone, gone=gone)
            inc = None
        finally:
            if inc is not None:
                self._abort(inc, discard=False)

    def _admit(self, md: Metadata, session: SessionKeys, fs: FramedSocket) -> _Incoming:
        name = safe_name(md.name)
        names = Names.of(self.dest, name)
        final = names.final
        ident = Identity(name, md.size, md.mtime_ns, md.block_size, md.file_id)
        # Refused before any data moves: a rename could never replace a directory (or FIFO,
        # socket, device) at the final name.
        check_final(final)
        lock: NameLock | None = None
        with self._lock:
            old = self._active.get(final)
            if old is _RESERVED or (old is not None and old.md.file_id != md.file_id):
                raise RejectedError(f"a transfer of {name} is already in progress")
            self._active[final] = _RESERVED
            if old is not None:
                lock, old.name_lock = old.name_lock, None  # the name stays locked, by us now
        if old is not None:
            # The same source again: a reconnect of the same run, or a sender restarted after a
            # crash before this receiver noticed the old connection die. The old session gives
            # way (both would write the very same bytes).
            old.superseded = True
            self._abort(old, discard=False, release_name=False)
            try:
                old.control.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            if lock is None:
                # Another receiver (process) writing this name into the same destination
                # holds it: retryable, the sender backs off and comes back.
                lock = NameLock.acquire(self.dest, name)
            inc = self._open_partial(md, session, fs, ident, final, names.part, names.state)
        except BaseException:
            if lock is not None:
                lock.release()
            with self._lock:
                self._active.pop(final, None)
            raise
        inc.name_lock = lock
        with self._lock:
            self._active[final] = inc
            self._sessions[session.session_id] = inc
        return inc

    def _open_partial(
        self,
        md: Metadata,
        session: SessionKeys,
        fs: FramedSocket,
        ident: Identity,
        final: Path,
        part: Path,
        statep: Path,
    ) -> _Incoming:
        parsed = load_state(statep)
        part_fd = -1
        resumable = False
        if parsed is not None and parsed.identity == ident and parsed.ours:
            # Only files this receiver made are resumed from: a regular file, one link, ours.
            got = open_ours(part)
            if got is not None and got[1].st_size == md.size:
                part_fd, resumable = got[0], True
            elif got is not None:
                os.close(got[0])
        if parsed is not None and not resumable:
            reason = (
                "the source changed since the partial copy was made"
                if parsed.identity != ident
                else "the partial file is missing, has the wrong size or is not the receiver's own"
            )
            self._event("restarting", file=ident.name, reason=reason)
        received = bytearray(md.total_blocks)
        digests = bytearray(md.total_blocks * BLOCK_DIGEST_LEN)
        recent = None if resumable else self._just_completed(final, ident)
        complete = recent is not None
        log: StateLog | NullLog
        try:
            if recent is not None:
                received = bytearray(b"\x01" * md.total_blocks)
                digests = bytearray(recent.digests)
                log = NullLog()
            elif resumable:
                assert parsed is not None
                log = StateLog.reopen(statep, parsed)
                received, digests = parsed.have, parsed.digests
            else:
                _unlink(statep)
                _unlink(part)  # a straggling writer keeps the old inode, never the new file
                free = _free_bytes(self.dest)
                if md.size > free:
                    raise RejectedError(
                        f"not enough space for {ident.name}: {md.size} bytes needed, {free} free"
                    )
                made = _create_preallocated(part, md.size)
                got = open_ours(part)
                if got is not None and (got[1].st_dev, got[1].st_ino) == (made.st_dev, made.st_ino):
                    part_fd = got[0]
                else:
                    if got is not None:
                        os.close(got[0])
                    raise OSError(errno.ESTALE, "the new partial file was replaced at once")
                log = StateLog.create(statep, ident)
        except OSError as exc:
            if part_fd >= 0:
                os.close(part_fd)
            if not resumable:
                _unlink(part)
                _unlink(statep)
            raise _disk_error(exc, f"cannot prepare {part.name}") from None
        except BaseException:
            if part_fd >= 0:
                os.close(part_fd)
            raise
        return _Incoming(
            md=md,
            session=session,
            final=final,
            part=part,
            state=statep,
            log=log,
            identity=ident,
            started=time.monotonic(),
            received=received,
            digests=digests,
            count=sum(received),
            control=fs,
            resumed_bytes=held_bytes(received, size=md.size, block_size=md.block_size),
            initial=[
                (i, bytes(digests[i * BLOCK_DIGEST_LEN : (i + 1) * BLOCK_DIGEST_LEN]))
                for i, v in enumerate(received)
                if v
            ],
            already_complete=complete,
            part_fd=part_fd,
        )

    def _remember(self, inc: _Incoming, digest: bytes) -> None:
        if inc.md.total_blocks > RECENT_MAX_BLOCKS:
            return
        with self._lock:
            self._recent[inc.final] = _Recent(inc.identity, bytes(inc.digests))
            self._recent.move_to_end(inc.final)
            while len(self._recent) > RECENT_KEEP:
                self._recent.popitem(last=False)

    def _just_completed(self, final: Path, ident: Identity) -> _Recent | None:
        """The remembered completion of this very transfer, if the file is still as we left it."""
        with self._lock:
            recent = self._recent.get(final)
        if recent is None or recent.identity != ident:
            return None
        try:
            st = os.stat(final, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size != ident.size or st.st_mtime_ns != ident.mtime_ns:
            return None
        return recent

    def _await_end(self, fs: FramedSocket, channel: ControlChannel, inc: _Incoming) -> End:
        fs.sock.settimeout(None)
        while True:
            with inc.cond:
                if inc.failure is not None:
                    raise inc.failure
                idle = time.monotonic() - inc.active_at
            if idle > self.stall_timeout:
                # Retryable: a sender that was only paused reconnects and resumes.
                raise ConnectError(
                    f"stalled: no block and no control frame from the sender for {idle:.0f} s"
                    f" (stall timeout {self.stall_timeout:g} s)"
                )
            if self._stopping.is_set():
                raise ConnectError("receiver shutting down")
            readable, _, _ = select.select([fs.sock], [], [], 0.2)
            if readable:
                break
        with inc.cond:
            inc.active_at = time.monotonic()
        try:
            ftype, payload = fs.recv_frame(cap=_end_cap)
        except ConnectError:
            # A sender that hung up may have done so because a worker of ours just refused a
            # forged block: give that report a moment, so the forgery is what gets judged.
            with inc.cond:
                inc.cond.wait_for(lambda: inc.failure is not None, timeout=0.1)
                if inc.failure is not None:
                    raise inc.failure from None
            raise
        if ftype is FrameType.ERROR:
            raise ConnectError("sender aborted the transfer")
        if ftype is not FrameType.END:
            raise ProtocolError(f"expected END, got {ftype.name}")
        return End.decode(channel.open(ftype, payload))

    def _finish(self, inc: _Incoming, end: End) -> ReceivedFile:
        md = inc.md
        if end.total_blocks != md.total_blocks:
            raise ProtocolError("END names a different number of blocks")
        deadline = time.monotonic() + COMPLETE_TIMEOUT
        with inc.cond:
            while inc.count < md.total_blocks and inc.failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    # Acknowledged but never recorded (a worker died between its ACK and its
                    # report): a reconnect shows the sender the true bitmap.
                    missing = md.total_blocks - inc.count
                    raise ConnectError(f"{missing} blocks are missing at END; resend them")
                inc.cond.wait(min(left, 0.5))
            if inc.failure is not None:
                raise inc.failure
        digest = file_digest(block_digests=inc.digests, block_size=md.block_size, size=md.size)
        if digest != end.digest:
            raise DigestMismatch(f"whole-file digest mismatch for {inc.final.name}")
        try:
            with inc.cond:  # the partial's descriptor stays open while it is used (_abort)
                if inc.closed:
                    raise ConnectError(f"the transfer of {inc.final.name} was taken over")
                if not inc.already_complete:
                    # By the descriptor kept since admission: the inode renamed is the one the
                    # blocks were recorded for, or the transfer fails (PartialGone).
                    _finish_file(
                        Names.of(self.dest, inc.final.name),
                        inc.part_fd,
                        mode=0o666 & ~self._umask,
                        mtime_ns=md.mtime_ns,
                    )
                inc.log.close()
                inc.close_partial()
            _unlink(inc.state)
        except OSError as exc:
            raise _disk_error(exc, f"cannot finish {inc.final.name}") from None
        self._remember(inc, digest)
        self._forget(inc)
        return ReceivedFile(
            path=os.fspath(inc.final),
            name=inc.final.name,
            size=md.size,
            digest=digest.hex(),
            seconds=time.monotonic() - inc.started,
            blocks_total=md.total_blocks,
            streams=len(inc.streams),
            bytes_resumed=inc.resumed_bytes,
        )

    def _forget(self, inc: _Incoming, *, release_name: bool = True) -> None:
        """Drop the session; with ``release_name``, free its file's name (and the lock on it in
        the destination, the lock file removed) unless a newer session took it over."""
        with self._lock:
            self._sessions.pop(inc.session.session_id, None)
            if release_name and self._active.get(inc.final) is inc:
                del self._active[inc.final]
                lock, inc.name_lock = inc.name_lock, None
                if lock is not None:
                    lock.release()

    def _abort(
        self,
        inc: _Incoming,
        *,
        discard: bool,
        revert: bool = False,
        release_name: bool = True,
        gone: bool = False,
    ) -> None:
        """End a session. Its partial file and state stay for a resume unless ``discard``;
        ``revert`` forgets what this session recorded (the state it was admitted with);
        ``gone``: the partial file is no longer the one written, so its state log goes (and
        the path, someone else's now, is left alone). The files are dealt with before the name
        (and its lock) is released: nobody else may see them half-way."""
        if self._pool is not None:
            self._pool.cancel(inc.session.session_id)
        with self._lock:
            self._sessions.pop(inc.session.session_id, None)
        with inc.cond:
            inc.log.close()
            inc.closed = True  # late reports of this session are ignored from now on
            inc.close_partial()
        if gone:
            _unlink(inc.state)
        elif discard:
            _unlink(inc.part)
            _unlink(inc.state)
        elif revert:
            try:
                StateLog.rewrite(inc.state, inc.identity, inc.initial).close()
            except OSError:
                _unlink(inc.state)  # no state at all is safe: the next run starts over
        self._forget(inc, release_name=release_name)


@dataclass(frozen=True)
class _StreamTarget:
    session_id: bytes
    stream: int
    secret: bytes
    path: str
    md: Metadata
    inode: tuple[int, int] | None


def _inode_of(fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of an open descriptor (None for none: a completed file)."""
    if fd < 0:
        return None
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class DigestMismatch(IntegrityError):
    """The whole-file digest did not match: no block of the partial can be trusted."""


def _metadata_cap(ftype: FrameType) -> int:
    return MAX_NAME_BYTES + 512 if ftype is FrameType.METADATA else -1


def _end_cap(ftype: FrameType) -> int:
    return MAX_HANDSHAKE_PAYLOAD if ftype in (FrameType.END, FrameType.ERROR) else -1


def _send_error(
    fs: FramedSocket, exc: StxError, *, generic: bool, channel: ControlChannel | None = None
) -> None:
    """Tell the peer why, if the connection still works (ConnectError-coded errors make the
    sender reconnect and retry; every other code ends the transfer). Once a session exists the
    ERROR is sealed: its text may name the file."""
    message = error_text(exc, generic=generic)
    code = exc.wire_code
    body = ErrorMsg(code, message).encode()
    try:
        if channel is not None:
            fs.send(channel.seal(FrameType.ERROR, body))
        else:
            fs.send(encode_frame(FrameType.ERROR, body))
    except StxError:
        pass


def _now_ms() -> int:
    return int(time.time() * 1000)
