"""Sender worker: one TCP stream, pulls block lists from the coordinator over ZeroMQ.

Main thread: ``Get`` -> ``Blocks`` (the next ``Get`` goes out at once, so the following batch
is waiting by the time this one is sent) -> for each block pread into a reused buffer,
digest, seal into a reused frame buffer, send. Reader thread: reads the receiver's MAC'd acks
and reports durable blocks to the coordinator (``Acked``) together with their digests, which
the main thread recorded before the block went out; hands resend requests to the main thread.
Beat thread: says ``Alive`` every half second, and stops the worker (SIGTERM to itself) when
the coordinator is gone (its request connection dropped: ``channel.WorkerLink``). Any failure
is reported (``WorkerError``) and ends the process. The worker never sees the PSK or any other
stream's key. Messages are ``stxpar.messages``; the channel is ``stxpar.channel``.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import socket
import struct
import sys
import threading
from typing import Any

import zmq

from stxpar import channel, ipc, layout
from stxpar.blocks import BlockRef
from stxpar.digest import block_digest
from stxpar.errors import ConnectError, ProtocolError, SourceChangedError, StxError, error_from_wire
from stxpar.messages import (
    Acked,
    Alive,
    Blocks,
    FileRef,
    Get,
    Hello,
    Message,
    Retransmit,
    Sent,
    Setup,
    WorkerError,
)
from stxpar.netio import FramedSocket, connect
from stxpar.records import AckChannel, BlockContext, BlockSealer, join_mac
from stxpar.source import check_read, open_source, read_whole
from stxpar.wire import (
    MAX_ACK_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    Ack,
    ErrorMsg,
    FrameType,
    Join,
    encode_frame,
)

POLL_MS = 100
#: Source files a worker keeps open at once (a tree's small files come and go).
OPEN_SOURCES = 64
#: Linux's SO_MAX_PACING_RATE (not every Python exports it), and its "no limit" value.
_SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
_NO_PACING = 0xFFFFFFFF


def _ack_cap(ftype: FrameType) -> int:
    if ftype is FrameType.ACK:
        return MAX_ACK_PAYLOAD
    if ftype is FrameType.ERROR:
        return MAX_HANDSHAKE_PAYLOAD
    return -1


class Worker:
    def __init__(self, ctl_endpoint: str, report_endpoint: str, slot: int, parent: int) -> None:
        """``parent``: the coordinator's pid, passed in argv so that a coordinator killed before
        this process got going is noticed too (getppid() would already name the reaper)."""
        self.ctx = zmq.Context()
        self.link = channel.WorkerLink(self.ctx, ctl_endpoint, report_endpoint)
        self.report = self.link.push
        self.slot = slot
        self.parent = parent
        self.resend: queue.Queue[int] = queue.Queue()
        #: Digests of blocks sent and not yet acknowledged (the main thread adds, the reader
        #: thread takes; single dict operations are atomic under the GIL).
        self.digests: dict[int, bytes] = {}
        self.sent = 0
        self.failed = threading.Event()
        self.finishing = threading.Event()
        self.stopping = threading.Event()
        self.beater = threading.Thread(target=self.beat, name="beat", daemon=True)

    # -- coordinator link
    def request(self, msg: Message) -> Message:
        self.link.ask(msg)
        return self.reply()

    def reply(self) -> Message:
        while True:
            msg = self.link.answer(POLL_MS)
            if msg is not None:
                return msg
            self.check_alive()
            self.drain_resends()

    def check_alive(self) -> None:
        if self.failed.is_set() or _stop_requested.is_set():
            raise SystemExit(1)
        if os.getppid() != self.parent:  # the fast path: the coordinator process exited
            raise SystemExit(1)

    def fail(self, sock: zmq.Socket, exc: BaseException) -> None:
        if isinstance(exc, StxError):
            code, message = exc.wire_code, str(exc)
        else:
            code, message = 1, f"worker error: {type(exc).__name__}: {exc}"
        channel.send(sock, WorkerError(self.slot, code, message))

    def beat(self) -> None:
        """Say ``Alive`` every ``BEAT_INTERVAL``; stop this worker if the coordinator is gone."""
        sock = self.link.report_socket()
        try:
            while not self.stopping.wait(channel.BEAT_INTERVAL):
                try:
                    gone = self.link.coordinator_gone()
                except zmq.ZMQError:
                    return  # the context is being torn down: the worker is stopping
                if gone:
                    _stop_requested.set()
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                try:
                    channel.send(sock, Alive(self.slot), block=False)
                except zmq.ZMQError:
                    pass
        finally:
            sock.close()

    # -- data path
    def run(self) -> None:
        self.beater.start()
        msg = self.request(Hello(self.slot))
        if not isinstance(msg, Setup):
            return
        self.stream = msg.stream
        secret = msg.secret
        join = Join(
            session_id=msg.session_id,
            stream=self.stream,
            mac=join_mac(stream_secret=secret, session_id=msg.session_id, stream=self.stream),
        )
        host, port = msg.host, msg.port
        sock = connect(host, port, max_retries=2, timeout=msg.connect_timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.conn = FramedSocket(sock, peer=f"{host}:{port}")
        # Joined first: the receiver's worker sets its stream up while this one reads the
        # layout (a tree's takes some milliseconds on each side).
        self.conn.send(encode_frame(FrameType.JOIN, join.encode()))
        known = layout.recall(msg.layout)  # forked with it in memory: nothing to read
        if known is None:
            plan = layout.read(msg.layout)
            self.space = plan.space()
        else:
            plan, self.space = known
        self.refs = plan.files
        ctx = BlockContext(
            session_id=msg.session_id,
            stream=self.stream,
            space=self.space,
            manifest_id=msg.manifest_id,
            rekey_records=msg.rekey_records,
            rekey_bytes=msg.rekey_bytes,
        )
        self.sealer = BlockSealer(stream_secret=secret, ctx=ctx)
        self.acks = AckChannel(stream_secret=secret, ctx=ctx)
        del secret, msg
        # Source files are opened as their blocks come (a tree has many): a few stay open.
        self.fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.pace = 0
        self.buf = bytearray(self.space.block_size)
        self.view = memoryview(self.buf)
        reader = threading.Thread(target=self.read_acks, name="acks", daemon=True)
        reader.start()
        get = Get(self.slot)
        work = self.request(get)
        while isinstance(work, Blocks):
            self.link.ask(get)  # the next batch, while this one goes
            self.set_pace(work.pace)
            for seq in work.blocks:
                self.send_block(seq)
            work = self.reply()
        self.finishing.set()
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(timeout=30)

    def set_pace(self, pace: int) -> None:
        """This stream's share of ``--limit-rate``: the kernel paces the socket's packets
        (SO_MAX_PACING_RATE, bytes a second; ~0 is no limit), so there are no bursts."""
        if pace == self.pace:
            return
        self.pace = pace
        # a share beyond what the option can say (~4.3 GB/s a stream) is no limit at all
        rate = pace if 0 < pace < _NO_PACING else _NO_PACING
        try:
            # as an unsigned 32-bit value: ~0 (no limit) does not fit a C int
            self.conn.sock.setsockopt(
                socket.SOL_SOCKET, _SO_MAX_PACING_RATE, struct.pack("=I", rate)
            )
        except OSError:
            pass  # (not Linux): the limit is not kept on this stream

    def send_block(self, seq: int) -> None:
        """Read, digest, seal and send one block. The digest is recorded before the block goes
        out, so it is there when the block's acknowledgement arrives."""
        if _stop_requested.is_set():  # a SIGTERM whose raise was lost in a finalizer
            raise SystemExit(1)
        self.drain_resends()
        where = self.space.locate(seq)
        plain = self.view[: where.length]
        if where.count > 1:
            self.read_pack(where, plain)
        else:
            fd = self.source(where.entry)
            got = os.preadv(fd, [plain], where.offset)
            if got != where.length:
                raise SourceChangedError("the source file shrank during the transfer")
            check_read(fd, self.ref(where.entry))
        self.digests[seq] = block_digest(plain)
        self.sent += 1  # counted as it starts: a block cut short on the wire still went out
        self.conn.send(self.sealer.seal(seq, plain, entry=where.entry, offset=where.offset))

    def read_pack(self, where: BlockRef, plain: memoryview) -> None:
        """A pack's small files, each whole, back to back: each is opened, read and closed
        here (one read a file; they would only churn the descriptors kept open)."""
        for entry, at, length in self.space.members(where):
            read_whole(self.ref(entry), plain[at : at + length])

    def ref(self, entry: int) -> FileRef:
        """Where entry ``entry``'s data comes from, as the layout pins it."""
        ref = self.refs[entry]
        if ref is None:
            raise ProtocolError(f"entry {entry} of the layout has no source file")
        return ref

    def source(self, entry: int) -> int:
        """The descriptor of entry ``entry``'s source file, proved to be the pinned one."""
        fds = self.fds
        fd = fds.get(entry)
        if fd is not None:
            fds.move_to_end(entry)
            return fd
        ref = self.ref(entry)
        if len(fds) >= OPEN_SOURCES:
            os.close(fds.popitem(last=False)[1])
        fd = fds[entry] = open_source(ref)
        return fd

    def drain_resends(self) -> None:
        while True:
            try:
                seq = self.resend.get_nowait()
            except queue.Empty:
                return
            self.check_alive()
            self.send_block(seq)
            channel.send(self.report, Retransmit(self.slot, seq))

    def read_acks(self) -> None:
        report = self.link.report_socket()
        try:
            while True:
                try:
                    ftype, payload = self.conn.recv_frame(cap=_ack_cap)
                except ConnectError:
                    if self.finishing.is_set():
                        return
                    raise
                if ftype is FrameType.ERROR:
                    err = ErrorMsg.decode(payload)
                    raise error_from_wire(err.code, err.message)
                if ftype is not FrameType.ACK:
                    raise ProtocolError(f"unexpected {ftype.name} on a data stream")
                ack = Ack.decode(self.acks.open(payload))
                if ack.durable:
                    done = tuple((seq, self.digests.pop(seq, b"")) for seq in ack.durable)
                    channel.send(report, Acked(self.slot, done, self.sent))
                for seq in ack.resend:
                    self.resend.put(seq)
        except BaseException as exc:  # report every failure, then stop the worker
            try:
                if not self.finishing.is_set():
                    self.fail(report, exc)
            except zmq.ZMQError:
                pass  # the main thread is already tearing the process down
            self.failed.set()
        finally:
            try:
                report.close()
            except zmq.ZMQError:
                pass


#: Set by SIGTERM. The handler raises SystemExit in the main thread wherever it is, which
#: unwinds through main()'s ``finally`` (the last reports are flushed) -- unless the signal
#: lands in a finalizer or a weakref callback, where Python ignores exceptions: there the
#: raise is lost (and ``_quiet_unraisable`` keeps it off stderr), and ``check_alive`` acts on
#: the flag at the worker's next poll.
_stop_requested = threading.Event()


def _stop(signum: int, frame: object) -> None:
    _stop_requested.set()
    raise SystemExit(1)


def _quiet_unraisable(args: Any) -> None:
    """``sys.unraisablehook``: say nothing of a stop signal's SystemExit raised where it could
    not propagate (it once printed "Exception ignored in: <function WeakSet...>" into a
    user's terminal); report anything else as Python does."""
    if isinstance(args.exc_value, SystemExit) and _stop_requested.is_set():
        return
    sys.__unraisablehook__(args)


def _quiet_thread_exception(args: Any) -> None:
    """``threading.excepthook``: once the coordinator has asked this worker to stop, a thread
    that trips over what the stopping main thread tears down (its ZeroMQ context) says
    nothing: the worker is killed moments later, and half a line of "Exception in thread"
    once ended up in front of the user's error line. Before a stop, Python's report."""
    if _stop_requested.is_set():
        return
    threading.__excepthook__(args)


def install_signal_handlers() -> None:
    """The coordinator decides when a worker stops, and says so with SIGTERM; Ctrl-C and a
    closed terminal reach the worker too, and are ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    sys.unraisablehook = _quiet_unraisable
    threading.excepthook = _quiet_thread_exception


def main(argv: list[str]) -> int:
    ctl_endpoint, report_endpoint, slot, parent = argv
    ipc.harden_process()
    ipc.freeze_heap()
    ipc.name_process(ipc.SENDER_WORKER_NAME)
    install_signal_handlers()
    worker = Worker(ctl_endpoint, report_endpoint, int(slot), int(parent))
    try:
        worker.run()
        return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    except BaseException as exc:
        worker.fail(worker.report, exc)
        return 1
    finally:
        # On the way out a SIGTERM has nothing left to unwind: ignore it, so that it cannot
        # interrupt the last report or the interpreter's clean-up (zmq's __del__ would print
        # the SystemExit as an ignored exception); the coordinator SIGKILLs a worker that hangs.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The final count of blocks sent (the ``acked`` reports carry it too, but blocks sent
        # after the last ack -- a session that failed -- are only counted here).
        worker.stopping.set()
        if worker.beater.is_alive():
            worker.beater.join(timeout=1)
        try:
            channel.send(worker.report, Sent(worker.slot, worker.sent), block=False)
        except zmq.ZMQError:
            pass
        worker.ctx.destroy(linger=200)


#: A spare's arguments: the one line it waits for is at most this long (PIPE_BUF: a helper
#: writes it at once).
SPARE_ARGS_MAX = 4096


def spare_main(fd: int) -> int:
    """A worker started ahead of its work (``stxpar.helper.Spares``), forked or a new
    interpreter: named already, it waits for its four arguments, one line on ``fd``, and then
    runs as ``main``; it ends at once, quietly, at end of file (its helper went away first) or
    for anything but four words."""
    ipc.name_process(ipc.SENDER_WORKER_NAME)
    try:
        data = os.read(fd, SPARE_ARGS_MAX)
    finally:
        os.close(fd)
    args = data.decode(errors="replace").split()
    return main(args) if len(args) == 4 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
