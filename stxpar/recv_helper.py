"""A receiving helper (``stx worker --join ... --data-listen HOST:PORT``): data streams on its
own host, for a receiver coordinator on another.

Theory of operation
-------------------
``RecvSide`` binds the data port once (before ``Join``, which says its address: with port 0 the
port the kernel chose; a wildcard host is replaced by this host's name) and keeps it, its
worker processes and its gatekeeper for as long as the helper runs, across coordinators.

Per session the coordinator sends the layout (``SessionLayout``) and one ``StreamOffer``: the
stream secrets of the streams it routed here, and where their blocks land (the partial file or
a tree's staging directory, by absolute path and inode). The path must be the same inode here
(a shared file system): its ``st_dev``, which differs between hosts, is replaced with this
host's after the inode number and the kind (file, directory) are checked; otherwise the answer
is ``Offered(ok=False)`` and the coordinator keeps those streams.

The data port is the receiver's own gatekeeper (``gatekeeper.Gatekeeper``: one selector
loop, deadlines, caps and eviction before authentication) with no key at all, so that only a
JOIN can pass: it must name a stream offered here (session id and stream id) and prove that
stream's key (``records.verify_join``, the registry's check); each stream is taken once. A bad
JOIN is dropped with nothing revealed. The socket then goes to one of the local receiver
workers exactly as the receiver hands it over (``recvpool.ReceiverPool``: SCM_RIGHTS and a
``StreamJob``).

The workers report on this process's own PULL socket; each report (``Landed``,
``StreamFailed``, ``StreamClosed``) is relayed whole to the coordinator (``Report``), which
feeds it to the session. Liveness of the workers (``Ready``, ``Beat``) stays here: the pool
replaces a worker that dies or hangs, as a receiver does. ``RecvCancel`` ends a session: its
streams are cut and its secrets and layout forgotten.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from . import ipc
from . import layout as layout_file
from .channel import report_pull
from .config import DEFAULT_SYNC_BYTES
from .errors import AuthError, ProtocolError
from .gatekeeper import Gatekeeper, GateLimits, hand_over
from .handshake import ReplayCache
from .messages import (
    MAX_CLUSTER,
    RECEIVER_REPORTS,
    Landed,
    Message,
    Offered,
    RecvCancel,
    Report,
    SessionLayout,
    StreamClosed,
    StreamFailed,
    StreamJob,
    StreamOffer,
    decode,
    encode,
)
from .netio import FramedSocket, listen_all, parse_hostport
from .records import verify_join
from .recvpool import CHECK_EVERY_S, ReceiverPool
from .wire import Join

LogFn = Callable[[str], None]
UpFn = Callable[[Message], None]
#: Sessions whose offers a helper holds at once (each ends with ``RecvCancel``).
MAX_SESSIONS = 256


@dataclass(frozen=True)
class _Offer:
    secret: bytes
    job: StreamOffer
    inode: tuple[int, int] | None


def advertised(host: str, port: int) -> str:
    """The address to give the coordinator for a data port bound at ``host:port``."""
    if host in ("", "0.0.0.0", "::", "*"):
        host = socket.getfqdn() or socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_inode(path: str, inode: tuple[int, int] | None, *, tree: bool) -> tuple[int, int] | None:
    """``inode`` as this host sees ``path``: its own ``st_dev``, after checking that the
    path is the same inode number and kind (a directory for a tree). ``OSError`` when it is
    not (or cannot be looked at)."""
    if inode is None:
        return None
    st = os.lstat(path)
    kind = stat.S_ISDIR if tree else stat.S_ISREG
    if not kind(st.st_mode) or st.st_ino != inode[1]:
        raise OSError(f"{path} is not the coordinator's {'directory' if tree else 'file'} here")
    return (st.st_dev, st.st_ino)


def split_landed(body: bytes, limit: int = MAX_CLUSTER - 1024) -> list[bytes]:
    """A worker's report as bodies that each fit a cluster message (a ``Landed`` of very many
    blocks is split; ProtocolError for anything else too large)."""
    if len(body) <= limit:
        return [body]
    msg = decode(body, expect=(Landed,))
    if len(msg.blocks) < 2:
        raise ProtocolError("a worker report too large for the cluster channel")
    half = len(msg.blocks) // 2
    first = Landed(msg.session_id, msg.stream, msg.blocks[:half])
    second = Landed(msg.session_id, msg.stream, msg.blocks[half:])
    return split_landed(encode(first), limit) + split_landed(encode(second), limit)


class RecvSide:
    """A receiving helper's data port, workers and offers (see the module's docstring)."""

    def __init__(self, data_listen: str, *, workers: int, log: LogFn) -> None:
        host, port = parse_hostport(data_listen)
        self.n, self.log = workers, log
        self.listeners = listen_all(host, port)
        self.address = advertised(host, self.listeners[0].getsockname()[1])
        self.lock = threading.Lock()
        self.offers: dict[tuple[bytes, int], _Offer] = {}
        self.layouts: dict[bytes, str] = {}
        self.parts: dict[bytes, list[bytes]] = {}
        self.taken: set[tuple[bytes, int]] = set()
        #: blocks landed per session (the log line at its end), and in all
        self.landed: dict[bytes, int] = {}
        self.blocks = 0
        #: sessions that ended having landed blocks here (``--once``)
        self.sessions_done = 0
        self.refused_joins = 0
        self.up: UpFn | None = None
        self.ctx: zmq.Context | None = None
        self.pull: zmq.Socket | None = None
        self.pool: ReceiverPool | None = None
        self.gate: Gatekeeper | None = None
        self.workdir = ""
        self.last_check = 0.0

    # ------------------------------------------------------------ start, stop

    def start(self) -> None:
        """Start the workers and the data port (once, at the first receiver's Welcome)."""
        if self.pool is not None:
            return
        self.workdir = ipc.private_dir("stx-rhelp-")
        self.ctx = zmq.Context()
        endpoint = f"ipc://{self.workdir}/report"
        self.pull = report_pull(self.ctx, endpoint)
        self.pool = ReceiverPool(self.n, endpoint, sync_bytes=DEFAULT_SYNC_BYTES)
        self.gate = Gatekeeper(
            self.listeners,
            keyring={},  # no key: an INIT can never pass, only an offered stream's JOIN
            replay=ReplayCache(),
            window_ms=1,
            limits=GateLimits(),
            on_join=self._serve_join,
            on_control=self._no_control,
            on_event=self._gate_event,
        )
        self.gate.start()

    def close(self) -> None:
        if self.gate is not None:
            self.gate.stop()
        else:
            for lsock in self.listeners:
                lsock.close()
        if self.pool is not None:
            with self.lock:
                sids = list(self.layouts)
            for sid in sids:
                self.pool.cancel(sid)
            self.pool.stop()
        if self.pull is not None:
            self.pull.close(linger=0)
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
        if self.workdir:
            ipc.remove_dir(self.workdir)

    # ------------------------------------------------------------ the data port (gate thread)

    def _no_control(self, *args: object) -> None:
        raise AuthError("this is a helper's data port: data streams only")

    def _gate_event(self, kind: str, fields: dict[str, object]) -> None:
        if kind == "rejected":
            self.refused_joins += 1
            if self.refused_joins <= 5 or self.refused_joins % 100 == 0:
                self.log(f"refused a connection from {fields.get('peer')}: {fields.get('error')}")

    def _serve_join(self, fs: FramedSocket, payload: bytes, release: Callable[[], None]) -> None:
        join = Join.decode(payload)
        key = (join.session_id, join.stream)
        with self.lock:
            offer = self.offers.get(key)
        if offer is None:
            raise AuthError("data stream for a session or stream not routed to this helper")
        verify_join(
            stream_secret=offer.secret,
            session_id=join.session_id,
            stream=join.stream,
            tag=join.mac,
        )
        with self.lock:
            if key in self.taken or key not in self.offers:
                raise AuthError(f"stream {join.stream} refused (repeated or cancelled)")
            self.taken.add(key)
            layout = self.layouts.get(join.session_id, "")
        release()
        o = offer.job
        job = StreamJob(
            session_id=join.session_id,
            stream=join.stream,
            secret=offer.secret,
            path=o.path,
            tree=o.tree,
            layout=layout,
            manifest_id=o.manifest_id,
            rekey_records=o.rekey_records,
            rekey_bytes=o.rekey_bytes,
            sync_bytes=o.sync_bytes,
            streams=o.nstreams,
            inode=offer.inode,
        )
        pool = self.pool
        assert pool is not None
        hand_over(fs, lambda sock: pool.hand_over(job, sock))

    # ------------------------------------------------------------ the coordinator (main thread)

    def handle(self, msg: Message) -> None:
        """A message from the coordinator for the receiving side."""
        if isinstance(msg, SessionLayout):
            self._layout_part(msg)
        elif isinstance(msg, StreamOffer):
            self._offer(msg)
        elif isinstance(msg, RecvCancel):
            self.end_session(msg.session_id)

    def _say(self, msg: Message) -> None:
        if self.up is not None:
            self.up(msg)

    def _layout_part(self, msg: SessionLayout) -> None:
        sid = msg.session_id
        if msg.index == 0:
            if sid not in self.parts and len(self.parts) + len(self.layouts) >= MAX_SESSIONS:
                raise ProtocolError("too many sessions at once")
            self.parts[sid] = []
        parts = self.parts.get(sid)
        if parts is None or msg.index != len(parts):
            raise ProtocolError("layout parts out of order")
        parts.append(msg.data)
        if sum(map(len, parts)) > layout_file.MAX_LAYOUT:
            raise ProtocolError("the transfer's layout is too large")
        if not msg.last:
            return
        data = b"".join(self.parts.pop(sid))
        layout_file.Layout.decode(data)  # ProtocolError for garbage
        path = os.path.join(self.workdir, f"layout-{sid.hex()}")
        with open(path, "wb") as f:
            f.write(data)
        with self.lock:
            self.layouts[sid] = path

    def _offer(self, msg: StreamOffer) -> None:
        sid = msg.session_id
        if len(msg.secrets) != len(msg.streams) or len(sid) != 16:
            raise ProtocolError("a malformed stream offer")
        if sid not in self.layouts:
            self._say(Offered(sid, False, "no layout before the offer"))
            return
        try:
            inode = local_inode(msg.path, msg.inode, tree=msg.tree)
        except OSError as exc:
            why = f"the destination is not visible here as the receiver sees it: {exc}"
            self.log(f"refused a transfer: {why}")
            self._say(Offered(sid, False, why[:500]))
            self.end_session(sid, quiet=True)
            return
        with self.lock:
            for stream, secret in zip(msg.streams, msg.secrets, strict=True):
                self.offers[(sid, stream)] = _Offer(secret, msg, inode)
        self.landed.setdefault(sid, 0)
        self._say(Offered(sid, True, ""))

    def end_session(self, sid: bytes, *, quiet: bool = False) -> None:
        with self.lock:
            self.offers = {k: v for k, v in self.offers.items() if k[0] != sid}
            self.taken = {k for k in self.taken if k[0] != sid}
            path = self.layouts.pop(sid, None)
        self.parts.pop(sid, None)
        if self.pool is not None:
            self.pool.cancel(sid)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        landed = self.landed.pop(sid, 0)
        if landed and not quiet:
            self.sessions_done += 1
            self.log(f"transfer done: {landed} blocks landed ({self.blocks} in all)")

    def end_all(self) -> None:
        """The coordinator is gone or released this helper: every session ends."""
        with self.lock:
            sids = set(self.layouts) | {k[0] for k in self.offers}
        for sid in sids | set(self.parts) | set(self.landed):
            self.end_session(sid)

    # ------------------------------------------------------------ the workers' reports

    def relay(self) -> None:
        """Pass on what the workers reported; check the pool now and then."""
        assert self.pull is not None and self.pool is not None
        while self.pull.poll(0):
            body = self.pull.recv()
            try:
                msg = decode(body, expect=RECEIVER_REPORTS)
            except ProtocolError:
                continue  # a worker's garbage is not passed on
            if isinstance(msg, StreamClosed | StreamFailed):
                self.pool.released(msg.session_id, msg.stream)
            if isinstance(msg, Landed) and msg.session_id in self.landed:
                self.landed[msg.session_id] += len(msg.blocks)
                self.blocks += len(msg.blocks)
            try:
                for part in split_landed(body):
                    self._say(Report(part))
            except ProtocolError:
                continue
        now = time.monotonic()
        if now - self.last_check >= CHECK_EVERY_S:
            self.last_check = now
            self.pool.check()
