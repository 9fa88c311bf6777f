"""Receiver worker: takes authenticated data streams from its coordinator and lands blocks.

The coordinator accepts each TCP connection, checks its JOIN proof, and passes the connected
socket here with SCM_RIGHTS over a SEQPACKET socketpair (a kernel socket cannot travel over
ZeroMQ), together with that stream's secret and the file to write. One thread per stream:
read a BLOCK frame into a reused buffer, check the CRC (damaged: ask again, bounded), decrypt
into a reused buffer (tag fails: authentication failure, the stream ends), copy the verified
plaintext into the partial file at the block's offset (``Lander``: ``pwrite``, one stream
at a time), digest. Blocks are acknowledged in batches after ``fdatasync``: the worker first
reports ``blocks`` (index and digest) to the coordinator over ZeroMQ, then sends the sender a
MAC'd ACK, so nothing is acknowledged that is not durable and known to the coordinator.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from stxpar import ipc
from stxpar.digest import block_digest
from stxpar.errors import ConnectError, IntegrityError, ProtocolError, RejectedError, StxError
from stxpar.netio import FramedSocket
from stxpar.records import BLOCK_SUFFIX, AckChannel, BlockContext, BlockOpener, CrcMismatch
from stxpar.wire import BLOCK_HEADER, Ack, ErrorMsg, FrameType, encode_frame

MAX_CRC_RETRIES = 3
#: At most this many blocks per ACK (keeps an ACK well under MAX_ACK_PAYLOAD).
MAX_ACK_BLOCKS = 4096
FLUSH_IDLE_S = 0.02
FLUSH_INTERVAL_S = 0.25
MAX_MSG = 64 << 10
#: Transfers with at least this many streams land blocks through shared mappings (Lander).
MAPPED_LANDING_STREAMS = 4
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: Longest wait for the landing ``flock`` before a stream writes without it (``Lander``).
LOCK_WAIT_S = 2.0
#: Longest sleep between two tries of a busy landing lock.
LOCK_POLL_MAX_S = 250e-6
#: After a lock wait ran out, the stream writes unlocked this long before it tries again.
LOCK_RETRY_S = 10.0
#: A worker tells its coordinator it is alive this often (``Worker.beat``); the coordinator
#: replaces a worker it has not heard from for a few seconds (``stxpar.receiver._Pool``).
HEARTBEAT_S = 0.5
_PAGE = mmap.PAGESIZE


class StreamJob(threading.Thread):
    def __init__(self, owner: Worker, job: dict[str, Any], sock: socket.socket) -> None:
        super().__init__(daemon=True, name=f"stream-{job['stream']}")
        self.owner = owner
        self.job = job
        self.sock = sock
        self.sid: bytes = job["session_id"]
        self.stream = int(job["stream"])
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
            report(ipc.pack("closed", self.sid, self.stream))
        except BaseException as exc:
            if self.cancelled:
                report(ipc.pack("closed", self.sid, self.stream))
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
            report(ipc.pack("fail", self.sid, self.stream, code, message))
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
        self.job.pop("secret", None)
        message = f"receiver busy: {why}; try again shortly"
        code = ConnectError.wire_code
        try:
            self.owner.report(ipc.pack("fail", self.sid, self.stream, code, message))
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

    def _receive(self, conn: FramedSocket, report: Callable[[bytes], None]) -> None:
        job = self.job
        secret: bytes = job.pop("secret")
        ctx = BlockContext(
            session_id=self.sid,
            stream=self.stream,
            file_size=int(job["size"]),
            file_id=job["file_id"],
            block_size=int(job["block_size"]),
            rekey_records=int(job["rekey_records"]),
            rekey_bytes=int(job["rekey_bytes"]),
        )
        opener = BlockOpener(stream_secret=secret, ctx=ctx)
        acks = AckChannel(stream_secret=secret, ctx=ctx)
        del secret
        block_size = ctx.block_size
        sync_bytes = int(job["sync_bytes"])
        body = bytearray(BLOCK_HEADER.size + block_size + BLOCK_SUFFIX)
        body_view = memoryview(body)
        try:
            mapped = use_mapped_landing(int(job["streams"]), os.environ.get("STX_LANDING"))
            # A shared mapping needs a descriptor that can read too.
            access = os.O_RDWR if mapped else os.O_WRONLY
            fd = os.open(job["path"], access | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Short of descriptors for now: this stream only, and the sender retries it.
                raise ConnectError("receiver busy: out of file descriptors") from None
            raise RejectedError(f"cannot open the partial file: {exc.strerror}") from None
        inode = job.get("inode")
        st = os.fstat(fd)
        if inode is not None and [st.st_dev, st.st_ino] != list(inode):
            os.close(fd)
            raise RejectedError("the partial file was removed or replaced under the receiver")
        lander = Lander(fd, mapped=mapped)
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
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    raise _disk_error(exc) from None
                report(ipc.pack("blocks", self.sid, pending))
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
                conn.recv_into(view)
                try:
                    seq, plain = opener.open(view)
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
                lander.write(plain, seq * block_size)
                pending.append((seq, block_digest(plain)))
                pending_bytes += size
                if (
                    pending_bytes >= sync_bytes
                    or len(pending) >= MAX_ACK_BLOCKS
                    or time.monotonic() - last_flush > FLUSH_INTERVAL_S
                ):
                    flush()
        finally:
            os.close(fd)


def use_mapped_landing(streams: int, override: str | None = None) -> bool:
    """How a transfer's blocks land: through shared mappings when it has
    ``MAPPED_LANDING_STREAMS`` streams or more, else with ``pwrite`` under ``flock``.
    ``override`` (the ``STX_LANDING`` environment variable of the receiver): ``mmap`` or
    ``pwrite`` forces one way; anything else, or nothing, chooses by the stream count."""
    if override == "mmap":
        return True
    if override == "pwrite":
        return False
    return streams >= MAPPED_LANDING_STREAMS


class Lander:
    """Puts verified plaintext blocks into the partial file, in one of two ways.

    Every stream of a transfer writes into the same file, and buffered writes into one file
    serialise on the inode's lock in the kernel: one ``pwrite`` at a time, whatever the number
    of streams.

    - ``pwrite`` under an exclusive ``flock`` on this stream's own descriptor (the default for
      up to 3 streams). A writer that finds the inode lock taken spins on its CPU while the
      holder copies; waiting on the ``flock`` sleeps instead, so that CPU goes to a stream that
      is receiving or decrypting. On the 2-core test machine, 2 receiver workers landing a
      2 GiB transfer this way used 0.87 s of CPU per GB against 1.2 through mappings, and the
      transfer ran 20% faster (docs/tuning.md). A file system without ``flock`` writes unlocked.
    - ``mapped`` (4 streams or more): the block is copied into a shared mapping of its byte
      range, faulted in first with one ``MADV_POPULATE_WRITE`` call. Page faults take no inode
      lock, so streams land in parallel; each new page is zeroed before the copy, which costs
      more CPU per GB. On a 16-core machine 8 streams landed at 4.3 GB/s this way against 2.5
      for ``pwrite`` (``perf/landing.py``), and an 8-worker loopback transfer ran at 2251 MB/s
      against 1493 (docs/tuning.md). Only plaintext whose tag verified is ever copied in;
      ``fdatasync`` makes mapped writes durable like written ones. Where a range cannot be
      mapped or backed (a file system that cannot map, a full disk: the populate call fails
      cleanly, no SIGBUS) the block goes through ``pwrite``, which reports the error.
    """

    def __init__(self, fd: int, *, mapped: bool = False, lock_wait: float = LOCK_WAIT_S) -> None:
        self.fd = fd
        self.locking = True
        self.mapped = mapped
        self.mapped_blocks = 0  # blocks that went in through a mapping
        self.lock_wait = lock_wait
        #: Until then this stream writes without the lock (its holder did not let go in time).
        self.unlocked_until = 0.0
        self.lock_timeouts = 0

    def write(self, plain: memoryview, offset: int) -> None:
        if self.mapped and plain and self._write_mapped(plain, offset):
            return
        locked = self._acquire()
        try:
            written = os.pwrite(self.fd, plain, offset)
        except OSError as exc:
            raise _disk_error(exc) from None
        finally:
            if locked:
                self._lock(fcntl.LOCK_UN)
        if written != len(plain):
            raise _disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def _write_mapped(self, plain: memoryview, offset: int) -> bool:
        """Copy into a shared mapping of the block's range, populated first (no inode lock).
        False when mapping is not possible here; ``pwrite`` then lands it (and reports a full
        disk, which makes the populate call fail)."""
        start = offset - offset % _PAGE
        skip = offset - start
        n = len(plain)
        try:
            m = mmap.mmap(self.fd, skip + n, flags=mmap.MAP_SHARED, offset=start)
        except (OSError, ValueError):
            self.mapped = False
            return False
        try:
            try:
                m.madvise(MADV_POPULATE_WRITE, 0, skip + n)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self.mapped = False  # a kernel without MADV_POPULATE_WRITE
                return False
            m[skip : skip + n] = plain
            self.mapped_blocks += 1
            return True
        finally:
            m.close()

    def _acquire(self) -> bool:
        """Take the exclusive ``flock`` within ``lock_wait`` seconds; False to write unlocked.

        The lock only saves CPU (``pwrite`` of disjoint ranges is correct without it), so it is
        never worth waiting for long: a holder that does not let go (a worker stopped with
        SIGSTOP, a paused VM, a same-user process that locked the partial file) must not
        stall every stream of the file. A blocking ``flock`` cannot time out, so a busy lock is
        polled, with sleeps that grow from 20 µs to ``LOCK_POLL_MAX_S`` (a holder writes one
        block, a few ms at most). Past the wait this stream writes unlocked for
        ``LOCK_RETRY_S`` before it tries the lock again."""
        if not self.locking or time.monotonic() < self.unlocked_until:
            return False
        pause = 20e-6
        deadline = 0.0
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError:
                self.locking = False  # no flock here (some network file systems): write unlocked
                return False
            now = time.monotonic()
            if not deadline:
                deadline = now + self.lock_wait
            elif now >= deadline:
                self.lock_timeouts += 1
                self.unlocked_until = now + LOCK_RETRY_S
                return False
            time.sleep(pause)
            pause = min(2 * pause, LOCK_POLL_MAX_S)

    def _lock(self, op: int) -> bool:
        try:
            fcntl.flock(self.fd, op)
            return True
        except OSError:
            self.locking = False  # no flock here (some network file systems): write unlocked
            return False


def _disk_error(exc: OSError) -> StxError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RejectedError(f"receiver cannot write: {exc.strerror}")
    return RejectedError(f"receiver write failed: {exc.strerror}")


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
        self._push = ipc.configure(self.ctx.socket(zmq.PUSH), linger_ms=2000)
        self._push.connect(report_endpoint)
        self._push_lock = threading.Lock()
        self.lock = threading.Lock()
        self.streams: set[StreamJob] = set()
        self.stopping = threading.Event()
        self.thread_failures = 0

    def report(self, msg: bytes) -> None:
        with self._push_lock:
            self._push.send(msg)

    def close(self) -> None:
        self.stopping.set()
        with self._push_lock:
            self._push.close()

    def forget(self, job: StreamJob) -> None:
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
                self.channel.send(b"beat", socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # the coordinator is behind on reading: the next beat says it
            except OSError:
                return  # the coordinator is gone; run() notices too

    def start_stream(self, job: StreamJob) -> None:
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
            cmd = ipc.unpack(msg)
            if cmd[0] == "stream" and len(fds) == 1:
                self.start_stream(StreamJob(self, cmd[1], socket.socket(fileno=fds[0])))
            elif cmd[0] == "stream" and not fds:
                # Its connection did not get here (no descriptor free to receive it: the
                # kernel closed it, and the sender replaces the stream). The coordinator
                # still counts the stream as this worker's until it hears so.
                job = cmd[1]
                why = "receiver busy: out of file descriptors"
                try:
                    self.report(
                        ipc.pack(
                            "fail", job["session_id"], job["stream"], ConnectError.wire_code, why
                        )
                    )
                except zmq.ZMQError:
                    return  # shutting down
            elif cmd[0] == "cancel":
                for fd in fds:
                    os.close(fd)
                with self.lock:
                    victims = [j for j in self.streams if j.sid == cmd[1]]
                for j in victims:
                    if j.failing:
                        continue  # it ends by itself, once its sender is told why
                    j.cancelled = True
                    try:
                        j.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            else:
                for fd in fds:
                    os.close(fd)


def main(argv: list[str]) -> int:
    channel_fd, report_endpoint = argv
    ipc.harden_process()
    ipc.name_process(ipc.RECEIVER_WORKER_NAME)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (a closed terminal reaches us too)
    worker = Worker(int(channel_fd), report_endpoint)
    try:
        worker.channel.send(b"ready")  # the coordinator waits for this before "listening"
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
