"""A helper host (``stx worker --join``): worker processes for a coordinator on another host.

Theory of operation
-------------------
Only this process holds the PSK. It derives the cluster's CURVE keys from it
(``cluster_auth``), connects a DEALER to the coordinator's cluster port and waits for the
handshake (``wait_handshake``: a refused key is an ``AuthError`` at once; a coordinator that is
not up yet is retried with exponential backoff and jitter, forever), says ``Join`` and learns
its role from the ``Welcome``: ``"send"``, a sender's helper (below), or ``"recv"``, a
receiver's: it then takes data streams on its ``--data-listen`` port (``recv_helper``, bound
once before the first ``Join``, which gives its address) and relays its receiver workers'
reports.

Its workers are the ordinary sender workers (``stxpar.workers.sender``), connected to this
process's own private ipc endpoints (``channel.CoordinatorLink``), exactly as they would be to a
local coordinator. They are started ahead of their work (``Spares``): a new interpreter and its
imports take ~0.1 s of CPU, and eight of them started when the work arrives, on hosts whose
cores are busy with the transfer, made the helpers' streams start up to a second after the
coordinator's. A spare has imported the worker and waits, on a pipe, for its arguments (the
endpoints and its slot; no secret: those come as ``Setup``), and runs the worker when they come.
``stx worker`` forks its first spares before it reads the key (``prestart_spares``: a fork is
ready at once and costs next to no CPU; a worker must never hold the key); later ones, and
those of the API, are new interpreters (never forked from this process, which holds the key),
started before the first join and again whenever a transfer is over, so that they are warm for
the next one. The helper relays: a worker's request goes up as
``Up`` and the coordinator's answer comes back as ``Down``; reports go up as ``Report``
(an ``Acked`` too large for the cluster channel's 1 MiB cap is split). A ``Setup`` coming down
names the coordinator's layout file; the helper rewrites it to its own copy, which it received
as ``LayoutPart``s and checked: every source file must be visible here as the sender sees it
(same inode, size, mtime and ctime; its own ``st_dev``, which differs between the hosts of a
shared file system, is put in), or the helper answers ``Refuse`` and sits the transfer out.

``Release`` ends a transfer: the workers are stopped, and the helper closes the connection and
joins again for the next one (``--once``: it returns). A lost connection (ZeroMQ heartbeats)
stops the workers the same way. A stop signal stops the workers and says ``Bye``.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable

import zmq

from . import cluster_auth as ca
from . import ipc
from . import layout as layout_file
from .channel import CoordinatorLink, Endpoints
from .cluster import (
    BEAT_S,
    CLUSTER_VERSION,
    HEARTBEAT_IVL_MS,
    HEARTBEAT_TIMEOUT_MS,
    _endpoint,
)
from .config import default_workers
from .errors import ConnectError, ProtocolError
from .messages import (
    CLUSTER_DOWN,
    MAX_CLUSTER,
    SENDER_REPLIES,
    SENDER_REPORTS,
    Acked,
    Assign,
    Bye,
    Down,
    Exited,
    HelperBeat,
    Join,
    LayoutPart,
    Message,
    Refuse,
    Release,
    Report,
    Sent,
    Setup,
    Stop,
    Up,
    Welcome,
    decode,
    decode_cluster,
    encode,
)
from .netio import Backoff, parse_hostport
from .recv_helper import RecvSide
from .workers.sender import SPARE_ARGS_MAX, spare_main

#: Seconds one attempt to reach the coordinator may take before the next one is planned.
ATTEMPT_S = 2.0
#: Waits between attempts: 0.1-0.2 s, 0.2-0.4 s, ... up to 1.5-3 s.
JOIN_BACKOFF = Backoff(initial=0.2, factor=2.0, cap=3.0)
#: While it tries to reach the coordinator, ZeroMQ tries again this often (ms; its default,
#: 100, was on average 50 ms of a helper started with its coordinator waiting for nothing).
RECONNECT_IVL_MS = 25
#: Seconds to wait for ``Welcome`` after the handshake.
WELCOME_S = 10.0
#: Seconds a stopped worker has to exit before it is killed.
STOP_GRACE = 2.0
#: Room left in a cluster message around a relayed body.
_OVERHEAD = 1024

LogFn = Callable[[str], None]
Proc = subprocess.Popen[bytes] | ipc.ForkedWorker
#: What a spare started as a new interpreter runs (``python -P -c``): ignore the terminal's
#: signals (the coordinator says when to stop, with SIGTERM), import the worker, keep its stdin
#: (the pipe its arguments come on) aside, and wait (``spare_main``).
SPARE_CODE = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
from stxpar.workers import sender
fd = os.dup(0)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
sys.exit(sender.spare_main(fd))
"""


class Spares:
    """Sender worker processes started ahead of their work, each waiting on a pipe for its
    arguments (see the module's docstring). ``want``: how many to keep; ``fill`` starts the
    missing ones as new interpreters, ``take`` hands one its arguments."""

    def __init__(self, want: int = 0) -> None:
        self.want = want
        self.waiting: list[tuple[Proc, int]] = []  # (the process, its pipe's write end)

    @classmethod
    def forked(cls, n: int) -> Spares:
        """``n`` spares forked from this process, which must hold nothing a worker may not
        see (``stx worker`` calls it before reading the key) and may fork (``ipc.can_fork``)."""
        spares = cls(n)

        def spare(argv: list[str]) -> int:
            fd, *others = (int(x) for x in argv)
            for other in others:  # the other spares' write ends: end of file must reach them
                os.close(other)
            return spare_main(fd)

        try:
            for _ in range(n):
                r, w = os.pipe()
                ends = [str(r), *(str(fd) for _, fd in spares.waiting), str(w)]
                try:
                    proc = ipc.fork_worker(spare, *ends)
                finally:
                    os.close(r)
                spares.waiting.append((proc, w))
        except BaseException:
            spares.close()
            raise
        return spares

    def fill(self) -> None:
        """Start new-interpreter spares until ``want`` wait (the dead ones are dropped)."""
        self._drop_dead()
        while len(self.waiting) < self.want:
            r, w = os.pipe()
            env = dict(os.environ)
            env.pop("STX_PSK_FILE", None)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-P", "-c", SPARE_CODE],
                    stdin=r,
                    env=env,
                    close_fds=True,
                )
            except BaseException:
                os.close(w)
                raise
            finally:
                os.close(r)
            self.waiting.append((proc, w))

    def take(self, args: tuple[str, ...]) -> Proc | None:
        """A spare running the worker with ``args``; None when none is left."""
        line = (" ".join(args) + "\n").encode()
        if len(line) > SPARE_ARGS_MAX or any(not a or a.split() != [a] for a in args):
            return None
        while self.waiting:
            proc, w = self.waiting.pop(0)
            try:
                if proc.poll() is None:
                    os.write(w, line)
                    return proc
            except OSError:  # it died meanwhile (EPIPE)
                _stop(proc)
            finally:
                os.close(w)
        return None

    def _drop_dead(self) -> None:
        for item in list(self.waiting):
            if item[0].poll() is not None:
                self.waiting.remove(item)
                os.close(item[1])

    def close(self) -> None:
        """Stop the spares that still wait."""
        waiting, self.waiting = self.waiting, []
        for _, w in waiting:
            os.close(w)  # end of file: each one exits on its own
        for proc, _ in waiting:
            _stop(proc)


def _stop(proc: Proc) -> None:
    """Stop ``proc`` (SIGTERM, SIGKILL after ``STOP_GRACE``) and reap it."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prestart_spares(workers: int | None, *, data_listen: str = "") -> Spares | None:
    """Fork the spares that ``serve_helper`` with the same arguments will want, where this
    process may fork (else None, and ``serve_helper`` starts new interpreters). Call it before
    the key is read. None too with ``data_listen``: such a helper serves receivers (whose
    workers are not these), and starts spares only once a sender welcomes it."""
    if data_listen or not ipc.can_fork():
        return None
    return Spares.forked(workers or default_workers())


class NotVisible(Exception):
    """A source file of the layout is not here as the sender sees it."""


def localize(data: bytes) -> bytes:
    """The sender's layout ``data`` made valid on this host: each source file's ``st_dev``
    replaced with this host's, after checking that the path names the same file here
    (inode, size, mtime, ctime). ``NotVisible`` (naming the path) otherwise; ProtocolError
    for a malformed layout."""
    plan = layout_file.Layout.decode(data)
    rows: dict[int, layout_file.Row] = {}
    files = plan.files
    for i in range(len(files)):
        ref = files[i]
        if ref is None:
            continue
        try:
            st = os.lstat(ref.path)
        except OSError:
            raise NotVisible(ref.path) from None
        if not stat.S_ISREG(st.st_mode) or (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ) != (ref.ino, ref.size, ref.mtime_ns, ref.ctime_ns):
            raise NotVisible(ref.path)
        rows[i] = (ref.path, st.st_dev, ref.ino, ref.size, ref.mtime_ns, ref.ctime_ns, 0)
    local = layout_file.Layout(
        plan.block_size, plan.extents, layout_file._Rows(len(plan.extents), rows)
    )
    return local.encode()


def split_report(body: bytes, limit: int = MAX_CLUSTER - _OVERHEAD) -> list[bytes]:
    """A worker's report as bodies that each fit a cluster message (an ``Acked`` of very many
    blocks is split; ProtocolError for anything else too large)."""
    if len(body) <= limit:
        return [body]
    msg = decode(body, expect=(Acked,))
    if len(msg.blocks) < 2:
        raise ProtocolError("a worker report too large for the cluster channel")
    half = len(msg.blocks) // 2
    first = Acked(msg.slot, msg.blocks[:half], msg.sent)
    second = Acked(msg.slot, msg.blocks[half:], msg.sent)
    return split_report(encode(first), limit) + split_report(encode(second), limit)


def _stderr_log(line: str) -> None:
    print(f"stx worker: {line}", file=sys.stderr, flush=True)


def serve_helper(
    *,
    join: str,
    psk: bytes,
    workers: int | None = None,
    data_listen: str = "",
    once: bool = False,
    log: LogFn | None = None,
    spares: Spares | None = None,
) -> int:
    """Join the coordinator at ``join`` (``HOST:PORT``) and serve as ``workers`` worker
    processes (default: one per CPU) of its side, transfer after transfer; with ``once``,
    return after the first transfer that gave this helper work. Returns the transfers served.

    ``AuthError`` (exit 3) when the coordinator refuses this helper's key; a coordinator that
    is not reachable yet is retried with backoff, forever. ``data_listen``: where a receiver's
    helper takes its data streams (bound here, once; its address goes in ``Join``; a sender
    ignores it). ``spares``: sender workers started ahead (``prestart_spares``), which this
    takes over; without, they are started here, before the first join (with ``data_listen``,
    once a sender welcomed this helper)."""
    say = log or _stderr_log
    n = workers or default_workers()
    if spares is None:
        spares = Spares(0 if data_listen else n)
    try:
        host, port = parse_hostport(join)
        keys = ca.derive_cluster_keys(psk=psk)
        endpoint = _endpoint(host, port)
        recv_side = RecvSide(data_listen, workers=n, log=say) if data_listen else None
        try:
            return _serve(endpoint, join, keys, n, recv_side, once, say, spares)
        finally:
            if recv_side is not None:
                recv_side.close()
    finally:
        spares.close()


def _serve(
    endpoint: str,
    join: str,
    keys: ca.ClusterKeys,
    n: int,
    recv_side: RecvSide | None,
    once: bool,
    say: LogFn,
    spares: Spares,
) -> int:
    host = parse_hostport(join)[0]
    data_listen = recv_side.address if recv_side is not None else ""
    attempt = 0
    served = 0
    while True:
        spares.fill()  # warm for the next transfer (a no-op while they wait)
        ctx = zmq.Context()
        try:
            sock = ca.secure_client(ctx.socket(zmq.DEALER), keys=keys)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
            try:
                ca.wait_handshake(sock, endpoint=endpoint, timeout_s=ATTEMPT_S)
            except ConnectError as exc:
                if attempt == 0:
                    say(f"waiting for the coordinator at {join} ({exc})")
                sock.close(linger=0)
                time.sleep(JOIN_BACKOFF.delay(attempt))
                attempt = min(attempt + 1, 16)
                continue
            attempt = 0
            relay = _Relay(
                ctx,
                sock,
                workers=n,
                join=join,
                data_listen=data_listen,
                log=say,
                recv=recv_side,
                once=once,
                spares=spares,
            )
            try:
                relay.run()
            except BaseException:
                relay.stop_workers()
                relay.bye()  # a stop signal (or a broken coordinator): leaving
                raise
            finally:
                relay.close()
            served += relay.transfers
            if once and relay.transfers:
                return served
            if relay.released:  # the coordinator closes its port now: the next one comes later
                time.sleep(JOIN_BACKOFF.delay(1))
        finally:
            ctx.destroy(linger=0)


class _Relay:
    """One connection to a coordinator: the local workers and what goes between."""

    def __init__(
        self,
        ctx: zmq.Context,
        sock: zmq.Socket,
        *,
        workers: int,
        join: str,
        data_listen: str,
        log: LogFn,
        recv: RecvSide | None = None,
        once: bool = False,
        spares: Spares | None = None,
    ) -> None:
        self.once = once
        self.spares = spares if spares is not None else Spares()
        self.ctx, self.sock, self.n, self.join, self.log = ctx, sock, workers, join, log
        self.recv = recv
        self.data_listen = data_listen
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.endpoints = Endpoints.private("stx-send-")
        self.link = CoordinatorLink(ctx, self.endpoints)
        self.procs: dict[int, Proc] = {}
        #: slot -> a pidfd of its worker, in ``poller``: an exit is passed on at once (the
        #: coordinator's last step waits for every worker's)
        self.pidfds: dict[int, int] = {}
        self.poller: zmq.Poller | None = None
        self.said_last: set[int] = set()  # slots whose worker's last report (Sent) came
        self.parts: list[bytes] = []
        self.layouts = 0
        self.layout_path = ""
        self.layout_error: str | None = None
        self.sent: dict[int, int] = {}  # slot -> blocks its worker sent
        self.assigned = False
        self.transfers = 0
        self.released = False
        self.last_beat = 0.0

    def up(self, msg: Message) -> None:
        """Send ``msg`` to the coordinator; dropped when its queue is full (a coordinator that
        does not read for long: it answers nothing meanwhile, and its workers time out)."""
        try:
            self.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def run(self) -> None:
        self.up(Join(CLUSTER_VERSION, socket.gethostname(), self.n, self.data_listen))
        waiting = zmq.Poller()
        waiting.register(self.sock, zmq.POLLIN)
        waiting.register(self.monitor, zmq.POLLIN)
        end = time.monotonic() + WELCOME_S
        while not self.sock.poll(0):
            left = end - time.monotonic()
            if left <= 0:
                self.log(f"no welcome from the coordinator at {self.join}; joining again")
                return
            waiting.poll(int(left * 1000) + 1)
            if self._disconnected():  # a coordinator closing its port: join the next one
                time.sleep(JOIN_BACKOFF.delay(0))
                return
        first = decode_cluster(self.sock.recv(), expect=CLUSTER_DOWN)
        if isinstance(first, Welcome) and first.role == "recv":
            if self.recv is None:
                self.up(Refuse("a receiver's helper needs --data-listen HOST:PORT"))
                self.log(f"the coordinator at {self.join} is a receiver: --data-listen needed")
                time.sleep(JOIN_BACKOFF.cap)
                return
            self.run_recv(self.recv)
            return
        if not isinstance(first, Welcome) or first.role != "send":
            role = first.role if isinstance(first, Welcome) else type(first).__name__
            self.up(Refuse(f"this helper serves senders only, not {role!r}"))
            self.log(f"the coordinator at {self.join} wants a {role!r} helper: not served yet")
            time.sleep(JOIN_BACKOFF.cap)
            return
        self.log(f"joined {self.join} as sender helper, {self.n} workers")
        self.spares.want = self.n
        self.spares.fill()
        poller = self.poller = zmq.Poller()
        for s in (self.sock, self.link.router, self.link.pull, self.monitor):
            poller.register(s, zmq.POLLIN)
        while True:
            events = dict(poller.poll(100))
            if self.sock in events and self.from_coordinator():
                return
            if self.link.router in events:
                while self.link.router.poll(0):
                    ident, body = self.link.router.recv_multipart()
                    self.up(Up(ident, body))
            if self.link.pull in events:
                while self.link.pull.poll(0):
                    self.report(self.link.pull.recv())
            if self.monitor in events and self._disconnected():
                self.log(f"lost the coordinator at {self.join}; joining again")
                self.stop_workers()
                return
            self.reap()
            now = time.monotonic()
            if now - self.last_beat >= BEAT_S:
                self.last_beat = now
                self.up(HelperBeat())

    def run_recv(self, side: RecvSide) -> None:
        """Serve a receiver: offers and cancels come down, the workers' reports go up."""
        side.start()
        side.up = self.up
        self.log(
            f"joined {self.join} as receiver helper, {self.n} workers, data port {side.address}"
        )
        poller = zmq.Poller()
        assert side.pull is not None
        for s in (self.sock, side.pull, self.monitor):
            poller.register(s, zmq.POLLIN)
        before = side.sessions_done
        try:
            while True:
                if self.once and side.sessions_done > before:
                    self.bye()  # --once: one transfer served; its coordinator drops it now
                    return
                events = dict(poller.poll(100))
                if self.sock in events:
                    while self.sock.poll(0):
                        msg = decode_cluster(self.sock.recv(), expect=CLUSTER_DOWN)
                        if isinstance(msg, Release):
                            self.released = True
                            return
                        side.handle(msg)
                side.relay()
                if self.monitor in events and self._disconnected():
                    self.log(f"lost the coordinator at {self.join}; joining again")
                    return
                now = time.monotonic()
                if now - self.last_beat >= BEAT_S:
                    self.last_beat = now
                    self.up(HelperBeat())
        finally:
            side.up = None
            side.end_all()
            self.transfers += side.sessions_done - before

    def _disconnected(self) -> bool:
        while self.monitor.poll(0):
            frames = self.monitor.recv_multipart()
            if int.from_bytes(frames[0][:2], sys.byteorder) == zmq.EVENT_DISCONNECTED:
                return True
        return False

    def report(self, body: bytes) -> None:
        try:
            msg = decode(body, expect=SENDER_REPORTS)
            if type(msg) is Acked:
                assert isinstance(msg, Acked)
                self.sent[msg.slot] = max(self.sent.get(msg.slot, 0), msg.sent)
            elif type(msg) is Sent:
                assert isinstance(msg, Sent)
                self.sent[msg.slot] = max(self.sent.get(msg.slot, 0), msg.count)
                self.said_last.add(msg.slot)
            for part in split_report(body):
                self.up(Report(part))
        except ProtocolError:
            return  # a worker's garbage is not passed on
        except zmq.ZMQError:
            return

    def from_coordinator(self) -> bool:
        """Handle what the coordinator sent; True once it released this helper."""
        while self.sock.poll(0):
            msg = decode_cluster(self.sock.recv(), expect=CLUSTER_DOWN)
            kind = type(msg)
            if kind is Down:
                assert isinstance(msg, Down)
                self.down(msg)
            elif kind is LayoutPart:
                assert isinstance(msg, LayoutPart)
                self.layout_part(msg)
            elif kind is Assign:
                assert isinstance(msg, Assign)
                self.assign(msg.slots)
            elif kind is Stop:
                assert isinstance(msg, Stop)
                for slot in msg.slots:
                    proc = self.procs.get(slot)
                    if proc is not None and proc.poll() is None:
                        proc.terminate()
            elif kind is Release:
                self.released = True
                self.stop_workers()
                if self.assigned:
                    self.transfers += 1
                    self.log(f"transfer done: {sum(self.sent.values())} blocks")
                return True
        return False

    def down(self, msg: Down) -> None:
        body = msg.body
        reply = decode(body, expect=SENDER_REPLIES)
        if isinstance(reply, Setup):
            if not self.layout_path:
                raise ProtocolError("a Setup before the layout")
            body = encode(
                Setup(
                    stream=reply.stream,
                    secret=reply.secret,
                    session_id=reply.session_id,
                    host=reply.host,
                    port=reply.port,
                    layout=self.layout_path,
                    manifest_id=reply.manifest_id,
                    rekey_records=reply.rekey_records,
                    rekey_bytes=reply.rekey_bytes,
                    connect_timeout=reply.connect_timeout,
                )
            )
        try:
            self.link.router.send_multipart([msg.ident, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # that worker is gone

    def layout_part(self, msg: LayoutPart) -> None:
        if msg.index == 0:
            self.parts = []
        elif msg.index != len(self.parts):
            raise ProtocolError("layout parts out of order")
        self.parts.append(msg.data)
        if sum(map(len, self.parts)) > layout_file.MAX_LAYOUT:
            raise ProtocolError("the transfer's layout is too large")
        if not msg.last:
            return
        data, self.parts = b"".join(self.parts), []
        self.layouts += 1
        self.layout_error = None
        try:
            local = localize(data)
        except NotVisible as exc:
            self.layout_error = f"the files are not visible here as the sender sees them: {exc}"
            self.layout_path = ""
            return
        path = os.path.join(self.endpoints.workdir, f"layout-{self.layouts}")
        layout_file.write(path, layout_file.Layout.decode(local))
        self.layout_path = path

    def assign(self, slots: tuple[int, ...]) -> None:
        if self.layout_error is not None or not self.layout_path:
            reason = self.layout_error or "no layout before the assignment"
            self.log(f"refused the transfer: {reason}")
            self.up(Refuse(reason))
            return
        self.stop_workers(exited_only=True)
        self.assigned = True
        ep = self.endpoints
        for slot in slots:
            if slot in self.procs or not 0 <= slot < 1 << 30:
                continue
            args = (ep.requests, ep.reports, str(slot), str(os.getpid()))
            proc = self.spares.take(args)
            if proc is None:  # more slots than spares (a replacement): a new interpreter
                proc = ipc.spawn_worker("stxpar.workers.sender", *args)
            self.procs[slot] = proc
            self._watch(slot, proc)

    def _watch(self, slot: int, proc: Proc) -> None:
        if self.poller is None:
            return
        try:
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            return  # (not Linux 5.3+): noticed within the loop's 100 ms
        self.pidfds[slot] = fd
        self.poller.register(fd, zmq.POLLIN)

    def _unwatch(self, slot: int) -> None:
        fd = self.pidfds.pop(slot, None)
        if fd is not None:
            if self.poller is not None:
                self.poller.unregister(fd)
            os.close(fd)

    def reap(self) -> None:
        for slot, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is not None:
                del self.procs[slot]
                self._unwatch(slot)
                # Its last report first (it sent it before exiting; the coordinator counts
                # the blocks it sent from it): a few ms at most.
                end = time.monotonic() + 0.02
                while slot not in self.said_last and self.link.pull.poll(
                    max(0, int((end - time.monotonic()) * 1000))
                ):
                    while self.link.pull.poll(0):
                        self.report(self.link.pull.recv())
                try:
                    self.up(Exited(slot, rc))
                except zmq.ZMQError:
                    pass

    def stop_workers(self, *, exited_only: bool = False) -> None:
        if not exited_only:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.terminate()
            end = time.monotonic() + STOP_GRACE
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=max(0.01, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.reap()

    def bye(self) -> None:
        try:
            self.sock.send(encode(Bye()), zmq.NOBLOCK)
            self.sock.setsockopt(zmq.LINGER, 500)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        """Stop the workers, close the sockets, remove the files."""
        try:
            self.stop_workers()
        finally:
            for slot in list(self.pidfds):
                self._unwatch(slot)
            self.monitor.close(linger=0)
            self.link.router.close(linger=0)
            self.link.pull.close(linger=0)
            self.sock.close()
            self.endpoints.remove()
