"""Sender coordinator: handshake, metadata, a pool of worker processes, end and receipt.

Theory of operation
-------------------
The coordinator owns the control connection and the session keys. It never sends file data.
It binds two ZeroMQ sockets in a private directory: a ROUTER on which workers ask for work
(``hello`` -> ``setup``, ``get`` -> ``blocks [...]`` | ``done``) and a PULL on which they report
(``joined``, ``sent`` with block digests, ``acked`` with durable blocks, ``retransmit``,
``error``). Work is a shared pull queue of block indices handed out in small batches, so a slow
stream never holds the tail. A block is complete when it is acknowledged as durable by the
receiver and its digest is known; when every needed block is complete the coordinator sends
END with the whole-file digest and succeeds only on a valid RECEIPT.
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from . import ipc
from .config import SendOptions, TransferResult
from .digest import DIGEST_LEN, file_digest
from .errors import (
    ConnectError,
    IntegrityError,
    ProtocolError,
    StxError,
    UsageError,
    error_from_wire,
)
from .handshake import ClientHandshake, handshake_cap
from .keyschedule import SessionKeys
from .netio import FramedSocket, connect
from .records import ControlChannel
from .wire import (
    MAX_CONTROL_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    End,
    ErrorMsg,
    FrameType,
    Metadata,
    MetadataAck,
    Receipt,
    blocks_for,
)

#: progress(done_bytes, total_bytes): called from the coordinator's loop, a few times a second.
ProgressFn = Callable[[int, int], None]
POLL_MS = 100
RECEIPT_TIMEOUT = 300.0
WORKER_EXIT_TIMEOUT = 10.0


def _control_cap(ftype: FrameType) -> int:
    if ftype in (FrameType.METADATA_ACK, FrameType.RECEIPT):
        return MAX_CONTROL_PAYLOAD
    if ftype is FrameType.ERROR:
        return MAX_HANDSHAKE_PAYLOAD
    return -1


@dataclass(frozen=True)
class SourceFile:
    path: Path
    size: int
    mtime_ns: int
    file_id: bytes

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SourceFile:
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise UsageError(f"{p}: no such file") from None
        except OSError as exc:
            raise UsageError(f"{p}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{p} is a directory (stx sends one file)")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{p} is not a regular file")
        try:
            os.close(os.open(p, os.O_RDONLY))
        except OSError as exc:
            raise UsageError(f"{p}: cannot read: {exc.strerror}") from None
        real = os.path.realpath(p)
        ident = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}".encode()
        return cls(p, st.st_size, st.st_mtime_ns, hashlib.sha256(ident).digest()[:16])


@dataclass
class _Stream:
    """A worker process and the stream it drives."""

    slot: int
    stream: int
    proc: subprocess.Popen[bytes]
    identity: bytes = b""
    assigned: set[int] = field(default_factory=set)
    done: bool = False


class _Transfer:
    """Everything between METADATA_ACK and END: the pool, the queue, the accounting."""

    def __init__(
        self,
        *,
        src: SourceFile,
        md: Metadata,
        session: SessionKeys,
        host: str,
        port: int,
        opts: SendOptions,
        needed: list[int],
        ctl: FramedSocket,
        progress: ProgressFn | None,
    ) -> None:
        self.src, self.md, self.session, self.opts = src, md, session, opts
        self.host, self.port, self.ctl, self.progress = host, port, ctl, progress
        self.total = md.total_blocks
        self.queue: collections.deque[int] = collections.deque(needed)
        self.needed = len(needed)
        self.digests = bytearray(self.total * DIGEST_LEN)
        self.have_digest = bytearray(self.total)
        self.acked = bytearray(self.total)
        self.complete = 0
        self.done_bytes = 0
        self.retransmits = 0
        self.blocks_sent = 0
        self.streams: dict[int, _Stream] = {}
        self.parked: list[bytes] = []
        self.next_stream = 0
        self.last_progress = time.monotonic()

    # -- the pool
    def run(self) -> None:
        workdir = ipc.private_dir("stx-send-")
        zctx = zmq.Context()
        router = ipc.configure(zctx.socket(zmq.ROUTER))
        pull = ipc.configure(zctx.socket(zmq.PULL))
        try:
            ctl_ep, rep_ep = f"ipc://{workdir}/ctl", f"ipc://{workdir}/report"
            router.bind(ctl_ep)
            pull.bind(rep_ep)
            n = min(self.opts.workers or 1, max(1, self.needed))
            for slot in range(n):
                proc = ipc.spawn_worker("stxpar.workers.sender", ctl_ep, rep_ep, str(slot))
                self.streams[slot] = _Stream(slot=slot, stream=-1, proc=proc)
            self._loop(router, pull)
        finally:
            self._stop_workers(router)
            zctx.destroy(linger=0)
            ipc.remove_dir(workdir)

    def _loop(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        poller.register(self.ctl.sock.fileno(), zmq.POLLIN)
        last_report = 0.0
        while self.complete < self.needed:
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
            self._check_workers()
            if now - self.last_progress > self.opts.stall_timeout:
                raise ConnectError(
                    f"transfer stalled: no progress for {self.opts.stall_timeout:.0f} s"
                )
            if self.progress is not None and now - last_report >= 0.2:
                last_report = now
                self.progress(self.done_bytes, self.src.size)
        if self.progress is not None:
            self.progress(self.done_bytes, self.src.size)
        for identity in self.parked:
            router.send_multipart([identity, ipc.pack("done")])
        self.parked.clear()

    def _on_request(self, router: zmq.Socket, identity: bytes, msg: list) -> None:
        verb, slot = msg[0], msg[1]
        st = self.streams.get(slot)
        if st is None:
            return
        if verb == "hello":
            st.identity = identity
            st.stream = self.next_stream
            self.next_stream += 1
            setup = {
                "stream": st.stream,
                "secret": self.session.stream_secret(st.stream),
                "session_id": self.session.session_id,
                "host": self.host,
                "port": self.port,
                "path": os.fspath(self.src.path),
                "size": self.src.size,
                "block_size": self.md.block_size,
                "file_id": self.md.file_id,
                "rekey_records": self.md.rekey_records,
                "rekey_bytes": self.md.rekey_bytes,
                "max_retries": self.opts.max_retries,
                "connect_timeout": self.opts.connect_timeout,
            }
            router.send_multipart([identity, ipc.pack("setup", setup)])
        elif verb == "get":
            batch = self._take_batch()
            if batch:
                st.assigned.update(batch)
                router.send_multipart([identity, ipc.pack("blocks", batch)])
            elif self.complete >= self.needed:
                router.send_multipart([identity, ipc.pack("done")])
                st.done = True
            else:
                self.parked.append(identity)

    def _take_batch(self) -> list[int]:
        if not self.queue:
            return []
        k = max(1, min(16, len(self.queue) // (2 * max(1, len(self.streams)))))
        return [self.queue.popleft() for _ in range(min(k, len(self.queue)))]

    def _on_report(self, msg: list) -> None:
        verb, slot = msg[0], msg[1]
        st = self.streams.get(slot)
        if verb == "sent":
            for seq, digest in msg[2]:
                if 0 <= seq < self.total and len(digest) == DIGEST_LEN:
                    self.digests[seq * DIGEST_LEN : (seq + 1) * DIGEST_LEN] = digest
                    self.blocks_sent += 1
                    if not self.have_digest[seq]:
                        self.have_digest[seq] = 1
                        self._maybe_complete(seq)
        elif verb == "acked":
            for seq in msg[2]:
                if 0 <= seq < self.total and not self.acked[seq]:
                    self.acked[seq] = 1
                    if st is not None:
                        st.assigned.discard(seq)
                    self._maybe_complete(seq)
        elif verb == "retransmit":
            self.retransmits += 1
        elif verb == "error":
            code, message = msg[2], msg[3]
            raise error_from_wire(code, message) if code != 1 else StxError(message)

    def _maybe_complete(self, seq: int) -> None:
        if self.acked[seq] and self.have_digest[seq]:
            self.complete += 1
            self.done_bytes += min(self.md.block_size, self.src.size - seq * self.md.block_size)
            self.last_progress = time.monotonic()

    def _on_control(self) -> None:
        ftype, payload = self.ctl.recv_frame(cap=_control_cap)
        if ftype is FrameType.ERROR:
            err = ErrorMsg.decode(payload)
            raise error_from_wire(err.code, err.message)
        raise ProtocolError(f"unexpected {ftype.name} on the control connection")

    def _check_workers(self) -> None:
        for st in self.streams.values():
            rc = st.proc.poll()
            if rc is not None and not st.done and rc != 0:
                raise StxError(f"sender worker {st.slot} exited unexpectedly (status {rc})")

    def _stop_workers(self, router: zmq.Socket) -> None:
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT
        for st in self.streams.values():
            if st.proc.poll() is None and st.identity and not st.done:
                try:
                    router.send_multipart([st.identity, ipc.pack("done")], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        for st in self.streams.values():
            try:
                st.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                st.proc.kill()
                st.proc.wait()

    def whole_digest(self) -> bytes:
        return file_digest(
            block_digests=self.digests, block_size=self.md.block_size, size=self.src.size
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def handshake(ctl: FramedSocket, *, psk: bytes, timeout: float) -> SessionKeys:
    """Run the client side of the handshake over ``ctl``; return the session keys."""
    hs = ClientHandshake(psk=psk, now_ms=_now_ms())
    ctl.sock.settimeout(timeout)
    for frame in hs.start():
        ctl.send(frame)
    while not hs.established:
        ftype, payload = ctl.recv_frame(cap=handshake_cap)
        for frame in hs.receive(ftype, payload, now_ms=_now_ms()):
            ctl.send(frame)
    assert hs.session is not None
    return hs.session


def _expect_sealed(ctl: FramedSocket, channel: ControlChannel, want: FrameType) -> bytes:
    ftype, payload = ctl.recv_frame(cap=_control_cap)
    if ftype is FrameType.ERROR:
        err = ErrorMsg.decode(payload)
        raise error_from_wire(err.code, err.message)
    if ftype is not want:
        raise ProtocolError(f"expected {want.name}, got {ftype.name}")
    return channel.open(ftype, payload)


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
) -> TransferResult:
    """Send one file to an ``stx recv`` at ``host:port``; return once the receiver's
    authenticated receipt confirms the whole file arrived, verified and durable.

    ``workers`` and ``block_size`` override the same fields of ``options``. Raises a subclass
    of :class:`stxpar.errors.StxError` on failure; its ``exit_code`` is what the CLI exits with.
    """
    base = options or SendOptions()
    opts = SendOptions(
        workers=workers if workers is not None else base.workers,
        block_size=block_size if block_size is not None else base.block_size,
        max_retries=base.max_retries,
        connect_timeout=base.connect_timeout,
        handshake_timeout=base.handshake_timeout,
        stall_timeout=base.stall_timeout,
        rekey_records=base.rekey_records,
        rekey_bytes=base.rekey_bytes,
    ).resolved()
    assert opts.block_size is not None and opts.workers is not None
    if len(psk) < 32:
        raise UsageError("the key must be at least 256 bits")
    src = SourceFile.open(path)
    started = time.monotonic()
    sock = connect(host, port, max_retries=opts.max_retries, timeout=opts.connect_timeout)
    ctl = FramedSocket(sock, peer=f"{host}:{port}")
    try:
        session = handshake(ctl, psk=psk, timeout=opts.handshake_timeout)
        channel = ControlChannel(session=session, client=True)
        md = Metadata(
            name=src.path.name,
            size=src.size,
            mtime_ns=src.mtime_ns,
            block_size=opts.block_size,
            file_id=src.file_id,
            streams=opts.workers,
            rekey_records=opts.rekey_records,
            rekey_bytes=opts.rekey_bytes,
        )
        ctl.send(channel.seal(FrameType.METADATA, md.encode()))
        ctl.sock.settimeout(opts.stall_timeout)
        ack = MetadataAck.decode(_expect_sealed(ctl, channel, FrameType.METADATA_ACK))
        total = blocks_for(src.size, opts.block_size)
        needed = [i for i in range(total) if not _bit(ack.have, i)]
        transfer = _Transfer(
            src=src,
            md=md,
            session=session,
            host=host,
            port=port,
            opts=opts,
            needed=needed,
            ctl=ctl,
            progress=progress,
        )
        if needed:
            ctl.sock.settimeout(None)
            transfer.run()
        digest = transfer.whole_digest()
        ctl.send(channel.seal(FrameType.END, End(total_blocks=total, digest=digest).encode()))
        ctl.sock.settimeout(RECEIPT_TIMEOUT)
        receipt = Receipt.decode(_expect_sealed(ctl, channel, FrameType.RECEIPT))
        if receipt.digest != digest or receipt.size != src.size:
            raise IntegrityError("the receiver's receipt does not match the file sent")
    finally:
        ctl.close()
    return TransferResult(
        file=os.fspath(src.path),
        bytes=src.size,
        seconds=time.monotonic() - started,
        workers=min(opts.workers, max(1, len(needed))),
        block_size=opts.block_size,
        blocks_total=total,
        blocks_sent=transfer.blocks_sent,
        blocks_resumed=total - len(needed),
        retransmits=transfer.retransmits,
        reconnects=0,
        digest=digest.hex(),
    )


def _bit(bitmap: bytes, i: int) -> bool:
    return i // 8 < len(bitmap) and bool(bitmap[i // 8] >> (i % 8) & 1)
