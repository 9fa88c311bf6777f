"""Sender worker: one TCP stream, pulls block lists from the coordinator over ZeroMQ.

Main thread: ``get`` -> ``blocks [..]`` (the next ``get`` goes out at once, so the following
batch is waiting by the time this one is sent) -> for each block pread into a reused buffer,
digest, seal into a reused frame buffer, send. Reader thread: reads the receiver's MAC'd acks
and reports durable blocks to the coordinator (``acked``) together with their digests, which
the main thread recorded before the block went out; hands resend requests to the main thread.
Any failure is reported (``error``) and ends the process. The worker never sees the PSK or any
other stream's key.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import stat
import sys
import threading
from typing import Any

import zmq

from stxpar import ipc
from stxpar.digest import block_digest
from stxpar.errors import ConnectError, IntegrityError, ProtocolError, StxError, error_from_wire
from stxpar.netio import FramedSocket, connect
from stxpar.records import AckChannel, BlockContext, BlockSealer, join_mac
from stxpar.wire import (
    MAX_ACK_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    Ack,
    ErrorMsg,
    FrameType,
    Join,
    block_len,
    encode_frame,
)

POLL_MS = 100
#: stxpar.sender.REPLACED (not imported from there: a worker keeps its imports small).
REPLACED = "the source file was replaced during the transfer"


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
        self.dealer = ipc.configure(self.ctx.socket(zmq.DEALER))
        self.dealer.connect(ctl_endpoint)
        self.report = ipc.configure(self.ctx.socket(zmq.PUSH), linger_ms=2000)
        self.report.connect(report_endpoint)
        self.report_endpoint = report_endpoint
        self.slot = slot
        self.parent = parent
        self.resend: queue.Queue[int] = queue.Queue()
        #: Digests of blocks sent and not yet acknowledged (the main thread adds, the reader
        #: thread takes; single dict operations are atomic under the GIL).
        self.digests: dict[int, bytes] = {}
        self.sent = 0
        self.failed = threading.Event()
        self.finishing = threading.Event()

    # -- coordinator link
    def request(self, *fields: Any) -> list[Any]:
        self.dealer.send(ipc.pack(*fields))
        return self.reply()

    def reply(self) -> list[Any]:
        while True:
            if self.dealer.poll(POLL_MS):
                return ipc.unpack(self.dealer.recv())
            self.check_alive()
            self.drain_resends()

    def check_alive(self) -> None:
        if self.failed.is_set() or _stop_requested.is_set():
            raise SystemExit(1)
        if os.getppid() != self.parent:
            raise SystemExit(1)

    def fail(self, sock: zmq.Socket, exc: BaseException) -> None:
        if isinstance(exc, StxError):
            code, message = exc.wire_code, str(exc)
        else:
            code, message = 1, f"worker error: {type(exc).__name__}: {exc}"
        sock.send(ipc.pack("error", self.slot, code, message))

    # -- data path
    def run(self) -> None:
        msg = self.request("hello", self.slot)
        if msg[0] != "setup":
            return
        cfg: dict[str, Any] = msg[1]
        self.stream = int(cfg["stream"])
        self.size = int(cfg["size"])
        self.block_size = int(cfg["block_size"])
        ctx = BlockContext(
            session_id=cfg["session_id"],
            stream=self.stream,
            file_size=self.size,
            file_id=cfg["file_id"],
            block_size=self.block_size,
            rekey_records=int(cfg["rekey_records"]),
            rekey_bytes=int(cfg["rekey_bytes"]),
        )
        secret: bytes = cfg.pop("secret")
        self.sealer = BlockSealer(stream_secret=secret, ctx=ctx)
        self.acks = AckChannel(stream_secret=secret, ctx=ctx)
        join = Join(
            session_id=ctx.session_id,
            stream=self.stream,
            mac=join_mac(stream_secret=secret, session_id=ctx.session_id, stream=self.stream),
        )
        del secret
        self.fd = open_source(cfg)
        self.buf = bytearray(self.block_size)
        self.view = memoryview(self.buf)
        sock = connect(
            cfg["host"],
            int(cfg["port"]),
            max_retries=2,
            timeout=float(cfg["connect_timeout"]),
        )
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.conn = FramedSocket(sock, peer=f"{cfg['host']}:{cfg['port']}")
        self.conn.send(encode_frame(FrameType.JOIN, join.encode()))
        reader = threading.Thread(target=self.read_acks, name="acks", daemon=True)
        reader.start()
        msg = self.request("get", self.slot)
        while msg[0] == "blocks":
            self.dealer.send(ipc.pack("get", self.slot))  # the next batch, while this one goes
            for seq in msg[1]:
                self.send_block(int(seq))
            msg = self.reply()
        self.finishing.set()
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(timeout=30)

    def send_block(self, seq: int) -> None:
        """Read, digest, seal and send one block. The digest is recorded before the block goes
        out, so it is there when the block's acknowledgement arrives."""
        if _stop_requested.is_set():  # a SIGTERM whose raise was lost in a finalizer
            raise SystemExit(1)
        self.drain_resends()
        n = block_len(index=seq, size=self.size, block_size=self.block_size)
        plain = self.view[:n]
        got = os.preadv(self.fd, [plain], seq * self.block_size)
        if got != n:
            raise IntegrityError("the source file shrank during the transfer")
        self.digests[seq] = block_digest(plain)
        self.sent += 1  # counted as it starts: a block cut short on the wire still went out
        self.conn.send(self.sealer.seal(seq, plain))

    def drain_resends(self) -> None:
        while True:
            try:
                seq = self.resend.get_nowait()
            except queue.Empty:
                return
            self.check_alive()
            self.send_block(seq)
            self.report.send(ipc.pack("retransmit", self.slot, seq))

    def read_acks(self) -> None:
        report = ipc.configure(self.ctx.socket(zmq.PUSH), linger_ms=2000)
        report.connect(self.report_endpoint)
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
                    done = [(seq, self.digests.pop(seq, b"")) for seq in ack.durable]
                    report.send(ipc.pack("acked", self.slot, done, self.sent))
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


def open_source(cfg: dict[str, Any]) -> int:
    """Open the source the coordinator resolved and pinned, and prove it is that file.

    The coordinator's checks were made on its own descriptor; this process opens the file
    again, by name, later. Whoever can rename entries in the source's directory may have put
    another file, or a symlink to one, there meanwhile: O_NOFOLLOW refuses a symlink as the
    last component (the coordinator already resolved the one the user may have named), and the
    identity and state of what was opened must be the coordinator's, else IntegrityError (exit
    5) before a byte of it is read."""
    path = cfg["path"]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise IntegrityError(f"{REPLACED} ({path}: {exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (cfg["dev"], cfg["ino"]) or not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{REPLACED} ({path} names another file now)")
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
            cfg["size"],
            cfg["mtime_ns"],
            cfg["ctime_ns"],
        ):
            raise IntegrityError(
                f"{path} changed during the transfer (size, modification or change time);"
                " send it again once it is stable"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def install_signal_handlers() -> None:
    """The coordinator decides when a worker stops, and says so with SIGTERM; Ctrl-C and a
    closed terminal reach the worker too, and are ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    sys.unraisablehook = _quiet_unraisable


def main(argv: list[str]) -> int:
    ctl_endpoint, report_endpoint, slot, parent = argv
    ipc.harden_process()
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
        try:
            worker.report.send(ipc.pack("sent", worker.slot, worker.sent), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        worker.ctx.destroy(linger=200)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
