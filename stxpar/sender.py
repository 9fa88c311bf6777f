"""Sender coordinator: the reconnect loop, the session driver and the data phase.

Theory of operation
-------------------
The coordinator owns the control connection and the session keys. It never sends file data.
``send`` reads what it was asked to send (``sources.open_sources``: one pinned file, or a
tree walked once into a manifest) and runs sessions until one succeeds or the
retries are spent (``_send``; ``send_run.Retry``: backoff with jitter, ``--deadline``); every
reconnect is a fresh handshake that resumes from the receiver's bitmap. The run's
``BlockLedger`` (``send_run.Run``) holds the blocks known complete and their digests across
sessions.

A session (``_session``) starts its workers (``send_pool.SenderPool``) before it connects
(the CLI forks its first ones even before it reads the key: ``prestart_workers``), runs the
handshake, then drives the pure session core (``send_session.SenderSession``): it reads frames
with the socket's timeouts and feeds them in, and carries out what the core asks for (send a
frame, start the data phase, check the source, stop the workers). The data phase
(``_DataPhase``) polls the workers' channel (``channel.CoordinatorLink``: ``Hello``/``Get``
requests on a ROUTER, reports on a PULL) and the control connection: requests are answered by
the pure ``scheduler.Scheduler`` (batches from a shared pull queue, so a slow stream never
holds the tail), reports complete blocks in the ledger, and lost workers (an exit, or silence:
``supervisor.Supervisor``) are replaced with their unfinished blocks requeued. When every
block is complete the core sends END with the whole-file digest and succeeds only on a valid
RECEIPT; the workers wind down meanwhile and are reaped after it.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import zmq

from . import ipc
from . import layout as layout_file
from .cluster import ClusterPort, Helper, RemoteWorker, Route, Tally, local_host
from .config import SendOptions, TransferResult, default_workers, is_loopback
from .errors import ConnectError, StxError, UsageError, error_from_code
from .handshake import ClientHandshake, handshake_cap, now_ms
from .keyschedule import SessionKeys
from .manifest import Header
from .messages import (
    Acked,
    Alive,
    Done,
    Hello,
    Message,
    Retransmit,
    Sent,
    Setup,
    WorkerError,
)
from .netio import FramedSocket, connect, parse_hostport
from .prescan import Prescan
from .records import ControlChannel
from .routing import pick_stream
from .scheduler import Scheduler
from .send_pool import SenderPool
from .send_run import Retry, Run
from .send_session import (
    CheckSource,
    DataComplete,
    DataFailed,
    DeadlineReached,
    Progressed,
    Reconciled,
    SenderSession,
    SourceChecked,
    StartData,
    StopWorkers,
    sealed_error,
)
from .session_base import ConnectionLost, Failed, FrameIn, Output, SendFrame, Succeeded, Tick
from .source import REPLACED, SourceFile
from .sources import Sources, choose_block_size, open_sources
from .transfer import Transfer
from .wire import (
    MAX_CONTROL_PAYLOAD,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_ROUTES_PAYLOAD,
    MAX_STREAMS,
    FrameType,
)

__all__ = [
    "REPLACED",
    "DeadlineReached",
    "SourceFile",
    "handshake",
    "prestart_workers",
    "sealed_error",
    "send",
]

#: progress(done_bytes, total_bytes): called from the coordinator's loop, a few times a second.
ProgressFn = Callable[[int, int], None]
#: file_progress(files_done, files_total): called with ``progress``.
FileProgressFn = Callable[[int, int], None]
#: on_event(kind, fields): "resuming" {have_bytes, bytes}; "reconnecting" {attempt, delay, reason}.
EventFn = Callable[[str, dict[str, Any]], None]
POLL_MS = 100
WORKER_EXIT_TIMEOUT = 10.0
#: Seconds between two looks for silent workers in the data phase.
SILENCE_CHECK = 0.5
#: Streams a session's ROUTES may move: this many per worker (local or a helper's), and a
#: few (``_DataPhase._rerouted``).
MOVES_PER_WORKER = 2
MOVES_EXTRA = 4


def _control_cap(ftype: FrameType) -> int:
    if ftype in (FrameType.METADATA_ACK, FrameType.RECEIPT):
        return MAX_CONTROL_PAYLOAD
    if ftype is FrameType.ROUTES:
        return MAX_ROUTES_PAYLOAD
    if ftype is FrameType.ERROR:
        return MAX_HANDSHAKE_PAYLOAD
    return -1


def _raise_failure(outputs: list[Output]) -> list[Output]:
    """``outputs`` of the session core, unless they end it with a failure: then its error."""
    if outputs and isinstance(outputs[-1], Failed):
        raise outputs[-1].error
    return outputs


class _DataPhase:
    """One session's data phase: the workers' requests and reports, the control connection.

    A stream that fails with a connection error, or whose worker exits or falls silent, gets
    its unacknowledged blocks put back on the queue and a replacement worker with a fresh
    stream id; after too many replacements, or when nothing moves for ``stall_timeout``, the
    session fails with ConnectError and ``send()`` reconnects. A stream that a new ROUTES
    sends elsewhere (a receiving helper joined or died) is moved the same way, without
    counting as a failure (``_rerouted``).
    """

    def __init__(
        self,
        *,
        run: Run,
        session: SenderSession,
        setup: Callable[[int], Setup],
        needed: tuple[int, ...],
        pool: SenderPool,
        ctl: FramedSocket,
        workers: int,
        progress: ProgressFn | None,
        file_progress: FileProgressFn | None = None,
        cluster: ClusterPort | None = None,
        layout: bytes = b"",
        tally: Tally | None = None,
        limit_rate: int = 0,
    ) -> None:
        assert pool.link is not None
        self.run_state, self.session, self.setup = run, session, setup
        self.pool, self.link, self.sup = pool, pool.link, pool.supervisor
        self.ctl, self.progress, self.file_progress = ctl, progress, file_progress
        self.sched = Scheduler(needed, run.ledger)
        self.sched.blocks_sent = run.blocks_sent
        self.sched.rate = limit_rate  # each batch carries its worker's share
        #: slot -> where its answers go: a local worker's ROUTER identity (bytes), or a
        #: remote worker's route through its helper (``cluster.Route``)
        self.identities: dict[int, bytes | Route] = {}
        self.next_stream = 0
        #: stream ids already given out (an id is opened once per session, never again)
        self.used: set[int] = set()
        #: slot -> (its stream id, where it was sent: a helper's ``host:port``, None for the
        #: receiver) for the streams open now, to compare with a new ROUTES
        self.opened: dict[int, tuple[int, str | None]] = {}
        #: where the streams moved by ROUTES go next (the next new streams take them)
        self.moves: deque[str | None] = deque()
        #: slots whose stream was moved (what their workers say on the way out is no failure)
        self.moved: set[int] = set()
        self.routes_seen = session.routes
        local = (
            min(workers, len(needed)) if cluster is not None else max(1, min(workers, len(needed)))
        )
        self.width = local
        #: moves this session may still make (``_rerouted``)
        self.moves_left = MOVES_PER_WORKER * local + MOVES_EXTRA
        for slot in list(self.sup.workers)[:local]:
            self.sched.add_worker(slot)  # the others (more than blocks left) are sent home
        self.sup.replacements_left = 2 * max(1, local) + 2
        self.replaced_before = self.sup.replaced
        #: host -> worker processes that took a stream (``extra["hosts"]``)
        self.tally = tally if tally is not None else Tally()
        self.host = local_host()
        self.cluster = cluster
        self.winding_down = False
        if cluster is not None:
            cluster.begin(self, layout)

    # -- the cluster port's side (``cluster.Phase``)
    def adopt(self, helper: Helper, count: int | None = None) -> None:
        """Give a helper work: one new slot per worker process it offers."""
        assert self.cluster is not None
        if self.winding_down or self.sched.complete:
            return
        cluster = self.cluster
        slots = tuple(
            self.sup.spawn(lambda slot: RemoteWorker(slot, helper, cluster)).slot
            for _ in range(helper.workers if count is None else count)
        )
        for slot in slots:
            self.sched.add_worker(slot)
        self.width += len(slots)
        self.sup.replacements_left += 2 * len(slots) if count is None else 0
        self.moves_left += MOVES_PER_WORKER * len(slots) if count is None else 0
        self.run_state.width = max(self.run_state.width, self.width)
        cluster.assign(helper, slots)

    def remote_request(self, route: Route, msg: Message, now: float) -> None:
        if self.winding_down:
            self._reply(route, Done())
        else:
            self._on_request(route, msg, now)

    def remote_report(self, msg: Message, now: float) -> None:
        if not self.winding_down:
            self._on_report(msg, now)
            return
        kind, slot = type(msg), msg.slot  # type: ignore[attr-defined]
        if kind is Acked:
            assert isinstance(msg, Acked)
            self.sched.count_sent(slot, msg.sent)
        elif kind is Sent:
            assert isinstance(msg, Sent)
            self.sched.count_sent(slot, msg.count, last=True)

    def _reply(self, route: bytes | Route, msg: Message, *, block: bool = True) -> None:
        if type(route) is bytes:
            self.link.reply(route, msg, block=block)
        else:
            assert self.cluster is not None and isinstance(route, tuple)
            self.cluster.down(route, msg)

    def _ignore(self, slot: int) -> bool:
        return not self.sched.is_live(slot) or self.sched.is_done(slot)

    def _feed(self, event: Any) -> None:
        _raise_failure(self.session.handle(event))

    def run(self) -> None:
        """Until every needed block is complete. The workers are still winding down then:
        ``finish`` waits for them, after END and RECEIPT have crossed."""
        try:
            self.run_state.width = max(self.run_state.width, self.width)
            if not self.sched.live:
                exc = ConnectError("no worker to send with (no local workers, no helper joined)")
                self._feed(DataFailed(exc))
                raise exc
            self._feed(Progressed(time.monotonic()))
            self._loop()
        except BaseException:
            self.winding_down = True
            self.pool.kill()  # a failed session must not wait for stuck streams
            self._drain()
            raise
        finally:
            self.account()

    def account(self) -> None:
        r = self.run_state
        r.blocks_sent = self.sched.blocks_sent
        r.streams_replaced += self.sup.replaced - self.replaced_before
        self.replaced_before = self.sup.replaced

    def finish(self) -> None:
        self.winding_down = True
        try:
            self._stop_workers()
        finally:
            self._drain(all_exited=True)
            self.account()

    def _drain(self, *, all_exited: bool = False) -> None:
        """Count the reports already here (a failed session's last sent counts).

        Reports may still be in the kernel's buffers, so this waits until 100 ms pass without
        one; but once every worker has exited cleanly (``all_exited``) and each one's last
        words (``Sent``) are in, nothing more can come, and it stops waiting (~0.1 s off
        every transfer)."""
        sched, pull = self.sched, self.link.pull

        def outstanding() -> bool:
            return not all_exited or any(
                h.exit_status() != 0 or not sched.said_last(slot)
                for slot, h in self.sup.workers.items()
            )

        try:
            if self.cluster is not None:
                self.cluster.pump(0)
            while pull.poll(100 if outstanding() else 0):
                msg = self.link.report()
                if type(msg) is Acked:
                    sched.count_sent(msg.slot, msg.sent)
                elif type(msg) is Sent:
                    sched.count_sent(msg.slot, msg.count, last=True)
                elif type(msg) is Retransmit:
                    self.run_state.retransmits += 1
        except (zmq.ZMQError, StxError):
            pass

    def _loop(self) -> None:
        link, sched, ctl_fd = self.link, self.sched, self.ctl.sock.fileno()
        router, pull = link.router, link.pull
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        poller.register(ctl_fd, zmq.POLLIN)
        cluster = self.cluster
        if cluster is not None:
            poller.register(cluster.router, zmq.POLLIN)
        last_report = last_check = 0.0
        ledger = self.run_state.ledger
        size = self.run_state.size
        while not sched.complete:
            events = dict(poller.poll(POLL_MS))
            now = time.monotonic()
            before = ledger.count
            if router in events:
                while router.poll(0):
                    identity, msg = link.request()
                    self._on_request(identity, msg, now)
            if pull in events:
                while pull.poll(0):
                    self._on_report(link.report(), now)
            if ctl_fd in events:
                self._on_control()
            if cluster is not None and (
                cluster.router in events or now - last_check >= SILENCE_CHECK
            ):
                cluster.pump(0)
            if self.sup.exited(self._ignore) or now - last_check >= SILENCE_CHECK:
                last_check = now
                self._check_workers(now)
            for slot in sched.wake():  # blocks came back: wake the idle workers
                self._serve(slot)
            if ledger.count != before:
                self._feed(Progressed(now))
            self._feed(Tick(now))  # the deadline, a stall
            if now - last_report >= 0.2:
                last_report = now
                self._report(ledger.bytes, size)
        self._report(size, size)
        for slot in sched.release_parked():
            self._reply(self.identities[slot], Done())

    def _report(self, done: int, size: int) -> None:
        # The files first: the CLI's line shows the count it heard last when bytes come.
        if self.file_progress is not None:
            run = self.run_state
            self.file_progress(run.files_done(), run.manifest.files)
        if self.progress is not None:
            self.progress(done, size)

    def _serve(self, slot: int) -> None:
        answer = self.sched.take(slot)
        if answer is not None:
            self._reply(self.identities[slot], answer)

    def _on_request(self, identity: bytes | Route, msg: Message, now: float) -> None:
        slot = msg.slot  # type: ignore[attr-defined]
        self.sup.heard(slot, now)
        if not isinstance(msg, Hello):
            if slot not in self.identities:  # a Get before its Hello: not one of ours
                self._reply(identity, Done())
                return
            self._serve(slot)
            return
        if not self.sched.is_live(slot):
            self._reply(identity, Done())
            return
        self.identities[slot] = identity
        stream = self._stream_id()
        routes = self.session.routes
        self.opened[slot] = (stream, routes.place(stream) if routes is not None else None)
        if type(identity) is bytes:
            self.tally.count(self.host)
        else:
            assert self.cluster is not None and isinstance(identity, tuple)
            self.tally.count(self.cluster.host_of(identity), helper=identity[0])
        self._reply(identity, self.setup(stream))

    def _stream_id(self) -> int:
        """A new stream's id (``pick_stream``): where a moved stream went, if one did."""
        place: str | None | bool = self.moves.popleft() if self.moves else False
        stream = pick_stream(self.session.routes, self.used, self.next_stream, place)
        self.used.add(stream)
        while self.next_stream in self.used:
            self.next_stream += 1
        return stream

    def _rerouted(self) -> None:
        """A new ROUTES: every open stream that it now sends elsewhere moves there. The stream
        is ended (its unacknowledged blocks go back on the queue, as for a failed stream) and a
        new one, with an id routed to the new place, takes its worker's place. Moves are not
        failures (no replacement budget is spent), but a session makes at most
        ``MOVES_PER_WORKER`` a worker and ``MOVES_EXTRA`` of them: past that, ROUTES only
        steers new streams (a receiver cannot make the sender churn processes without end)."""
        routes = self.session.routes
        if routes is None or self.winding_down or self.sched.complete:
            return
        for slot, (stream, was) in list(self.opened.items()):
            now = routes.place(stream)
            if now == was or not self.sched.is_live(slot) or self.moves_left <= 0:
                continue
            self.moves_left -= 1
            self.moves.append(now)
            self.run_state.streams_moved += 1
            self.moved.add(slot)
            self._end_stream(slot)
            handle = self.sup.workers.get(slot)
            if isinstance(handle, RemoteWorker):
                if handle.helper.usable:
                    self.adopt(handle.helper, 1)
            else:
                self.sched.add_worker(self.sup.spawn().slot)

    def _end_stream(self, slot: int) -> None:
        """No more work for ``slot``: its unfinished blocks are queued again, its worker
        stopped."""
        self.sched.retire(slot)
        self.identities.pop(slot, None)
        self.opened.pop(slot, None)
        handle = self.sup.workers.get(slot)
        if handle is not None:
            if slot in self.sup.silent:
                handle.kill()
            else:
                handle.terminate()
        self.sup.last_heard.pop(slot, None)

    def _on_report(self, msg: Message, now: float) -> None:
        kind = type(msg)
        slot: int = msg.slot  # type: ignore[attr-defined]
        self.sup.heard(slot, now)
        if kind is Acked:
            assert isinstance(msg, Acked)
            # (block, digest): the worker's digest of each block it sent, b"" for a block the
            # receiver acknowledged that this worker never sent (counted, never complete).
            self.sched.count_sent(slot, msg.sent)
            self.sched.acked(slot, msg.blocks)
        elif kind is Sent:
            assert isinstance(msg, Sent)
            self.sched.count_sent(slot, msg.count, last=True)
        elif kind is Retransmit:
            self.run_state.retransmits += 1
        elif kind is WorkerError:
            assert isinstance(msg, WorkerError)
            if msg.code != ConnectError.wire_code and slot not in self.moved:
                self._feed(DataFailed(error_from_code(msg.code, msg.message)))
            if self.sched.is_live(slot):
                self._replace(slot, msg.message)
        else:
            assert kind is Alive

    def _replace(self, slot: int, why: str) -> None:
        """Put a failed stream's unfinished blocks back on the queue; start a new stream (a
        remote one on the same helper while it is there; none for a helper that is gone)."""
        self.sched.retire(slot)
        self.identities.pop(slot, None)
        self.opened.pop(slot, None)
        handle = self.sup.workers.get(slot)
        if isinstance(handle, RemoteWorker):
            handle.terminate()
            self.sup.last_heard.pop(slot, None)
            if handle.helper.usable:
                if self.sup.replacements_left <= 0:
                    exc = ConnectError(f"data streams keep failing ({why})")
                    self._feed(DataFailed(exc))
                    raise exc
                self.sup.replacements_left -= 1
                self.sup.replaced += 1
                self.adopt(handle.helper, 1)
            elif not self.sched.live:
                exc = ConnectError(f"no worker left: {why}")
                self._feed(DataFailed(exc))
                raise exc
            return
        try:
            handle = self.sup.replace(slot, why)
        except ConnectError as exc:
            self._feed(DataFailed(exc))
            raise  # (the core always fails on DataFailed)
        self.sched.add_worker(handle.slot)

    def _on_control(self) -> None:
        try:
            ftype, payload = self.ctl.recv_frame(cap=_control_cap)
        except ConnectError as exc:
            self._feed(ConnectionLost(exc))
            raise
        self._feed(FrameIn(ftype, payload))
        if self.session.routes is not self.routes_seen:
            self.routes_seen = self.session.routes
            self._rerouted()

    def _check_workers(self, now: float) -> None:
        if self.sup.exited(self._ignore):
            pull = self.link.pull
            while pull.poll(50):  # a dying worker's last report says why; read it before judging
                self._on_report(self.link.report(), now)
        for slot, why in self.sup.lost(now, self._ignore):
            self._replace(slot, why)

    def _stop_workers(self) -> None:
        """Tell every worker it is done, including one whose ``Hello`` arrives only now."""
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT
        link, sup = self.link, self.sup
        for slot, h in sup.workers.items():
            identity = self.identities.get(slot)
            if h.exit_status() is None and identity and not self.sched.is_done(slot):
                try:
                    self._reply(identity, Done(), block=False)
                except zmq.ZMQError:
                    pass
        while time.monotonic() < deadline and not sup.all_exited():
            if self.cluster is not None:
                self.cluster.pump(0)
            if link.router.poll(1):  # short: a worker's exit is noticed within 1 ms
                identity, _ = link.router.recv_multipart()
                try:
                    link.reply(identity, Done(), block=False)
                except zmq.ZMQError:
                    pass
        sup.reap(time.monotonic())


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


def handshake(ctl: FramedSocket, *, psk: bytes, timeout: float) -> SessionKeys:
    """Run the client side of the handshake over ``ctl``; return the session keys."""
    hs = ClientHandshake(psk=psk, now_ms=now_ms())
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
            for frame in hs.receive(ftype, payload, now_ms=now_ms()):
                ctl.send(frame)
    finally:
        ctl.deadline = outer
    assert hs.session is not None
    return hs.session


def _session(
    run: Run,
    host: str,
    port: int,
    *,
    psk: bytes,
    opts: SendOptions,
    progress: ProgressFn | None,
    on_event: EventFn | None,
    deadline: float | None,
    pool: SenderPool | None = None,
    file_progress: FileProgressFn | None = None,
    cluster: ClusterPort | None = None,
    tally: Tally | None = None,
) -> None:
    """One connection: handshake, then the session core from METADATA to RECEIPT. ``pool``:
    workers already started for it (the session owns and closes them); ``cluster``: the
    run's cluster port, whose helpers' workers join the data phase."""
    assert opts.block_size is not None
    # Local workers: --workers, which may be 0 with a cluster port (helpers only).
    local = opts.workers if cluster is not None and opts.workers is not None else opts.workers or 1
    try:
        src = run.sources
        if run.reconnects or src.single is not None:  # (a tree was walked just now)
            src.check_unchanged()
        timeout = opts.connect_timeout
        if deadline is not None:
            timeout = min(timeout, max(0.01, deadline - time.monotonic()))
        width = min(local, run.total)
        if run.complete >= run.total and pool is not None:
            pool.close()
            pool = None
        elif pool is None and run.complete < run.total:
            pool = SenderPool(width)
        elif pool is not None:
            pool.top_up(width)  # prestarted for other arguments
        sock = connect(host, port, max_retries=0, timeout=timeout)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    ctl = FramedSocket(sock, peer=f"{host}:{port}")
    data_host = _peer_address(sock, host)
    ctl.deadline = deadline  # no read of this session may outlive --deadline
    phase: _DataPhase | None = None
    try:
        keys = handshake(ctl, psk=psk, timeout=opts.handshake_timeout)
        manifest = run.manifest
        streams = opts.workers or 1
        if cluster is not None:
            # The receiver accepts up to 4 x streams + 64 stream ids: room for helpers that
            # join later and for replacements.
            remote = max(opts.cluster_workers, cluster.remote_workers())
            streams = max(1, min(MAX_STREAMS, local + remote))
        header = Header(
            entries=len(manifest.entries),
            chunks=len(run.chunks),
            block_size=opts.block_size,
            streams=streams,
            rekey_records=opts.rekey_records,
            rekey_bytes=opts.rekey_bytes,
            run_id=run.run_id,
            subdir=opts.to or "",
            renamed=opts.as_name is not None,
        )
        md = Transfer(header, manifest)
        session = SenderSession(
            channel=ControlChannel(session=keys, client=True),
            metadata=md,
            manifest_chunks=run.chunks,
            ledger=run.ledger,
            stall_timeout=opts.stall_timeout,
            deadline=deadline,
            deadline_s=opts.deadline or 0.0,
            peer=ctl.peer,
        )

        layout_path = ""
        block_size = opts.block_size

        def write_layout(workers: SenderPool) -> None:
            """The layout the workers read, once per pool, in its private directory (the one
            made before they were forked, if it was)."""
            nonlocal layout_path
            path = workers.layout_path
            plan = src.layout(block_size)
            known = layout_file.recall(path)
            if known is not None and known[0] is not plan:
                # Forked for other arguments (``prestart_workers``): its workers hold another
                # layout under that name; this one gets a name of its own.
                path += ".2"
            if not os.path.exists(path):
                layout_file.write(path, plan)
            layout_path = path

        def setup(stream: int) -> Setup:
            # The receiver's ROUTES may send this stream to one of its helpers.
            place = session.routes.place(stream) if session.routes is not None else None
            to_host, to_port = parse_hostport(place) if place is not None else (data_host, port)
            return Setup(
                stream=stream,
                secret=keys.stream_secret(stream),
                session_id=keys.session_id,
                host=to_host,
                port=to_port,
                layout=layout_path,
                manifest_id=manifest.id,
                rekey_records=md.rekey_records,
                rekey_bytes=md.rekey_bytes,
                connect_timeout=opts.connect_timeout,
            )

        pending = deque(session.start(time.monotonic()))
        while True:
            if not pending:
                if pool is not None and not layout_path:
                    # While the receiver checks the manifest and admits the transfer.
                    write_layout(pool)
                    manifest.send_order  # noqa: B018 (worked out now, not after METADATA_ACK)
                # The receiver fsyncs and renames before it answers RECEIPT; no answer for
                # stall_timeout (METADATA_ACK too) is a stall like any other.
                ctl.sock.settimeout(opts.stall_timeout)
                try:
                    ftype, payload = ctl.recv_frame(cap=_control_cap)
                except ConnectError as exc:
                    pending.extend(session.handle(ConnectionLost(exc)))
                else:
                    pending.extend(session.handle(FrameIn(ftype, payload)))
                continue
            out = pending.popleft()
            if isinstance(out, SendFrame):
                ctl.send(out.data)
            elif isinstance(out, Reconciled):
                if run.resumed(out.held, out.held_bytes) and on_event is not None:
                    on_event("resuming", {"have_bytes": out.held_bytes, "bytes": run.size})
            elif isinstance(out, StartData):
                if pool is None:  # the receiver lost blocks acknowledged earlier
                    pool = SenderPool(min(local, len(out.needed)))
                ctl.sock.settimeout(None)
                write_layout(pool)  # (a pool made just now has none yet)
                layout_bytes = b""
                if cluster is not None:
                    with open(layout_path, "rb") as f:
                        layout_bytes = f.read()
                phase = _DataPhase(
                    run=run,
                    session=session,
                    setup=setup,
                    needed=out.needed,
                    pool=pool,
                    ctl=ctl,
                    workers=local,
                    progress=progress,
                    file_progress=file_progress,
                    cluster=cluster,
                    layout=layout_bytes,
                    tally=tally,
                    limit_rate=opts.limit_rate,
                )
                phase.run()
                pending.extend(session.handle(DataComplete()))
            elif isinstance(out, CheckSource):
                if pool is not None and phase is None:
                    pool.close()  # never needed
                    pool = None
                # Last check before the receiver may rename the copy into place: a source
                # that grew, was rewritten (ctime) or replaced while its blocks were read
                # would be a torn copy. A tree's files were each checked by the worker that
                # read them, after every read (``source.check_read``): no second walk of
                # ten thousand ``lstat``s here, one process at a time.
                error: StxError | None = None
                try:
                    if src.single is not None:
                        src.check_unchanged()
                except StxError as exc:
                    error = exc
                pending.extend(session.handle(SourceChecked(error)))
            elif isinstance(out, StopWorkers):
                if pool is not None:
                    pool.kill()
            elif isinstance(out, Failed):
                raise out.error
            elif isinstance(out, Succeeded):
                run.digest = session.digest
                if phase is not None:
                    phase.finish()  # the workers wound down while END and RECEIPT crossed
                return
    finally:
        try:
            if pool is not None:
                pool.close()
        finally:
            if cluster is not None:
                cluster.end()
            ctl.close()


def send(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    host: str,
    port: int,
    *,
    psk: bytes,
    workers: int | None = None,
    block_size: int | None = None,
    progress: ProgressFn | None = None,
    options: SendOptions | None = None,
    on_event: EventFn | None = None,
    pool: SenderPool | None = None,
    file_progress: FileProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
) -> TransferResult:
    """Send a file, a directory tree, or a list of them (``path``) to an ``stx recv`` at
    ``host:port``; return once the receiver's authenticated receipt confirms that everything
    arrived, verified, durable and in place. A directory ``D`` arrives as ``DEST/D``.

    Connection failures, stalls and dropped streams are retried with exponential backoff and
    jitter (``options.max_retries`` consecutive failed attempts, ``options.deadline``); every
    reconnect is a fresh handshake that resumes from the receiver's bitmap. ``workers`` and
    ``block_size`` override the same fields of ``options``. ``on_event(kind, fields)`` hears
    "resuming" and "reconnecting"; ``file_progress(done, total)`` hears the files done;
    ``warn(text)`` hears what is skipped (FIFOs, sockets, devices, names that are not UTF-8).
    Raises a subclass of :class:`stxpar.errors.StxError`; its ``exit_code`` is what the CLI
    exits with. ``pool``: workers that ``prestart_workers`` started for the same arguments;
    the first session uses them, and they are closed in any case.
    """
    try:
        if len(psk) < 32:
            raise UsageError("the key must be at least 256 bits")
        paths = _paths(path)
        pinned = pool.take_source(paths) if pool is not None else None
        try:
            src, opts = _plan(
                paths,
                host,
                workers=workers,
                block_size=block_size,
                base=options,
                src=pinned,
                warn=warn,
            )
        except BaseException:
            if pinned is not None:
                pinned.close()
            raise
        try:
            return _send(src, host, port, psk, opts, progress, on_event, pool, file_progress)
        finally:
            src.close()
    finally:
        if pool is not None:
            pool.close()  # (a no-op once its session closed it)


def _paths(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> list[str | os.PathLike[str]]:
    if isinstance(path, str | os.PathLike):
        return [path]
    return list(path)


def prestart_workers(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    host: str,
    *,
    workers: int | None = None,
    block_size: int | None = None,
    options: SendOptions | None = None,
    warn: Callable[[str], None] | None = None,
    scanned: Prescan | None = None,
) -> SenderPool | None:
    """Fork the worker processes that ``send`` with the same arguments will need, where this
    process may fork (Linux, one thread; else None, and ``send`` starts them itself).
    ``scanned``: the walk of ``path``, going on in another process (``prescan.start``).

    Call it before the key is read: a forked worker holds a copy of its parent's memory, and a
    worker must never hold the PSK (docs/threat-model.md). Forked workers are ready in
    milliseconds instead of after a new interpreter's ~0.1 s of start-up, which is most of the
    fixed cost of a small transfer. Raises what ``send`` would for a bad file or options.
    """
    paths = _paths(path)
    src, opts = _plan(
        paths,
        host,
        workers=workers,
        block_size=block_size,
        base=options,
        warn=warn,
        scanned=scanned,
    )
    assert opts.block_size is not None and opts.workers is not None
    total = src.blocks(opts.block_size)
    if not total or not opts.workers or not ipc.can_fork():
        src.close()
        return None
    try:
        plan = src.layout(opts.block_size)
        # The workers are forked with the layout and its block space in memory (the file is
        # still written, for workers started later).
        pool = SenderPool(
            min(opts.workers, total), fork=True, plan=(plan, src.space(opts.block_size))
        )
    except BaseException:
        src.close()
        raise
    # ``send`` resolves, opens and walks nothing again: no second window for a swap
    pool.source = (paths, src)
    return pool


def _plan(
    paths: Sequence[str | os.PathLike[str]],
    host: str,
    *,
    workers: int | None,
    block_size: int | None,
    base: SendOptions | None,
    src: Sources | None = None,
    warn: Callable[[str], None] | None = None,
    scanned: Prescan | None = None,
) -> tuple[Sources, SendOptions]:
    """What to send (``src``, already read, or read now) and the resolved options (worker
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
        src = open_sources(paths, warn=warn, scanned=scanned)
    fixed = (block_size or base.block_size) is not None
    try:
        if opts.as_name is not None:
            src.rename_root(opts.as_name)
        bs = choose_block_size(src, opts.block_size, fixed=fixed)
    except BaseException:
        src.close()
        raise
    return src, replace(opts, block_size=bs)


def _send(
    src: Sources,
    host: str,
    port: int,
    psk: bytes,
    opts: SendOptions,
    progress: ProgressFn | None,
    on_event: EventFn | None,
    pool: SenderPool | None,
    file_progress: FileProgressFn | None = None,
) -> TransferResult:
    assert opts.block_size is not None
    bs = opts.block_size
    run = Run.new(src, bs)
    started = time.monotonic()
    deadline = started + opts.deadline if opts.deadline else None
    retry = Retry(opts, deadline)
    cluster: ClusterPort | None = None
    tally = Tally()
    if opts.cluster is not None:
        cluster = ClusterPort(opts.cluster, psk=psk, on_event=on_event)
    try:
        if cluster is not None:
            _await_helpers(cluster, opts, on_event)
        _sessions(
            run,
            src,
            host,
            port,
            psk,
            opts,
            progress,
            on_event,
            pool,
            file_progress,
            retry=retry,
            deadline=deadline,
            cluster=cluster,
            tally=tally,
        )
    finally:
        if cluster is not None:
            cluster.close()
    extra: dict[str, Any] = {
        "streams_replaced": run.streams_replaced,
        "streams_moved": run.streams_moved,
        **src.summary(),
    }
    extra["limit_rate"] = opts.limit_rate  # bytes a second, 0: none
    if cluster is not None:
        extra["hosts"] = dict(tally.hosts)
        extra["remote_workers"] = tally.remote
        extra["helpers"] = len(tally.helpers)
    return TransferResult(
        file=src.label,
        bytes=run.size,
        seconds=time.monotonic() - started,
        workers=max(1, run.width),
        block_size=bs,
        blocks_total=run.total,
        blocks_sent=run.blocks_sent,
        blocks_resumed=max(0, run.blocks_resumed),
        retransmits=run.retransmits,
        reconnects=run.reconnects,
        digest=run.whole_digest().hex(),
        bytes_resumed=run.bytes_resumed,
        extra=extra,
    )


def _sessions(
    run: Run,
    src: Sources,
    host: str,
    port: int,
    psk: bytes,
    opts: SendOptions,
    progress: ProgressFn | None,
    on_event: EventFn | None,
    pool: SenderPool | None,
    file_progress: FileProgressFn | None,
    *,
    retry: Retry,
    deadline: float | None,
    cluster: ClusterPort | None,
    tally: Tally,
) -> None:
    """Sessions until one succeeds (reconnecting after a ConnectError) or the retries end."""
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
                file_progress=file_progress,
                cluster=cluster,
                tally=tally,
            )
            break
        except DeadlineReached:
            raise
        except ConnectError as exc:
            delay = retry.after(exc, now=time.monotonic(), progressed=run.complete > before)
            run.reconnects += 1
            if on_event is not None:
                reason = str(exc)
                on_event(
                    "reconnecting", {"attempt": retry.failures, "delay": delay, "reason": reason}
                )
            time.sleep(delay)


def _await_helpers(cluster: ClusterPort, opts: SendOptions, on_event: EventFn | None) -> None:
    """``--cluster-workers K``: wait up to ``--cluster-wait`` for K remote worker processes;
    go on with fewer (an event says so), but not with no worker at all (UsageError)."""
    want = opts.cluster_workers or (0 if opts.workers else 1)
    got = cluster.wait_workers(want, opts.cluster_wait) if want else cluster.remote_workers()
    if opts.cluster_workers and got < want and on_event is not None:
        on_event("cluster_short", {"want": want, "got": got, "wait": opts.cluster_wait})
    if not got and not opts.workers:
        raise UsageError(
            f"no helper joined the cluster port {cluster.address} within"
            f" {opts.cluster_wait:g} s, and --workers 0 leaves no local worker"
        )
