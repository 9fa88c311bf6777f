"""Receiver worker: takes authenticated data streams from its coordinator and lands blocks.

The coordinator accepts each TCP connection, checks its JOIN proof, and passes the connected
socket here with SCM_RIGHTS over a SEQPACKET socketpair (a kernel socket cannot travel over
ZeroMQ), together with that stream's secret and the file to write. One thread per stream:
read a BLOCK frame into a reused buffer, check the CRC (damaged: ask again, bounded), decrypt
into a reused buffer (tag fails: authentication failure, the stream ends), copy the verified
plaintext into the partial file at the block's offset (``Lander``: ``pwrite``, one stream
at a time), digest. Blocks are acknowledged in batches after ``fdatasync``: the worker first
reports ``Landed`` (index and digest of each block) to the coordinator over ZeroMQ, then sends the sender a
MAC'd ACK, so nothing is acknowledged that is not durable and known to the coordinator.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable

import zmq

from stxpar import fsutil, ipc, layout, messages
from stxpar.blocks import BlockSpace
from stxpar.channel import report_push
from stxpar.digest import block_digest
from stxpar.errors import ConnectError, IntegrityError, ProtocolError, RejectedError, StxError
from stxpar.messages import Beat, Cancel, Landed, Ready, StreamClosed, StreamFailed
from stxpar.netio import FramedSocket
from stxpar.pacing import SLICE, Pacer
from stxpar.records import BLOCK_SUFFIX, AckChannel, BlockContext, BlockOpener, CrcMismatch
from stxpar.wire import BLOCK_HEADER, Ack, ErrorMsg, FrameType, encode_frame

from .landing import LOCK_POLL_MAX_S as LOCK_POLL_MAX_S
from .landing import LOCK_RETRY_S as LOCK_RETRY_S
from .landing import LOCK_WAIT_S as LOCK_WAIT_S
from .landing import MADV_POPULATE_WRITE as MADV_POPULATE_WRITE
from .landing import MAPPED_LANDING_STREAMS as MAPPED_LANDING_STREAMS
from .landing import Lander as Lander
from .landing import use_mapped_landing as use_mapped_landing
from .landing import write_error

MAX_CRC_RETRIES = 3
#: At most this many blocks per ACK (keeps an ACK well under MAX_ACK_PAYLOAD).
MAX_ACK_BLOCKS = 4096
FLUSH_IDLE_S = 0.02
FLUSH_INTERVAL_S = 0.25
MAX_MSG = 64 << 10
#: A worker tells its coordinator it is alive this often (``Worker.beat``); the coordinator
#: replaces a worker it has not heard from for a few seconds (``stxpar.recvpool.ReceiverPool``).
HEARTBEAT_S = 0.5
#: Partials of a tree one stream keeps open at once.
OPEN_PARTIALS = 64
#: Sessions whose layout a worker keeps in memory.
LAYOUTS_KEPT = 8
_READY = messages.encode(Ready())
_BEAT = messages.encode(Beat())


class StreamThread(threading.Thread):
    """One data stream: the thread that receives its blocks and lands them."""

    def __init__(self, owner: Worker, job: messages.StreamJob, sock: socket.socket) -> None:
        super().__init__(daemon=True, name=f"stream-{job.stream}")
        self.owner = owner
        self.job = job
        self.sock = sock
        self.sid = job.session_id
        self.stream = job.stream
        self.cancelled = False
        #: Set before this stream reports its own failure: a cancel that the report causes
        #: must not cut the ERROR this stream is about to send its sender.
        self.failing = False

    def run(self) -> None:
        try:
            self._run()
        except zmq.ZMQError:
            pass  # the worker is shutting down (its coordinator went away): nobody to tell

    def _run(self) -> None:
        report = self.owner.report
        conn = FramedSocket(self.sock, peer="sender")
        try:
            self._receive(conn, report)
            report(messages.encode(StreamClosed(self.sid, self.stream)))
        except BaseException as exc:
            if self.cancelled:
                report(messages.encode(StreamClosed(self.sid, self.stream)))
                return
            tell_sender = not isinstance(exc, ConnectError)  # a lost connection cannot be told
            if isinstance(exc, ProtocolError):
                # A malformed or damaged frame costs this stream only: the sender replaces it
                # and sends its unacknowledged blocks again. Forgery (AuthError), repeated damage
                # (IntegrityError) and disk errors end the whole transfer.
                exc = ConnectError(f"data stream dropped: {exc}")
            code = exc.wire_code if isinstance(exc, StxError) else 1
            message = str(exc) if isinstance(exc, StxError) else f"receiver worker error: {exc!r}"
            # The coordinator hears first: by the time the sender reacts to the ERROR and hangs
            # up, the coordinator already knows why.
            self.failing = True
            report(messages.encode(StreamFailed(self.sid, self.stream, code, message)))
            if tell_sender:
                try:
                    conn.send(encode_frame(FrameType.ERROR, ErrorMsg(code, message).encode()))
                except StxError:
                    pass
        finally:
            conn.close()
            self.owner.forget(self)

    def refuse(self, why: str) -> None:
        """This stream cannot be served here (no thread for it): tell the sender, with the
        code that makes it replace the stream later, and the coordinator, then let go."""
        self.job = dataclasses.replace(self.job, secret=b"")
        message = f"receiver busy: {why}; try again shortly"
        code = ConnectError.wire_code
        try:
            self.owner.report(messages.encode(StreamFailed(self.sid, self.stream, code, message)))
        except zmq.ZMQError:
            pass
        conn = FramedSocket(self.sock, peer="sender")
        try:
            self.sock.settimeout(1.0)  # a few bytes into a fresh connection's buffer
            conn.send(encode_frame(FrameType.ERROR, ErrorMsg(code, message).encode()))
        except (StxError, OSError):
            pass
        finally:
            conn.close()

    @staticmethod
    def _paced_read(conn: FramedSocket, view: memoryview, bucket: Pacer) -> None:
        """Fill ``view`` a slice at a time, each slice taken from the worker's bucket first."""
        for at in range(0, len(view), SLICE):
            part = view[at : at + SLICE]
            wait = bucket.charge(len(part), time.monotonic())
            if wait > 0:
                time.sleep(wait)
            conn.recv_into(part)

    def _receive(self, conn: FramedSocket, report: Callable[[bytes], None]) -> None:
        job = self.job
        bucket = self.owner.bucket
        secret = job.secret
        self.job = dataclasses.replace(job, secret=b"")
        try:
            plan, space = self.owner.layout(job.session_id, job.layout)
        except ProtocolError as exc:  # our own file: a fault here, not the sender's
            raise RejectedError(f"receiver error: {exc}") from None
        ctx = BlockContext(
            session_id=self.sid,
            stream=self.stream,
            space=space,
            manifest_id=job.manifest_id,
            rekey_records=job.rekey_records,
            rekey_bytes=job.rekey_bytes,
        )
        opener = BlockOpener(stream_secret=secret, ctx=ctx)
        acks = AckChannel(stream_secret=secret, ctx=ctx)
        del secret, job
        block_size = ctx.block_size
        sync_bytes = self.job.sync_bytes
        body = bytearray(BLOCK_HEADER.size + block_size + BLOCK_SUFFIX)
        body_view = memoryview(body)
        target: _Target
        if self.job.tree:
            target = _TreeTarget(self.job.path, self.job.inode, plan, self.owner.umask)
        else:
            target = _FileTarget(self.job.path, self.job.inode, self.job.streams)
        pending: list[tuple[int, bytes]] = []
        resend: list[int] = []
        crc_failures: collections.Counter[int] = collections.Counter()
        pending_bytes = 0
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal pending_bytes, last_flush
            if not pending and not resend:
                return
            if pending:
                target.sync()
                report(messages.encode(Landed(self.sid, self.stream, tuple(pending))))
            conn.send(acks.seal(Ack(tuple(s for s, _ in pending), tuple(resend)).encode()))
            pending.clear()
            resend.clear()
            pending_bytes = 0
            last_flush = time.monotonic()

        def cap(ftype: FrameType) -> int:
            return len(body) if ftype is FrameType.BLOCK else -1

        try:
            while True:
                if (pending or resend) and not select.select([self.sock], [], [], FLUSH_IDLE_S)[0]:
                    flush()
                header = conn.recv_header_or_eof(cap=cap)
                if header is None:
                    flush()
                    return
                _, length = header
                view = body_view[:length]
                if bucket.rate:
                    self._paced_read(conn, view, bucket)
                else:
                    conn.recv_into(view)
                try:
                    where, plain = opener.open(view)
                except CrcMismatch as damaged:
                    seq = damaged.seq
                    crc_failures[seq] += 1
                    if crc_failures[seq] > MAX_CRC_RETRIES:
                        raise IntegrityError(
                            f"block {seq} arrived damaged {crc_failures[seq]} times; giving up"
                        ) from None
                    resend.append(seq)
                    flush()
                    continue
                size = len(plain)
                if where.count > 1:
                    target.write_pack(plain, space.members(where))
                else:
                    target.write(plain, where.entry, where.offset)
                pending.append((where.block, block_digest(plain)))
                pending_bytes += size
                if (
                    pending_bytes >= sync_bytes
                    or len(pending) >= MAX_ACK_BLOCKS
                    or time.monotonic() - last_flush > FLUSH_INTERVAL_S
                ):
                    flush()
        finally:
            target.close()


def _open_error(exc: OSError, what: str) -> StxError:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        # Short of descriptors for now: this stream only, and the sender retries it.
        return ConnectError("receiver busy: out of file descriptors")
    return RejectedError(f"cannot open {what}: {exc.strerror}")


class _Target:
    """Where a stream's verified blocks land."""

    def write(self, plain: memoryview, entry: int, offset: int) -> None:
        raise NotImplementedError

    def write_pack(self, plain: memoryview, members: list[tuple[int, int, int]]) -> None:
        raise ProtocolError("a packed block for a single file")

    def sync(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _FileTarget(_Target):
    """A single file's partial, opened once and proved to be the session's inode."""

    def __init__(self, path: str, inode: tuple[int, int] | None, streams: int) -> None:
        mapped = use_mapped_landing(streams, os.environ.get("STX_LANDING"))
        # A shared mapping needs a descriptor that can read too.
        access = os.O_RDWR if mapped else os.O_WRONLY
        try:
            fd = os.open(path, access | os.O_NOFOLLOW)
        except OSError as exc:
            raise _open_error(exc, "the partial file") from None
        st = os.fstat(fd)
        if inode is not None and (st.st_dev, st.st_ino) != inode:
            os.close(fd)
            raise RejectedError("the partial file was removed or replaced under the receiver")
        self.fd = fd
        self.lander = Lander(fd, mapped=mapped)

    def write(self, plain: memoryview, entry: int, offset: int) -> None:
        self.lander.write(plain, offset)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise write_error(exc) from None

    def close(self) -> None:
        os.close(self.fd)


_PARTIAL_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class _TreeTarget(_Target):
    """A tree's staging directory (proved to be the session's inode): each entry's blocks go
    to its partial there, created on first use; a few partials stay open."""

    def __init__(
        self, path: str, inode: tuple[int, int] | None, plan: layout.Layout, umask: int = 0o077
    ) -> None:
        try:
            self.dir = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(exc, "the staging directory") from None
        st = os.fstat(self.dir)
        if inode is not None and (st.st_dev, st.st_ino) != inode:
            os.close(self.dir)
            raise RejectedError("the staging directory was removed or replaced under the receiver")
        self.plan = plan
        #: the process's umask (a pack's new partials are made with their mode where it
        #: leaves that mode whole)
        self.umask = umask
        self.open: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.dirty: set[int] = set()

    def _fd(self, entry: int) -> int:
        fd = self.open.get(entry)
        if fd is not None:
            self.open.move_to_end(entry)
            return fd
        if len(self.open) >= OPEN_PARTIALS:
            old, old_fd = self.open.popitem(last=False)
            if old in self.dirty:
                self._sync(old, old_fd)
            os.close(old_fd)
        fd = self.open[entry] = self._create(entry)
        return fd

    def _create(self, entry: int) -> int:
        """Entry ``entry``'s partial in the staging directory, opened (made if new)."""
        name = self.plan.name(entry)
        if name is None:
            raise ProtocolError(f"block for entry {entry}, which holds no data")
        return self._open(name)

    def _open(self, name: str) -> int:
        try:
            fd = os.open(name, _PARTIAL_FLAGS, 0o600, dir_fd=self.dir)
        except OSError as exc:
            raise _open_error(exc, "a partial file") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RejectedError("a partial file in the staging directory is not a regular file")
        return fd

    def _open_new(self, name: str, mode: int) -> int:
        """A partial made now, with ``mode`` (-1 if the name is taken: a file that starts
        over, a block that came twice)."""
        try:
            return os.open(name, _PARTIAL_FLAGS | os.O_EXCL, mode, dir_fd=self.dir)
        except FileExistsError:
            return -1
        except OSError as exc:
            raise _open_error(exc, "a partial file") from None

    def write(self, plain: memoryview, entry: int, offset: int) -> None:
        fd = self._fd(entry)
        try:
            written = os.pwrite(fd, plain, offset)
        except OSError as exc:
            raise write_error(exc) from None
        if written != len(plain):  # (a regular file: short only when the disk is full)
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        self.dirty.add(entry)

    def write_pack(self, plain: memoryview, members: list[tuple[int, int, int]]) -> None:
        """A pack's small files, each whole: written, made durable and closed at once.

        A partial made new here is finished here too, before its fsync: its size (a trailing
        hole), its mode and its mtime, so that the coordinator only renames it (it checks all
        three; ``treefiles``). The mode is left 0600 when it would take the owner's read or
        write away (a block that comes again must still open it), and a partial that was
        already there is written as any other: the coordinator finishes both."""
        umask = self.umask
        for entry, at, length in members:
            name, size, mtime_ns, mode = self.plan.finished(entry)
            # Made with its mode at once where the umask leaves that mode as it is (staging
            # is 0700: nobody else sees the file before it is complete).
            kept = mode & 0o600 == 0o600
            made = mode if kept and not mode & umask else 0o600
            fd = self._open_new(name, made)
            new = fd >= 0
            if not new:
                fd = self._open(name)
            try:
                try:
                    written = os.pwrite(fd, plain[at : at + length], 0)
                    if written == length and new:
                        if size != length:
                            os.ftruncate(fd, size)
                        if kept and made != mode:
                            os.fchmod(fd, mode)
                        os.utime(fd, ns=(mtime_ns, mtime_ns))
                        os.fsync(fd)
                except OSError as exc:
                    raise write_error(exc) from None
                if written != length:
                    raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
                if not new:
                    self._sync(entry, fd)
            finally:
                os.close(fd)

    def _sync(self, entry: int, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise write_error(exc) from None
        self.dirty.discard(entry)

    def sync(self) -> None:
        for entry in list(self.dirty):
            self._sync(entry, self.open[entry])

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)
        self.open.clear()
        os.close(self.dir)


class Worker:
    """One receiver worker process: a main thread that takes streams (and cancels) from the
    coordinator's channel, a thread per stream, and a heartbeat thread.

    Every stream thread reports through the worker's one PUSH socket (``report``, under a
    lock: a ZeroMQ socket is not thread-safe), so the coordinator holds one IPC connection
    per worker whatever the number of streams; a connection per stream made its descriptors
    grow with the streams, and an ``accept`` that ran out of them aborted it inside libzmq.
    """

    def __init__(self, channel_fd: int, report_endpoint: str) -> None:
        self.channel = socket.socket(fileno=channel_fd)
        self.ctx = zmq.Context()
        self.report_endpoint = report_endpoint
        self._push = report_push(self.ctx, report_endpoint)
        self._push_lock = threading.Lock()
        self.lock = threading.Lock()
        #: --limit-rate: this worker's share, over all its streams (set by its coordinator)
        self.bucket = Pacer()
        self.streams: set[StreamThread] = set()
        self.stopping = threading.Event()
        self.thread_failures = 0
        self._layouts: dict[bytes, tuple[str, layout.Layout, BlockSpace]] = {}
        self.umask = fsutil.process_umask()  # read once, before any stream thread
        #: layouts being read now (``Prepare``): a stream of that session waits for it
        self._reading: dict[tuple[bytes, str], threading.Event] = {}

    def layout(self, session_id: bytes, path: str) -> tuple[layout.Layout, BlockSpace]:
        """The layout of a session (read once per session, from the receiver's private
        directory) and its block space; while another thread reads it, its result."""
        with self.lock:
            got = self._layouts.get(session_id)
            if got is not None and got[0] == path:
                return got[1], got[2]
            reading = self._reading.get((session_id, path))
            if reading is None:
                reading = self._reading[(session_id, path)] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            reading.wait()
            with self.lock:
                got = self._layouts.get(session_id)
            if got is not None and got[0] == path:
                return got[1], got[2]
            return self.layout(session_id, path)  # that read failed: this one says why
        try:
            plan = layout.read(path)
            space = plan.space()
            with self.lock:
                self._layouts[session_id] = (path, plan, space)
                while len(self._layouts) > LAYOUTS_KEPT:
                    self._layouts.pop(next(iter(self._layouts)))
            return plan, space
        finally:
            with self.lock:
                self._reading.pop((session_id, path), None)
            reading.set()

    def prepare(self, cmd: messages.Prepare) -> None:
        """Read a session's layout ahead of its streams, in the background (a failure here
        is the stream's to find and report)."""

        def read() -> None:
            try:
                self.layout(cmd.session_id, cmd.layout)
            except BaseException:  # noqa: S110 (the stream reads it again and says why)
                pass

        try:
            threading.Thread(target=read, name="prepare", daemon=True).start()
        except RuntimeError:
            pass  # no thread to spare: the stream reads it

    def report(self, msg: bytes) -> None:
        with self._push_lock:
            self._push.send(msg)

    def close(self) -> None:
        self.stopping.set()
        with self._push_lock:
            self._push.close()

    def forget(self, job: StreamThread) -> None:
        with self.lock:
            self.streams.discard(job)

    def beat(self) -> None:
        """Tell the coordinator every ``HEARTBEAT_S`` that this process still runs.

        Its own thread, never the landing path: what stops the beat is the whole process
        not running (SIGSTOP, a debugger, a frozen cgroup) or holding the GIL in one call for
        seconds (a copy into a mapping of a file whose storage hangs). The coordinator then
        stops handing streams to this worker and replaces it. The beat goes over the
        fd-passing channel, not ZeroMQ: it costs no descriptor and no report slot."""
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self.channel.send(_BEAT, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # the coordinator is behind on reading: the next beat says it
            except OSError:
                return  # the coordinator is gone; run() notices too

    def start_stream(self, job: StreamThread) -> None:
        with self.lock:
            self.streams.add(job)
        try:
            job.start()
        except RuntimeError as exc:  # "can't start new thread": pids.max, RLIMIT_NPROC, memory
            self.forget(job)
            if not self.thread_failures:
                print(
                    f"{ipc.RECEIVER_WORKER_NAME} {os.getpid()}: cannot start a thread for a"
                    f" data stream ({exc}); refusing such streams, the senders retry them",
                    file=sys.stderr,
                    flush=True,
                )
            self.thread_failures += 1
            job.refuse("no thread for another data stream")

    def run(self) -> None:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(self.channel, MAX_MSG, 4)
            except OSError:
                return
            if not msg:
                for fd in fds:
                    os.close(fd)
                return  # coordinator went away
            try:
                cmd = messages.decode(msg, expect=messages.RECEIVER_JOBS)
            except ProtocolError:
                cmd = None  # not from a coordinator of this version: nothing to do with it
            if isinstance(cmd, messages.StreamJob) and len(fds) == 1:
                self.start_stream(StreamThread(self, cmd, socket.socket(fileno=fds[0])))
                continue
            for fd in fds:
                os.close(fd)
            if isinstance(cmd, messages.StreamJob) and not fds:
                # Its connection did not get here (no descriptor free to receive it: the
                # kernel closed it, and the sender replaces the stream). The coordinator
                # still counts the stream as this worker's until it hears so.
                why = "receiver busy: out of file descriptors"
                failed = StreamFailed(cmd.session_id, cmd.stream, ConnectError.wire_code, why)
                try:
                    self.report(messages.encode(failed))
                except zmq.ZMQError:
                    return  # shutting down
            elif isinstance(cmd, messages.Pace):
                self.bucket.set_rate(cmd.rate)
            elif isinstance(cmd, messages.Prepare):
                self.prepare(cmd)
            elif isinstance(cmd, Cancel):
                with self.lock:
                    victims = [j for j in self.streams if j.sid == cmd.session_id]
                for j in victims:
                    if j.failing:
                        continue  # it ends by itself, once its sender is told why
                    j.cancelled = True
                    try:
                        j.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


def main(argv: list[str]) -> int:
    channel_fd, report_endpoint = argv
    ipc.harden_process()
    ipc.freeze_heap()
    ipc.name_process(ipc.RECEIVER_WORKER_NAME)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (a closed terminal reaches us too)
    worker = Worker(int(channel_fd), report_endpoint)
    try:
        worker.channel.send(_READY)  # the coordinator waits for this before "listening"
    except OSError:
        return 0  # the coordinator is already gone
    beat = threading.Thread(target=worker.beat, name="heartbeat", daemon=True)
    try:
        beat.start()
    except RuntimeError:
        pass  # no thread for it: the coordinator replaces this worker as stuck, which is right
    try:
        worker.run()
    finally:
        worker.close()
        worker.ctx.destroy(linger=500)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
