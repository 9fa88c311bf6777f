"""The control handler: drives one receiving session core over its control connection.

Theory of operation
-------------------
``Receiver`` runs one ``ControlHandler`` in a thread of its own per authenticated control
connection. The handler reads METADATA (within ``handshake_timeout``), then waits on two
things at once: the control socket (END, ERROR) and a wake-up descriptor, which the report
router's thread (``SessionRegistry.deliver``), a superseding session and the receiver's stop
all signal. Whatever happens is fed to the ``ReceiverSession`` core with the clock, and the
core's outputs are carried out at once, in order: frames sent, file effects through
``partials``, names and completions through the ``SessionRegistry``, streams cancelled through
the worker pool (``cancel(session_id)``, ``cancel_later(session_id)``), events reported.
While the core waits for END's last blocks it does not read the socket, as before.

With helpers (``recv_cluster``), admission first waits for ``cluster_workers`` remote worker
processes (at most ``cluster_wait`` s), then asks the cluster to route the session's streams
(``Admitted.routes``: a ROUTES frame before METADATA_ACK); ``reroute`` (a helper joined or
died, from the cluster's thread) sends new ones, and the local port refuses a JOIN for a
stream routed to a helper (``routed_away``).

Another thread touches a handler only through ``deliver``, ``reroute``, ``supersede`` and ``stop``; the
files of the session are guarded by ``lock`` (a superseding session closes them at once, so
that it may reopen the state log itself).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import layout as layout_file
from . import partials, treefiles
from .blocks import BlockLedger
from .destination import NameLock, Names, check_final, disk_error, make_subdir, safe_name
from .errors import ConnectError, RejectedError, StxError, error_from_wire
from .gcpause import no_collection
from .keyschedule import SessionKeys
from .manifest import Limits
from .messages import Landed, StreamFailed
from .netio import FramedSocket
from .recv_session import (
    Admit,
    Admitted,
    Appended,
    AppendFailed,
    AppendLog,
    BlocksLanded,
    CancelStreams,
    CheckPartial,
    Completed,
    EndFiles,
    Event,
    Finalize,
    Finalized,
    FinalizeFailed,
    PartialChecked,
    ReceiverSession,
    Refused,
    Reroute,
    State,
    Stopping,
    StreamBroke,
    Superseded,
)
from .registry import ReceivedFile, SessionRegistry
from .session_base import ConnectionLost, Failed, FrameIn, Input, Output, SendFrame, Succeeded, Tick
from .transfer import Transfer
from .wire import Routes, printable

#: Seconds one send on a control connection may block (the peer is authenticated by then).
SEND_TIMEOUT = 120.0

EventFn = Callable[[str, dict[str, Any]], None]


class Pool(Protocol):
    def cancel(self, session_id: bytes) -> None: ...

    def cancel_later(self, session_id: bytes) -> None: ...

    def prepare(self, session_id: bytes, layout: str, streams: int) -> None: ...


class Cluster(Protocol):
    """A receiver's helpers (``recv_cluster.RecvCluster``), as a session uses them."""

    def wait_workers(self, want: int, wait_s: float) -> int: ...

    def plan(
        self,
        session: Any,
        keys: SessionKeys,
        md: Transfer,
        *,
        path: str,
        tree: bool,
        layout: str,
        inode: tuple[int, int] | None,
        sync_bytes: int,
    ) -> Routes | None: ...

    def hosts(self, session_id: bytes) -> dict[str, int]: ...


class ControlHandler:
    """One authenticated control connection, from METADATA on (``run``)."""

    def __init__(
        self,
        fs: FramedSocket,
        keys: SessionKeys,
        peer: tuple[Any, ...],
        *,
        dest: Path,
        registry: SessionRegistry,
        pool: Pool,
        stall_timeout: float,
        handshake_timeout: float,
        mode: int,
        on_event: EventFn,
        on_done: Callable[[], None],
        workdir: str = "",
        limits: Limits | None = None,
        no_subdirs: bool = False,
        cluster: Cluster | None = None,
        cluster_workers: int = 0,
        cluster_wait: float = 30.0,
        sync_bytes: int = 0,
    ) -> None:
        self.fs = fs
        self.cluster = cluster
        self.cluster_workers = cluster_workers
        self.cluster_wait = cluster_wait
        self.sync_bytes = sync_bytes
        #: where the sender's streams go (None: all here); replaced by ``reroute``
        self.routes: Routes | None = None
        self.no_subdirs = no_subdirs
        self.keys = keys
        self.session_id = keys.session_id
        self.dest = dest
        self.registry = registry
        self.pool = pool
        self.handshake_timeout = handshake_timeout
        self.mode = mode
        self.on_event = on_event
        self.on_done = on_done
        self.workdir = workdir
        self.core = ReceiverSession(
            keys, peer=peer[0], stall_timeout=stall_timeout, now=time.monotonic(), limits=limits
        )
        self._layout = ""
        self.lock = threading.Lock()
        self.streams: set[int] = set()
        self._opened: partials.Opened | treefiles.TreeOpened | None = None
        self._final: Path | None = None
        self._reports: deque[Landed | StreamFailed | Routes] = deque()
        self._wake_r = self._wake_w = -1
        self._superseded = False
        self._stopping = False
        self._files_closed = False

    # ------------------------------------------------------------ what the registry uses

    @property
    def md(self) -> Transfer:
        assert self.core.md is not None
        return self.core.md

    @property
    def opened(self) -> partials.Opened | treefiles.TreeOpened:
        assert self._opened is not None
        return self._opened

    @property
    def files(self) -> Any:
        """The module that keeps this session's files: ``treefiles`` or ``partials``."""
        return treefiles if isinstance(self._opened, treefiles.TreeOpened) else partials

    def data_target(self) -> tuple[str, bool, str, tuple[int, int] | None]:
        """For a data stream's worker: where blocks land (the partial, or the tree's staging
        directory), whether it is a tree, the layout file, and the inode it must be."""
        opened = self.opened
        if isinstance(opened, treefiles.TreeOpened):
            return os.fspath(opened.staging), True, self._layout, opened.inode()
        return os.fspath(opened.names.part), False, self._layout, opened.inode()

    def deliver(self, report: Landed | StreamFailed) -> None:
        """From the report router's thread."""
        self._reports.append(report)
        self._poke()

    def reroute(self, routes: Routes) -> None:
        """From the cluster's thread: streams go there from now on (a helper joined or
        died)."""
        self.routes = routes
        self._reports.append(routes)
        self._poke()

    def streams_here(self) -> set[int]:
        """From the cluster's thread: the stream ids whose JOIN this receiver's port took."""
        with self.lock:
            return set(self.streams)

    def routed_away(self, stream: int) -> bool:
        """Whether ``stream`` is routed to a helper (its JOIN must not be taken here)."""
        routes = self.routes
        return routes is not None and routes.place(stream) is not None

    def supersede(self) -> None:
        """From the thread of the session that takes over: this one ends now, quietly; its
        files are closed (not removed) and its streams cancelled before this returns."""
        with self.lock:
            self._superseded = True
            self._close_files()
        self.pool.cancel(self.session_id)
        with contextlib.suppress(OSError):
            self.fs.sock.shutdown(socket.SHUT_RDWR)
        self._poke()

    def stop(self) -> None:
        """The receiver stops: end as a lost connection would (partial and state kept)."""
        self._stopping = True
        self._poke()
        with contextlib.suppress(OSError):
            self.fs.sock.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------ the thread

    def run(self) -> None:
        """Serve the session to its end. StxError for a session refused before admission
        (the peer was told why); any other end is reported as an event."""
        try:
            self._serve()
        finally:
            if self._opened is not None and not self._files_closed:
                # Ended by an internal fault: keep the files for a resume, free the name.
                self.pool.cancel(self.session_id)
                self.registry.drop(self)
                with self.lock:
                    self._close_files()
                assert self._final is not None
                self.registry.forget(self, self._final)
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            if self._layout:
                with contextlib.suppress(OSError):
                    os.unlink(self._layout)
        if self._failure is not None:
            raise self._failure

    _failure: StxError | None = None

    def _serve(self) -> None:
        fs, core = self.fs, self.core
        fs.deadline = time.monotonic() + self.handshake_timeout
        try:
            ftype, payload = fs.recv_frame(cap=core.frame_cap)
        except StxError as exc:
            self._feed(ConnectionLost(exc))
            return
        fs.deadline = None
        fs.sock.settimeout(SEND_TIMEOUT)  # a large resume bitmap may take a while to send
        with no_collection():  # METADATA: the manifest's entries come next
            self._feed(FrameIn(ftype, payload))
        if core.terminal:
            return
        fs.sock.settimeout(None)
        while not core.terminal:
            readable = self._wait()
            self._feed(Tick(time.monotonic()))
            self._drain()
            if self._superseded:
                self._feed(Superseded())
            elif self._stopping:
                self._feed(Stopping())
            if readable and core.reads_frames:
                try:
                    ftype, payload = fs.recv_frame(cap=core.frame_cap)
                except StxError as exc:
                    self._feed(ConnectionLost(exc))
                else:
                    # A chunk of entries checked (with the last, the manifest built and the
                    # transfer admitted) makes objects that all live on: nothing to collect.
                    manifest = core.state is State.WAIT_MANIFEST
                    with no_collection() if manifest else contextlib.nullcontext():
                        self._feed(FrameIn(ftype, payload))

    def _wait(self) -> bool:
        """Until the socket is readable (True), a wake-up or the core's next deadline."""
        deadline = self.core.deadline()
        timeout_ms = (
            None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        )
        poller = select.poll()  # not select(): descriptors above 1023 are fine
        if self._wake_r >= 0:  # (made at admission; the manifest is read before)
            poller.register(self._wake_r, select.POLLIN)
        sock = self.fs.sock.fileno()
        if self.core.reads_frames and sock >= 0:
            poller.register(sock, select.POLLIN)
        try:
            ready = {fd for fd, _ in poller.poll(timeout_ms)}
        except OSError:
            return True  # reading the socket says what is wrong
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        return sock in ready or sock < 0

    def _poke(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def _drain(self) -> None:
        while self._reports and not self.core.terminal:
            report = self._reports.popleft()
            if isinstance(report, Routes):
                self._feed(Reroute(report))
            elif isinstance(report, Landed):
                self._feed(BlocksLanded(report.blocks))
            else:
                error = type(error_from_wire(report.code, report.message))(report.message)
                self._feed(StreamBroke(error))

    # ------------------------------------------------------------ outputs

    def _feed(self, event: Input) -> None:
        for out in self.core.handle(event):
            self._do(out)

    def _do(self, out: Output) -> None:
        if isinstance(out, SendFrame):
            try:
                self.fs.send(out.data)
            except StxError as exc:
                if self.core.state in (State.RECEIVING, State.WAIT_METADATA):
                    self._feed(ConnectionLost(exc))
                # else: the sender is gone; an ERROR or RECEIPT it misses changes nothing
        elif isinstance(out, AppendLog):
            self._append(out.blocks)
        elif isinstance(out, Event):
            self._event(out.kind, out.fields)
        elif isinstance(out, Admit):
            self._admit(out.md)
        elif isinstance(out, Finalize):
            self._finalize()
        elif isinstance(out, CancelStreams):
            if out.later:
                self.pool.cancel_later(self.session_id)
            else:
                self.pool.cancel(self.session_id)
        elif isinstance(out, CheckPartial):
            self._feed(PartialChecked(self.files.gone(self.opened)))
        elif isinstance(out, EndFiles):
            self._end_files(out)
        elif isinstance(out, Completed):
            self._completed(out.digest)
        elif isinstance(out, Failed):
            if not self.core.admitted:
                self._failure = out.error
        elif isinstance(out, Succeeded):
            self.on_done()

    def _event(self, kind: str, fields: dict[str, Any]) -> None:
        try:
            self.on_event(kind, fields)
        except Exception:  # a faulty callback must not take the receiver down
            pass

    def _admit(self, md: Transfer) -> None:
        if self.cluster is not None and self.cluster_workers:
            have = self.cluster.wait_workers(self.cluster_workers, self.cluster_wait)
            if have < self.cluster_workers:
                self._event(
                    "cluster_short",
                    {"want": self.cluster_workers, "got": have, "wait": self.cluster_wait},
                )
        try:
            self.dest = landing_dir(self.dest, md, no_subdirs=self.no_subdirs)
            final, opened = admit(self.dest, md, self.registry, on_event=self._event)
        except StxError as exc:
            self._feed(Refused(exc))
            return
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:  # out of descriptors
            opened.close()
            self.registry.unreserve(final)
            self._feed(Refused(ConnectError(f"receiver busy: {exc.strerror}")))
            return
        if not opened.complete and self.workdir:
            # Every worker of the session reads where each block goes from here.
            self._layout = os.path.join(self.workdir, f"layout-{self.session_id.hex()}")
            try:
                layout_file.write(self._layout, self._plan(md, opened))
                self.pool.prepare(self.session_id, self._layout, md.streams)
            except OSError as exc:
                self._layout = ""
                opened.close()
                self.registry.unreserve(final)
                self._feed(Refused(disk_error(exc, "cannot describe the transfer")))
                return
        self._opened, self._final = opened, final
        self.registry.activate(final, self)
        if self.cluster is not None and not opened.complete and self._layout:
            path, tree, _, inode = self.data_target()
            try:
                self.routes = self.cluster.plan(
                    self,
                    self.keys,
                    md,
                    path=path,
                    tree=tree,
                    layout=self._layout,
                    inode=inode,
                    sync_bytes=self.sync_bytes,
                )
            except OSError as exc:
                self._event("warning", {"message": f"no helpers for this transfer: {exc}"})
        self._feed(Tick(time.monotonic()))  # the transfer's time and stall clock start now
        self._feed(Admitted(md.name, opened.ledger, opened.complete, routes=self.routes))

    @staticmethod
    def _plan(md: Transfer, opened: partials.Opened | treefiles.TreeOpened) -> bytes:
        """The session's layout file (``layout.receiver_bytes``): per entry with data, its
        partial's name and the size, mtime and mode of the finished file."""
        entries = md.manifest.entries
        key, name = md.manifest.key, treefiles.partial_name
        index = [i for i, e in enumerate(entries) if e.extents]
        return layout_file.receiver_bytes(
            md.block_size,
            [e.extents for e in entries],
            index,
            [name(key(i)) for i in index],
            [entries[i].size for i in index],
            [entries[i].mtime_ns for i in index],
            [entries[i].mode for i in index],
        )

    def _append(self, blocks: list[tuple[int, bytes]]) -> None:
        failed: StxError | None = None
        with self.lock:
            if self._files_closed:
                return  # superseded: late reports are ignored
            try:
                if blocks:
                    self.opened.log.append(blocks)  # the blocks are durable; now say so
            except OSError as exc:
                failed = disk_error(exc, "cannot record progress")
        self._feed(Appended(blocks) if failed is None else AppendFailed(failed))

    def _finalize(self) -> None:
        try:
            with self.lock:  # the partial's descriptor stays open while it is used
                if self._superseded:
                    raise ConnectError(f"the transfer of {self.core.name} was taken over")
                self.files.finalize(self.opened, mode=self.mode)
                self._files_closed = True
        except StxError as exc:
            self._feed(Superseded() if self._superseded else FinalizeFailed(exc))
            return
        self._feed(Finalized())

    def _completed(self, digest: bytes) -> None:
        opened, md = self.opened, self.md
        assert self._final is not None
        ledger: BlockLedger = opened.ledger
        self.registry.remember(self._final, opened.identity, ledger)
        self.registry.forget(self, self._final)
        with self.lock:
            streams = len(self.streams)
        hosts: dict[str, int] | None = None
        if self.cluster is not None:
            hosts = {socket.gethostname() or "localhost": streams}
            for host, n in self.cluster.hosts(self.session_id).items():
                hosts[host] = hosts.get(host, 0) + n
            streams = sum(hosts.values())
        manifest = md.manifest
        where = self._final
        if manifest.single() is None:  # a tree: where its one top-level entry is, or DEST
            where = self.dest / manifest.roots[0] if len(manifest.roots) == 1 else self.dest
        received = ReceivedFile(
            path=os.fspath(where),
            name=md.name,
            size=md.size,
            files=manifest.files,
            dirs=manifest.dirs,
            symlinks=manifest.symlinks,
            digest=digest.hex(),
            seconds=time.monotonic() - self.core.started,
            blocks_total=md.total_blocks,
            streams=streams,
            bytes_resumed=self.core.resumed_bytes,
            peer=self.core.peer,
            hosts=hosts,
        )
        # Complete, durable and renamed: recorded and reported before it is acknowledged, so
        # a receiver killed after the RECEIPT has always reported the file. A sender that
        # misses the RECEIPT reconnects and is told the file is complete.
        self.registry.completed.append(received)
        self._event("received", received.as_json())

    def _end_files(self, out: EndFiles) -> None:
        """The files are dealt with before the name (and its lock) is released: nobody else
        may see them half-way."""
        self.registry.drop(self)
        with self.lock:
            if not self._superseded:
                self._close_files()
                self.files.end(self.opened, out.how, out.initial)
        assert self._final is not None
        self.registry.forget(self, self._final)

    def _close_files(self) -> None:
        if self._opened is not None:
            self._opened.close()
        self._files_closed = True


def landing_dir(dest: Path, md: Transfer, *, no_subdirs: bool) -> Path:
    """Where the transfer lands: ``dest``, or ``dest/SUBDIR`` made for ``stx send --to``
    (``destination.make_subdir``: no symlink followed on the way). RejectedError when the
    receiver forbids ``--to`` and ``--as`` (``no_subdirs``) and the sender used one."""
    header = md.header
    if no_subdirs and (header.subdir or header.renamed):
        used = "--to" if header.subdir else "--as"
        raise RejectedError(
            f"this receiver takes no {used} (stx recv --no-subdirs): send without it"
        )
    if not header.subdir:
        return dest
    return make_subdir(dest, header.subdir)


def admit(
    dest: Path, md: Transfer, registry: SessionRegistry, *, on_event: EventFn
) -> tuple[Path, partials.Opened | treefiles.TreeOpened]:
    """Admission (docs/protocol.md §8.3, steps 1-5): the final path (a tree: its staging
    directory), reserved (a session of the same source superseded), locked, and the session's
    files; StxError with the name released otherwise. The caller activates the session in the
    registry."""
    if md.manifest.single() is None:
        return _admit_tree(dest, md, registry, on_event=on_event)
    name = safe_name(md.name)
    names = Names.of(dest, name)
    # Refused before any data moves: a rename could never replace a directory (or FIFO,
    # socket, device) at the final name.
    check_final(names.final)
    old = registry.reserve(names.final, md.file_id, name)
    if old is not None:
        # The same source again: a reconnect of the same run, or a sender restarted after a
        # crash before this receiver noticed the old connection die. The old session gives
        # way (both would write the very same bytes); its name lock is ours now.
        old.supersede()
    try:
        if not registry.has_lock(names.final):
            # Another receiver (process) writing this name into the same destination holds
            # it: retryable, the sender backs off and comes back.
            registry.set_lock(names.final, NameLock.acquire(dest, name))
        opened = partials.open_partial(
            dest,
            md,
            names,
            remembered=lambda ident: registry.remembered(names.final, ident),
            on_restart=lambda why: on_event("restarting", {"file": name, "reason": why}),
        )
    except BaseException:
        registry.unreserve(names.final)
        raise
    return names.final, opened


def _admit_tree(
    dest: Path, md: Transfer, registry: SessionRegistry, *, on_event: EventFn
) -> tuple[Path, treefiles.TreeOpened]:
    """Admission of a tree: keyed by its staging directory, every top-level name locked."""
    roots = md.manifest.roots
    key = dest / treefiles.staging_name(roots)
    old = registry.reserve(key, md.file_id, md.name)
    if old is not None:
        old.supersede()  # the same sources again (a reconnect): the old session gives way
    try:
        if not registry.has_lock(key):
            registry.set_lock(key, RootLocks.acquire(dest, roots))
        opened = treefiles.open_tree(
            dest,
            md.manifest,
            remembered=lambda ident: registry.remembered(key, ident),
            on_restart=lambda why: on_event("restarting", {"file": md.name, "reason": why}),
        )
    except OSError as exc:
        registry.unreserve(key)
        raise disk_error(exc, f"cannot prepare {printable(md.name)}") from None
    except BaseException:
        registry.unreserve(key)
        raise
    return key, opened


class RootLocks:
    """The name locks of every top-level name of a tree, taken in a fixed order."""

    def __init__(self, locks: list[NameLock]) -> None:
        self.locks = locks

    @classmethod
    def acquire(cls, dest: Path, roots: tuple[str, ...]) -> RootLocks:
        taken: list[NameLock] = []
        try:
            for root in sorted(set(roots)):
                taken.append(NameLock.acquire(dest, root))
        except BaseException:
            for lock in taken:
                lock.release()
            raise
        return cls(taken)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
