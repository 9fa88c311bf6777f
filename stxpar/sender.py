"""Sender coordinator: handshake, metadata, a pool of worker processes, end and receipt.

Theory of operation
-------------------
The coordinator owns the control connection and the session keys. It never sends file data.
It starts its workers (``_Pool``) before it connects (the CLI forks its first ones even before
it reads the key: ``prestart_workers``), and binds two ZeroMQ sockets in a private
directory: a ROUTER on which workers ask for work (``hello`` -> ``setup``, ``get`` ->
``blocks [...]`` | ``done``) and a PULL on which they report (``acked`` with durable blocks and
their digests, ``sent`` with a worker's final count, ``retransmit``, ``error``). Work is a shared pull queue of block indices handed out in small batches, so a slow
stream never holds the tail. A block is complete when it is acknowledged as durable by the
receiver and its digest is known; when every needed block is complete the coordinator sends
END with the whole-file digest and succeeds only on a valid RECEIPT.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

from . import ipc
from .config import SendOptions, TransferResult, default_workers, is_loopback
from .digest import BLOCK_DIGEST_LEN, file_digest
from .errors import (
    ConnectError,
    IntegrityError,
    ProtocolError,
    StxError,
    UsageError,
    error_from_code,
    error_from_wire,
)
from .handshake import ClientHandshake, handshake_cap
from .keyschedule import SessionKeys
from .netio import FramedSocket, connect
from .records import ControlChannel
from .wire import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MAX_CONTROL_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    End,
    ErrorMsg,
    FrameType,
    Metadata,
    MetadataAck,
    Receipt,
    block_len,
    blocks_for,
    held_bytes,
)

#: progress(done_bytes, total_bytes): called from the coordinator's loop, a few times a second.
ProgressFn = Callable[[int, int], None]
#: on_event(kind, fields): "resuming" {have_bytes, bytes}; "reconnecting" {attempt, delay, reason}.
EventFn = Callable[[str, dict[str, Any]], None]
POLL_MS = 100
WORKER_EXIT_TIMEOUT = 10.0


def _control_cap(ftype: FrameType) -> int:
    if ftype in (FrameType.METADATA_ACK, FrameType.RECEIPT):
        return MAX_CONTROL_PAYLOAD
    if ftype is FrameType.ERROR:
        return MAX_HANDSHAKE_PAYLOAD
    return -1


def _check_kind(p: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise UsageError(f"{p} is a directory (stx sends one file)")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{p} is not a regular file")


#: What a worker says when the file at the source's name is not the one the transfer was
#: built from (exit 5).
REPLACED = "the source file was replaced during the transfer"


@dataclass
class SourceFile:
    """The file a transfer was built from, pinned by the descriptor the coordinator opened.

    Whoever can rename entries in the source's directory can put another file, or a symlink to
    one, under its name after the checks; a worker that opened the name again would send that
    file and the run would report success. So the name is resolved once, here (a symlink the
    user named is followed now and never again), the resolved path is opened with O_NOFOLLOW,
    and what was opened is recorded: (st_dev, st_ino) say which file, size, mtime and ctime
    what it held. Every worker opens ``real`` with O_NOFOLLOW and must find the same identity
    (workers/sender.py); ``check_unchanged`` compares the descriptor and the name again before
    each session and before END, so a file that changed or was replaced fails with exit 5
    before the receiver renames a copy into place.

    ``path`` is the name as given (the receiver gets its last component); ``close`` releases
    the descriptor.
    """

    path: Path
    real: str
    fd: int
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    file_id: bytes

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SourceFile:
        p = Path(path)
        real = os.path.realpath(p)
        try:
            _check_kind(p, os.stat(real).st_mode)  # never open a device or a FIFO at all
            # O_NONBLOCK: should a FIFO be put there now, the open must not hang on it.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"{p}: no such file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink appeared after realpath() resolved it
                raise UsageError(f"{p} changed while it was being opened") from None
            raise UsageError(f"{p}: cannot read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            _check_kind(p, st.st_mode)  # what was opened is what counts
        except BaseException:
            os.close(fd)
            raise
        # ctime too: a rewrite that puts the old mtime back still changes ctime, so a resume
        # never mixes blocks of two versions of the file (docs/resume.md).
        ident = (
            f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        ).encode()
        return cls(
            path=p,
            real=real,
            fd=fd,
            dev=st.st_dev,
            ino=st.st_ino,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            file_id=hashlib.sha256(ident).digest()[:16],
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_unchanged(self) -> None:
        """IntegrityError (exit 5) unless the opened file still has the size, mtime and ctime
        it had when the transfer was built, and its name (as given, and as resolved then)
        still names it."""
        # The name first: replacing it unlinks the file, which changes its ctime too, and
        # "replaced" is the better answer then.
        for name, follow in ((self.real, False), (os.fspath(self.path), True)):
            try:
                cur = os.stat(name, follow_symlinks=follow)
            except OSError:
                raise IntegrityError(f"{REPLACED}: {self.path} was removed or renamed") from None
            if (cur.st_dev, cur.st_ino) != (self.dev, self.ino):
                raise IntegrityError(f"{REPLACED}: {self.path} names another file now")
        try:
            st = os.fstat(self.fd)
        except OSError as exc:
            raise IntegrityError(f"{self.path}: cannot check the source: {exc.strerror}") from None
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
            self.size,
            self.mtime_ns,
            self.ctime_ns,
        ):
            raise IntegrityError(
                f"{self.path} changed during the transfer (size, modification or change time);"
                " send it again once it is stable"
            )


class DeadlineReached(ConnectError):
    """``--deadline`` passed: give up now, no more retries."""


@dataclass
class _Stream:
    """A worker process and the stream it drives."""

    slot: int
    proc: subprocess.Popen[bytes] | ipc.ForkedWorker
    stream: int = -1
    identity: bytes = b""
    assigned: set[int] = field(default_factory=set)
    done: bool = False
    dead: bool = False
    sent: int = 0  # blocks this worker has sent, as of its latest report
    said_last: bool = False  # its final ``sent`` report has arrived


@dataclass
class _Run:
    """What one ``send()`` call accumulates across sessions (reconnects)."""

    src: SourceFile
    run_id: bytes
    total: int
    digests: bytearray
    have_digest: bytearray
    acked: bytearray
    complete: int = 0
    blocks_sent: int = 0
    done_bytes: int = 0
    blocks_resumed: int = -1
    bytes_resumed: int = 0
    retransmits: int = 0
    reconnects: int = 0
    streams_replaced: int = 0
    width: int = 0

    @classmethod
    def new(cls, src: SourceFile, total: int) -> _Run:
        return cls(
            src=src,
            run_id=os.urandom(16),
            total=total,
            digests=bytearray(total * BLOCK_DIGEST_LEN),
            have_digest=bytearray(total),
            acked=bytearray(total),
        )

    def recount(self, block_size: int) -> None:
        """Recompute what is complete (once per session; the data phase keeps it up to date)."""
        done = bytes(a & d for a, d in zip(self.acked, self.have_digest, strict=True))
        self.complete = len(done) - done.count(0)
        self.done_bytes = held_bytes(done, size=self.src.size, block_size=block_size)

    def whole_digest(self, block_size: int) -> bytes:
        return file_digest(block_digests=self.digests, block_size=block_size, size=self.src.size)


class _Pool:
    """One session's worker processes and the ZeroMQ sockets they talk to.

    Started before the handshake, so that the workers' start-up (an interpreter and its
    imports, about 0.1 s each) overlaps the connection and handshake round trips; a worker
    says ``hello`` at once and waits for its ``setup`` until the data phase begins. With
    ``fork``, and where this process may fork (``ipc.can_fork``: one thread), the workers are
    forked before this pool makes its ZeroMQ context, ready in milliseconds; replacements
    and later sessions' pools always start new interpreters. ``close`` stops whatever is
    still running and removes the private directory.
    """

    def __init__(self, width: int, *, fork: bool = False) -> None:
        self.workdir = ipc.private_dir("stx-send-")
        self.ctl_ep = f"ipc://{self.workdir}/ctl"
        self.rep_ep = f"ipc://{self.workdir}/report"
        self.streams: dict[int, _Stream] = {}
        self.next_slot = 0
        self.zctx: zmq.Context | None = None
        #: The source ``prestart_workers`` pinned, for the ``send`` that takes this pool
        #: (``take_source``): the name is resolved and opened once per run, not twice.
        self.source: SourceFile | None = None
        try:
            if fork and ipc.can_fork():
                from .workers.sender import main as worker_main

                for _ in range(width):
                    self.spawn(forked=worker_main)
            self.zctx = zmq.Context()
            self.router = ipc.configure(self.zctx.socket(zmq.ROUTER))
            self.pull = ipc.configure(self.zctx.socket(zmq.PULL))
            self.router.bind(self.ctl_ep)
            self.pull.bind(self.rep_ep)
            while len(self.streams) < width:
                self.spawn()
        except BaseException:
            self.close()
            raise

    def spawn(self, *, forked: Callable[[list[str]], int] | None = None) -> _Stream:
        slot = self.next_slot
        self.next_slot += 1
        args = (self.ctl_ep, self.rep_ep, str(slot), str(os.getpid()))
        proc: subprocess.Popen[bytes] | ipc.ForkedWorker
        if forked is not None:
            proc = ipc.fork_worker(forked, *args)
        else:
            proc = ipc.spawn_worker("stxpar.workers.sender", *args)
        st = self.streams[slot] = _Stream(slot=slot, proc=proc)
        return st

    def kill(self) -> None:
        """Stop every worker now: SIGTERM (a worker then flushes its last reports and exits,
        even from a send blocked on a frozen stream), SIGKILL for any still there shortly."""
        for st in self.streams.values():
            if st.proc.poll() is None:
                st.proc.terminate()
        deadline = time.monotonic() + 0.5
        for st in self.streams.values():
            try:
                st.proc.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                st.proc.kill()
                st.proc.wait()

    def take_source(self, path: str | os.PathLike[str]) -> SourceFile | None:
        """The pinned source, if it was pinned for ``path``; the caller owns it from now on."""
        src, self.source = self.source, None
        if src is not None and src.path != Path(path):
            src.close()
            return None
        return src

    def close(self) -> None:
        self.kill()
        if self.zctx is not None:
            self.zctx.destroy(linger=0)
            self.zctx = None
        if self.source is not None:
            self.source.close()
            self.source = None
        ipc.remove_dir(self.workdir)


class _Transfer:
    """One session's data phase: the pool, the pull queue, the accounting.

    A stream that fails with a connection error (or whose worker dies) gets its unacknowledged
    blocks put back on the queue and a replacement worker with a fresh stream id; after too
    many replacements, or when nothing moves for ``stall_timeout``, the session fails with
    ConnectError and ``send()`` reconnects.
    """

    def __init__(
        self,
        *,
        run: _Run,
        md: Metadata,
        session: SessionKeys,
        host: str,
        port: int,
        opts: SendOptions,
        needed: list[int],
        ctl: FramedSocket,
        progress: ProgressFn | None,
        deadline: float | None,
        channel: ControlChannel,
        pool: _Pool,
    ) -> None:
        self.channel = channel
        self.pool = pool
        self.streams = pool.streams
        self.run_state, self.md, self.session, self.opts = run, md, session, opts
        self.host, self.port, self.ctl, self.progress = host, port, ctl, progress
        self.queue: collections.deque[int] = collections.deque(needed)
        self.parked: list[bytes] = []
        self.next_stream = 0
        self.width = max(1, min(opts.workers or 1, len(needed)))
        for st in list(self.streams.values())[self.width :]:
            st.dead = True  # more workers started than there are blocks left: sent home
        self.replacements_left = 2 * self.width + 2
        self.last_progress = time.monotonic()
        self.deadline = deadline

    def run(self) -> None:
        """Until every needed block is complete. The workers are still winding down then:
        ``finish`` waits for them, after END and RECEIPT have crossed."""
        try:
            self.run_state.width = max(self.run_state.width, self.width)
            self._loop(self.pool.router, self.pool.pull)
        except BaseException:
            self.pool.kill()  # a failed session must not wait for stuck streams
            self._drain(self.pool.pull)
            raise

    def finish(self) -> None:
        try:
            self._stop_workers(self.pool.router)
        finally:
            self._drain(self.pool.pull, all_exited=True)

    def _drain(self, pull: zmq.Socket, *, all_exited: bool = False) -> None:
        """Count the reports already here (a failed session's last sent counts).

        Reports may still be in the kernel's buffers, so this waits until 100 ms pass without
        one; but once every worker has exited cleanly (``all_exited``) and each one's last
        words (``sent``) are in, nothing more can come, and it stops waiting (~0.1 s off
        every transfer)."""

        def outstanding() -> bool:
            return not all_exited or any(
                st.proc.returncode != 0 or not st.said_last for st in self.streams.values()
            )

        try:
            while pull.poll(100 if outstanding() else 0):
                msg = ipc.unpack(pull.recv())
                if msg[0] in ("acked", "sent"):
                    self._count_sent(msg)
                elif msg[0] == "retransmit":
                    self._on_report(msg)
        except (zmq.ZMQError, StxError, ValueError):
            pass

    def _loop(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        poller.register(self.ctl.sock.fileno(), zmq.POLLIN)
        last_report = 0.0
        r = self.run_state
        while r.complete < r.total:
            events = dict(poller.poll(POLL_MS))
            if router in events:
                while router.poll(0):
                    identity, body = router.recv_multipart()
                    self._on_request(router, identity, ipc.unpack(body))
            if pull in events:
                while pull.poll(0):
                    self._on_report(ipc.unpack(pull.recv()))
            if self.ctl.sock.fileno() in events:
                self._on_control()
            now = time.monotonic()
            self._check_workers(pull)
            if self.parked and self.queue:  # blocks came back: wake the idle workers
                waiting, self.parked = self.parked, []
                for identity in waiting:
                    self._on_request(router, identity, ["get", self._slot_of(identity)])
            if self.deadline is not None and now > self.deadline:
                raise DeadlineReached(f"deadline of {self.opts.deadline:g} s reached")
            if now - self.last_progress > self.opts.stall_timeout:
                raise ConnectError(
                    f"transfer stalled: nothing acknowledged for {self.opts.stall_timeout:.0f} s"
                )
            if self.progress is not None and now - last_report >= 0.2:
                last_report = now
                self.progress(r.done_bytes, r.src.size)
        if self.progress is not None:
            self.progress(r.src.size, r.src.size)
        for identity in self.parked:
            router.send_multipart([identity, ipc.pack("done")])
        self.parked.clear()

    def _slot_of(self, identity: bytes) -> int:
        for st in self.streams.values():
            if st.identity == identity:
                return st.slot
        return -1

    def _on_request(self, router: zmq.Socket, identity: bytes, msg: list) -> None:
        verb, slot = msg[0], msg[1]
        st = self.streams.get(slot)
        if st is None or st.dead:
            router.send_multipart([identity, ipc.pack("done")])
            return
        if verb == "hello":
            src = self.run_state.src
            st.identity = identity
            st.stream = self.next_stream
            self.next_stream += 1
            setup = {
                "stream": st.stream,
                "secret": self.session.stream_secret(st.stream),
                "session_id": self.session.session_id,
                "host": self.host,
                "port": self.port,
                "path": src.real,
                "dev": src.dev,
                "ino": src.ino,
                "size": src.size,
                "mtime_ns": src.mtime_ns,
                "ctime_ns": src.ctime_ns,
                "block_size": self.md.block_size,
                "file_id": self.md.file_id,
                "rekey_records": self.md.rekey_records,
                "rekey_bytes": self.md.rekey_bytes,
                "connect_timeout": self.opts.connect_timeout,
            }
            router.send_multipart([identity, ipc.pack("setup", setup)])
        elif verb == "get":
            batch = self._take_batch()
            if batch:
                st.assigned.update(batch)
                if identity in self.parked:
                    self.parked.remove(identity)
                router.send_multipart([identity, ipc.pack("blocks", batch)])
            elif self.run_state.complete >= self.run_state.total:
                router.send_multipart([identity, ipc.pack("done")])
                st.done = True
            elif identity not in self.parked:
                self.parked.append(identity)

    def _take_batch(self) -> list[int]:
        live = sum(1 for st in self.streams.values() if not st.dead)
        k = max(1, min(16, len(self.queue) // (2 * max(1, live))))
        return [self.queue.popleft() for _ in range(min(k, len(self.queue)))]

    def _on_report(self, msg: list) -> None:
        verb, slot = msg[0], msg[1]
        st = self.streams.get(slot)
        r = self.run_state
        if verb == "acked":
            # [(seq, digest)]: the worker's digest of each block it sent, b"" for a block the
            # receiver acknowledged that this worker never sent (counted, never complete).
            self._count_sent(msg)
            for seq, digest in msg[2]:
                if not (0 <= seq < r.total) or (r.acked[seq] and r.have_digest[seq]):
                    continue
                if len(digest) == BLOCK_DIGEST_LEN:
                    r.digests[seq * BLOCK_DIGEST_LEN : (seq + 1) * BLOCK_DIGEST_LEN] = digest
                    r.have_digest[seq] = 1
                r.acked[seq] = 1
                if st is not None:
                    st.assigned.discard(seq)
                self._maybe_complete(seq)
        elif verb == "sent":
            self._count_sent(msg)
        elif verb == "retransmit":
            r.retransmits += 1
        elif verb == "error" and st is not None:
            code, message = msg[2], msg[3]
            if code != ConnectError.wire_code:
                raise error_from_code(code, message)
            if not st.dead:
                self._replace(st, message)

    def _count_sent(self, msg: list) -> None:
        """``acked`` reports end with the worker's running count of blocks sent; ``sent``, the
        worker's last words, is that count alone."""
        st = self.streams.get(msg[1])
        count = msg[-1]
        if st is not None and msg[0] == "sent":
            st.said_last = True
        if st is not None and isinstance(count, int) and count > st.sent:
            self.run_state.blocks_sent += count - st.sent
            st.sent = count

    def _maybe_complete(self, seq: int) -> None:
        r = self.run_state
        if r.acked[seq] and r.have_digest[seq]:
            r.complete += 1
            r.done_bytes += block_len(index=seq, size=r.src.size, block_size=self.md.block_size)
            self.last_progress = time.monotonic()

    def _replace(self, st: _Stream, why: str) -> None:
        """Put a failed stream's unfinished blocks back on the queue; start a new stream."""
        st.dead = True
        if st.proc.poll() is None:
            st.proc.terminate()  # it reports its count of blocks sent and exits (close() waits)
        r = self.run_state
        back = sorted(seq for seq in st.assigned if not (r.acked[seq] and r.have_digest[seq]))
        self.queue.extendleft(reversed(back))
        st.assigned.clear()
        if st.identity in self.parked:
            self.parked.remove(st.identity)
        if self.replacements_left <= 0:
            raise ConnectError(f"data streams keep failing ({why})")
        self.replacements_left -= 1
        r.streams_replaced += 1
        self.pool.spawn()

    def _on_control(self) -> None:
        ftype, payload = self.ctl.recv_frame(cap=_control_cap)
        if ftype is FrameType.ERROR:
            raise sealed_error(self.channel, payload)
        raise ProtocolError(f"unexpected {ftype.name} on the control connection")

    def _check_workers(self, pull: zmq.Socket) -> None:
        if not any(
            st.proc.poll() is not None and not st.done and not st.dead
            for st in self.streams.values()
        ):
            return
        while pull.poll(50):  # a dying worker's last report says why; read it before judging
            self._on_report(ipc.unpack(pull.recv()))
        for st in list(self.streams.values()):
            rc = st.proc.poll()
            if rc is not None and not st.done and not st.dead and rc != 0:
                self._replace(st, f"sender worker {st.slot} exited with status {rc}")

    def _stop_workers(self, router: zmq.Socket) -> None:
        """Tell every worker it is done, including one whose ``hello`` arrives only now."""
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT
        for st in self.streams.values():
            if st.proc.poll() is None and st.identity and not st.done:
                try:
                    router.send_multipart([st.identity, ipc.pack("done")], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        while time.monotonic() < deadline and any(
            st.proc.poll() is None for st in self.streams.values()
        ):
            if router.poll(5):  # short: a worker's exit is noticed within 5 ms
                identity, _ = router.recv_multipart()
                try:
                    router.send_multipart([identity, ipc.pack("done")], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        for st in self.streams.values():
            if st.proc.poll() is None:
                st.proc.kill()
            st.proc.wait()


def _peer_address(sock: socket.socket, host: str) -> str:
    """The numeric address the control connection reached: the data streams go to the same
    receiver (a name with several addresses, or round-robin DNS, could otherwise send them to
    another machine, or to an address that does not answer: the race is run once)."""
    try:
        return socket.getnameinfo(
            sock.getpeername(), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
        )[0]
    except OSError:
        return host


def _now_ms() -> int:
    return int(time.time() * 1000)


def handshake(ctl: FramedSocket, *, psk: bytes, timeout: float) -> SessionKeys:
    """Run the client side of the handshake over ``ctl``; return the session keys."""
    hs = ClientHandshake(psk=psk, now_ms=_now_ms())
    ctl.sock.settimeout(timeout)
    outer = ctl.deadline
    # The whole handshake, not each read, gets ``timeout``: a receiver that trickles bytes
    # cannot hold the sender longer than that.
    ctl.deadline = (
        time.monotonic() + timeout if outer is None else min(outer, time.monotonic() + timeout)
    )
    try:
        for frame in hs.start():
            ctl.send(frame)
        while not hs.established:
            ftype, payload = ctl.recv_frame(cap=handshake_cap)
            for frame in hs.receive(ftype, payload, now_ms=_now_ms()):
                ctl.send(frame)
    finally:
        ctl.deadline = outer
    assert hs.session is not None
    return hs.session


def sealed_error(channel: ControlChannel, payload: bytes) -> StxError:
    """The error a sealed ERROR frame stands for. After the handshake the receiver seals its
    errors (they may name the file); an ERROR that does not open was injected by someone
    without the key: it can only cost a reconnect."""
    try:
        err = ErrorMsg.decode(channel.open(FrameType.ERROR, payload))
    except StxError:
        return ConnectError("the control connection carried an unauthenticated ERROR")
    return error_from_wire(err.code, err.message)


def _expect_sealed(ctl: FramedSocket, channel: ControlChannel, want: FrameType) -> bytes:
    ftype, payload = ctl.recv_frame(cap=_control_cap)
    if ftype is FrameType.ERROR:
        raise sealed_error(channel, payload)
    if ftype is not want:
        raise ProtocolError(f"expected {want.name}, got {ftype.name}")
    return channel.open(ftype, payload)


def _session(
    run: _Run,
    host: str,
    port: int,
    *,
    psk: bytes,
    opts: SendOptions,
    progress: ProgressFn | None,
    on_event: EventFn | None,
    deadline: float | None,
    pool: _Pool | None = None,
) -> None:
    """One connection: handshake, metadata, the data phase, END and RECEIPT. ``pool``: workers
    already started for it (the session owns and closes them)."""
    assert opts.block_size is not None
    try:
        src = run.src
        src.check_unchanged()
        timeout = opts.connect_timeout
        if deadline is not None:
            timeout = min(timeout, max(0.01, deadline - time.monotonic()))
        width = min(opts.workers or 1, run.total)
        if run.complete >= run.total and pool is not None:
            pool.close()
            pool = None
        elif pool is None and run.complete < run.total:
            pool = _Pool(width)
        elif pool is not None:
            while len(pool.streams) < width:  # prestarted for other arguments: top it up
                pool.spawn()
        sock = connect(host, port, max_retries=0, timeout=timeout)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    ctl = FramedSocket(sock, peer=f"{host}:{port}")
    data_host = _peer_address(sock, host)
    ctl.deadline = deadline  # no read of this session may outlive --deadline
    try:
        session = handshake(ctl, psk=psk, timeout=opts.handshake_timeout)
        channel = ControlChannel(session=session, client=True)
        md = Metadata(
            name=os.fsencode(src.path.name).decode("utf-8", "replace"),
            size=src.size,
            mtime_ns=src.mtime_ns,
            block_size=opts.block_size,
            file_id=src.file_id,
            streams=opts.workers or 1,
            rekey_records=opts.rekey_records,
            rekey_bytes=opts.rekey_bytes,
            run_id=run.run_id,
        )
        ctl.send(channel.seal(FrameType.METADATA, md.encode()))
        ctl.sock.settimeout(opts.stall_timeout)
        ack = MetadataAck.decode(_expect_sealed(ctl, channel, FrameType.METADATA_ACK))
        held = ack.held(run.total)
        # The receiver's bitmap is the truth: a block acknowledged in an earlier session but
        # not in it now (the receiver died before recording it) is sent again.
        run.acked[:] = bytes(run.total)
        for k, seq in enumerate(held):
            digest = ack.digests[k * BLOCK_DIGEST_LEN : (k + 1) * BLOCK_DIGEST_LEN]
            run.digests[seq * BLOCK_DIGEST_LEN : (seq + 1) * BLOCK_DIGEST_LEN] = digest
            run.have_digest[seq] = run.acked[seq] = 1
        run.recount(md.block_size)
        if run.blocks_resumed < 0:
            run.blocks_resumed = len(held)
            run.bytes_resumed = run.done_bytes
            if held and on_event is not None:
                on_event("resuming", {"have_bytes": run.done_bytes, "bytes": src.size})
        needed = [i for i in range(run.total) if not (run.acked[i] and run.have_digest[i])]
        if needed and pool is None:  # the receiver lost blocks acknowledged earlier
            pool = _Pool(min(opts.workers or 1, len(needed)))
        transfer: _Transfer | None = None
        if needed and pool is not None:
            ctl.sock.settimeout(None)
            transfer = _Transfer(
                run=run,
                md=md,
                session=session,
                host=data_host,
                port=port,
                opts=opts,
                needed=needed,
                ctl=ctl,
                progress=progress,
                deadline=deadline,
                channel=channel,
                pool=pool,
            )
            transfer.run()
        elif pool is not None:
            pool.close()  # never needed
            pool = None
        # Last check before the receiver may rename the copy into place: a source that grew,
        # was rewritten (ctime) or replaced while its blocks were read would be a torn copy.
        src.check_unchanged()
        digest = run.whole_digest(md.block_size)
        ctl.send(channel.seal(FrameType.END, End(total_blocks=run.total, digest=digest).encode()))
        # The receiver fsyncs and renames before it answers; no answer for stall_timeout is a
        # stall like any other (the reconnect finds the file complete or resumes it).
        ctl.sock.settimeout(opts.stall_timeout)
        receipt = Receipt.decode(_expect_sealed(ctl, channel, FrameType.RECEIPT))
        if receipt.digest != digest or receipt.size != src.size:
            raise IntegrityError("the receiver's receipt does not match the file sent")
        if transfer is not None:
            transfer.finish()  # the workers wound down while END and RECEIPT crossed
    finally:
        if pool is not None:
            pool.close()
        ctl.close()


def send(
    path: str | os.PathLike[str],
    host: str,
    port: int,
    *,
    psk: bytes,
    workers: int | None = None,
    block_size: int | None = None,
    progress: ProgressFn | None = None,
    options: SendOptions | None = None,
    on_event: EventFn | None = None,
    pool: _Pool | None = None,
) -> TransferResult:
    """Send one file to an ``stx recv`` at ``host:port``; return once the receiver's
    authenticated receipt confirms the whole file arrived, verified and durable.

    Connection failures, stalls and dropped streams are retried with exponential backoff and
    jitter (``options.max_retries`` consecutive failed attempts, ``options.deadline``); every
    reconnect is a fresh handshake that resumes from the receiver's bitmap. ``workers`` and
    ``block_size`` override the same fields of ``options``. ``on_event(kind, fields)`` hears
    "resuming" and "reconnecting". Raises a subclass of :class:`stxpar.errors.StxError`; its
    ``exit_code`` is what the CLI exits with. ``pool``: workers that ``prestart_workers`` started
    for the same arguments; the first session uses them, and they are closed in any case.
    """
    try:
        if len(psk) < 32:
            raise UsageError("the key must be at least 256 bits")
        pinned = pool.take_source(path) if pool is not None else None
        try:
            src, opts = _plan(
                path, host, workers=workers, block_size=block_size, base=options, src=pinned
            )
        except BaseException:
            if pinned is not None:
                pinned.close()
            raise
        try:
            return _send(src, host, port, psk, opts, progress, on_event, pool)
        finally:
            src.close()
    finally:
        if pool is not None:
            pool.close()  # (a no-op once its session closed it)


def prestart_workers(
    path: str | os.PathLike[str],
    host: str,
    *,
    workers: int | None = None,
    block_size: int | None = None,
    options: SendOptions | None = None,
) -> _Pool | None:
    """Fork the worker processes that ``send`` with the same arguments will need, where this
    process may fork (Linux, one thread; else None, and ``send`` starts them itself).

    Call it before the key is read: a forked worker holds a copy of its parent's memory, and a
    worker must never hold the PSK (docs/threat-model.md). Forked workers are ready in
    milliseconds instead of after a new interpreter's ~0.1 s of start-up, which is most of the
    fixed cost of a small transfer. Raises what ``send`` would for a bad file or options.
    """
    src, opts = _plan(path, host, workers=workers, block_size=block_size, base=options)
    assert opts.block_size is not None and opts.workers is not None
    total = blocks_for(src.size, opts.block_size)
    if not total or not ipc.can_fork():
        src.close()
        return None
    try:
        pool = _Pool(min(opts.workers, total), fork=True)
    except BaseException:
        src.close()
        raise
    pool.source = src  # ``send`` resolves and opens nothing again: no second window for a swap
    return pool


def _plan(
    path: str | os.PathLike[str],
    host: str,
    *,
    workers: int | None,
    block_size: int | None,
    base: SendOptions | None,
    src: SourceFile | None = None,
) -> tuple[SourceFile, SendOptions]:
    """The source (``src``, already pinned, or opened now) and the resolved options (worker
    count, block size) of a transfer."""
    base = base or SendOptions()
    if workers is None and base.workers is None:
        workers = default_workers(peer_on_this_machine=is_loopback(host))
    opts = replace(
        base,
        workers=workers if workers is not None else base.workers,
        block_size=block_size if block_size is not None else base.block_size,
    ).resolved()
    assert opts.block_size is not None and opts.workers is not None
    if src is None:
        src = SourceFile.open(path)
    bs = opts.block_size
    while blocks_for(src.size, bs) > MAX_BLOCKS:
        if (block_size or base.block_size) is not None or bs >= MAX_BLOCK_SIZE:
            src.close()
            raise UsageError(
                f"{src.path} needs more than {MAX_BLOCKS} blocks of {bs} bytes;"
                " use a larger --block-size"
            )
        bs *= 2  # the default block size grows for huge files
    return src, replace(opts, block_size=bs)


def _send(
    src: SourceFile,
    host: str,
    port: int,
    psk: bytes,
    opts: SendOptions,
    progress: ProgressFn | None,
    on_event: EventFn | None,
    pool: _Pool | None,
) -> TransferResult:
    assert opts.block_size is not None
    bs = opts.block_size
    run = _Run.new(src, blocks_for(src.size, bs))
    started = time.monotonic()
    deadline = started + opts.deadline if opts.deadline else None
    failures = 0
    while True:
        before = run.complete
        first, pool = pool, None  # a session owns the pool it is given
        try:
            _session(
                run,
                host,
                port,
                psk=psk,
                opts=opts,
                progress=progress,
                on_event=on_event,
                deadline=deadline,
                pool=first,
            )
            break
        except DeadlineReached:
            raise
        except ConnectError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineReached(f"{exc} (deadline of {opts.deadline:g} s reached)") from None
            failures = 1 if run.complete > before else failures + 1
            delay = opts.backoff.delay(failures - 1)
            if failures > opts.max_retries:
                raise ConnectError(f"{exc} (gave up after {failures} attempts)") from None
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ConnectError(f"{exc} (deadline of {opts.deadline:g} s reached)") from None
            run.reconnects += 1
            if on_event is not None:
                on_event("reconnecting", {"attempt": failures, "delay": delay, "reason": str(exc)})
            time.sleep(delay)
    return TransferResult(
        file=os.fspath(src.path),
        bytes=src.size,
        seconds=time.monotonic() - started,
        workers=max(1, run.width),
        block_size=bs,
        blocks_total=run.total,
        blocks_sent=run.blocks_sent,
        blocks_resumed=max(0, run.blocks_resumed),
        retransmits=run.retransmits,
        reconnects=run.reconnects,
        digest=run.whole_digest(bs).hex(),
        bytes_resumed=run.bytes_resumed,
        extra={"streams_replaced": run.streams_replaced},
    )
