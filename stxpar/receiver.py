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
digest, fsyncs, renames the partial file to its final name and sends the RECEIPT. A failure
keeps the partial file for a resume (or removes it when its blocks cannot be trusted): nothing
half-written ever takes the final name.

``Receiver`` is the façade over the parts that do this: the gatekeeper (listening,
pre-authentication), the session registry, one control handler per session (driving the pure
session core), the worker pool and its report router.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import zmq

from . import destination, handshake, ipc, treefiles
from .channel import report_pull, report_push
from .config import DEFAULT_MAX_STREAMS as DEFAULT_MAX_STREAMS
from .config import DEFAULT_MAX_WORKER_STREAMS as DEFAULT_MAX_WORKER_STREAMS
from .config import DEFAULT_STALL_TIMEOUT as DEFAULT_STALL_TIMEOUT
from .config import DEFAULT_SYNC_BYTES as DEFAULT_SYNC_BYTES
from .config import WORKER_TIMEOUT as WORKER_TIMEOUT
from .config import RecvOptions
from .control import ControlHandler
from .destination import LOCK_SUFFIX as LOCK_SUFFIX
from .destination import PART_SUFFIX as PART_SUFFIX
from .destination import STATE_SUFFIX as STATE_SUFFIX
from .destination import check_dest
from .destination import safe_name as safe_name
from .errors import ConnectError, StxError, UsageError
from .fsutil import process_umask
from .gatekeeper import Gatekeeper, GateLimits, hand_over
from .handshake import ReplayCache, keyring_for
from .keyschedule import SessionKeys
from .manifest import Limits
from .netio import FramedSocket, listen_all
from .placement import FINISHED_GRACE_S as FINISHED_GRACE_S
from .placement import WORKER_QUIET_S as WORKER_QUIET_S
from .placement import WORKER_START_S as WORKER_START_S
from .placement import ReportRouter
from .recv_cluster import RecvCluster
from .recv_session import DigestMismatch as DigestMismatch
from .recvpool import SPAWN_DESCRIPTORS as SPAWN_DESCRIPTORS
from .recvpool import ReceiverPool, route_reports
from .registry import COMPLETED_KEEP, CompletedList, SessionRegistry
from .registry import ReceivedFile as ReceivedFile
from .state import Partial
from .state import load as load_state  # noqa: F401  (tests count its calls)
from .wire import Join

#: on_event(kind, fields): "listening", "accepted", "received", "failed", "rejected", "dropped",
#: "warning".
EventFn = Callable[[str, dict[str, Any]], None]


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
        #: The cluster port's keys come from the first key (helpers hold that one).
        self._cluster_psk = bytes(psks[0])
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
        #: Active sessions, names, recent completions (``registry.snapshot()`` for tests).
        self.registry = SessionRegistry(completed_keep=COMPLETED_KEEP)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listeners: list[socket.socket] = []
        self._gate: Gatekeeper | None = None
        self._pool: ReceiverPool | None = None
        self._zctx: zmq.Context | None = None
        self._workdir = ""
        self._report_ep = ""
        self._umask = process_umask()  # read once, here
        self.dropped_streams = 0
        #: The helpers' port (``RecvOptions.cluster``), once started.
        self.cluster: RecvCluster | None = None

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
        held = self.registry.snapshot()
        sessions, names = held["sessions"], tuple(held["names"])
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
        o = self.options
        self._check_dest()
        self._listeners = listen_all(self.host, self.port)
        handshake.warm_up()  # before the first sender, not in its handshake
        try:
            ipc.remove_stale_dirs()
            self._workdir = ipc.private_dir("stx-recv-")
            self._zctx = zmq.Context()
            report_ep = self._report_ep = f"ipc://{self._workdir}/report"
            pull = report_pull(self._zctx, report_ep)
            self._pool = ReceiverPool(
                self.workers,
                report_ep,
                max_streams=self.max_streams,
                max_worker_streams=self.max_worker_streams,
                stuck_after=self.worker_timeout,
                sync_bytes=self.sync_bytes,
                on_event=self._event,
            )
            self._pool.set_limit(self.options.limit_rate)
            router = ReportRouter(self._pool.released, self.registry.deliver)
            t = threading.Thread(
                target=route_reports, args=(pull, router, self._pool, self._stopping), daemon=True
            )
            t.start()
            self._threads.append(t)
            if o.cluster is not None:
                self.cluster = RecvCluster(
                    o.cluster,
                    psk=self._cluster_psk,
                    local_workers=self.workers,
                    deliver=self.registry.deliver,
                    on_event=lambda kind, fields: self._event(kind, **fields),
                )
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
            limit_rate=self.options.limit_rate,
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
        if self.cluster is not None:
            self.cluster.close()
        if self._pool is not None:
            for sid in self.registry.session_ids():
                self._pool.cancel(sid)
            self._pool.stop()
        self._wake_reports()
        for t in self._threads:
            t.join(timeout=5)
        if self._zctx is not None:
            self._zctx.destroy(linger=0)
        ipc.remove_dir(self._workdir)

    def _wake_reports(self) -> None:
        """Wake the report thread at once (it waits up to 0.2 s for a report before it looks
        at ``_stopping``): one empty report, from a socket of this thread's own."""
        if self._zctx is None or not self._report_ep:
            return
        with contextlib.suppress(zmq.ZMQError):
            push = report_push(self._zctx, self._report_ep)
            push.send(b"", zmq.NOBLOCK)
            push.close(linger=100)

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

    def set_keys(self, psk: bytes | Sequence[bytes]) -> None:
        """Accept these pre-shared keys (one, or several during a rotation) for every new
        connection from now on. Transfers in progress keep going: their session keys were
        derived at their handshake. UsageError for a key shorter than 256 bits."""
        psks = [psk] if isinstance(psk, bytes | bytearray) else list(psk)
        if not psks or any(len(k) < 32 for k in psks):
            raise UsageError("a receiver needs at least one key of at least 256 bits")
        self._keyring = keyring_for([bytes(k) for k in psks])
        if self._gate is not None:
            self._gate.set_keyring(self._keyring)

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
            pool: Any = self._pool
            if self.cluster is not None:
                pool = _BothPools(self._pool, self.cluster)
            ControlHandler(
                fs,
                session,
                peer,
                dest=self.dest,
                registry=self.registry,
                pool=pool,
                cluster=self.cluster,
                cluster_workers=self.options.cluster_workers,
                cluster_wait=self.options.cluster_wait,
                sync_bytes=self.sync_bytes,
                stall_timeout=self.stall_timeout,
                handshake_timeout=self.handshake_timeout,
                mode=0o666 & ~self._umask,
                on_event=lambda kind, fields: self._event(kind, **fields),
                on_done=self._done.set if self.once else lambda: None,
                workdir=self._workdir,
                limits=Limits(self.options.max_files, self.options.max_bytes),
                no_subdirs=self.options.no_subdirs,
            ).run()
        except StxError as exc:
            self._event("rejected", peer=peer[0], error=str(exc), code=exc.exit_code)
        except Exception as exc:  # never let one connection take the receiver down
            self._event(
                "rejected", peer=peer[0], error=f"internal error: {type(exc).__name__}", code=1
            )
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
        pool = self._pool
        assert pool is not None
        hand_over(fs, lambda sock: pool.hand_over_stream(target, sock))


class _BothPools:
    """The local worker pool and the helpers, as one session's ``control.Pool``."""

    def __init__(self, pool: ReceiverPool, cluster: RecvCluster) -> None:
        self.pool, self.cluster = pool, cluster

    def cancel(self, session_id: bytes) -> None:
        self.pool.cancel(session_id)
        self.cluster.cancel(session_id)

    def cancel_later(self, session_id: bytes) -> None:
        self.pool.cancel_later(session_id)
        self.cluster.cancel_later(session_id)

    def prepare(self, session_id: bytes, layout: str, streams: int) -> None:
        self.pool.prepare(session_id, layout, streams)  # (helpers have theirs in the plan)


def list_partials(dest: str | os.PathLike[str]) -> list[Partial]:
    """Partial transfers in ``dest`` (what a resume would continue): single files' partials,
    then trees' staging directories."""
    found = destination.list_partials(dest)
    return found + treefiles.find_trees(Path(dest), now=time.time())


def purge_partials(dest: str | os.PathLike[str], *, older_than_s: float) -> list[Partial]:
    """Remove partial transfers (files and trees) untouched for ``older_than_s`` seconds whose
    names no receiver holds now; return them."""
    removed = destination.purge_partials(dest, older_than_s=older_than_s)
    return removed + treefiles.purge_trees(Path(dest), older_than_s=older_than_s, now=time.time())
