"""The receiver's worker pool and the router of what its workers report.

Theory of operation
-------------------
A receiver lands blocks in worker processes. Each worker has one private channel from the
coordinator, a SEQPACKET socketpair: it carries ``StreamJob`` (with the verified stream's
socket beside it, by SCM_RIGHTS: a kernel socket cannot travel over ZeroMQ) and ``Cancel``
down, ``Ready`` and ``Beat`` up. What a worker landed goes up on the coordinator's one ZeroMQ
PULL socket (``Landed``, ``StreamFailed``, ``StreamClosed``). Every message is a typed
``stxpar.messages`` message; nothing here knows a message's bytes.

``WorkerPool`` hands a stream to the least busy live worker, within two caps (streams open in
all and per worker; past either the stream is refused with a retryable "receiver busy"), and
replaces a worker that exited or went silent. ``Liveness`` is the pure bookkeeping of that
silence: when each worker was last heard from, who is quiet (left out of new hand-overs while
another can take them) and who is stuck (killed and replaced). ``WorkerHandle`` is the one
place that touches a worker's process and channel: a local process today, the seam where a
worker on another host would plug in.

``ReportRouter`` is the report thread: it decodes each report (garbage is counted and
dropped, never raised), gives back a stream's slot on ``StreamClosed``/``StreamFailed``, hands
``Landed`` and ``StreamFailed`` to ``on_report``, and runs the pool's check every half second.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from . import ipc, messages
from .config import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_WORKER_STREAMS,
    DEFAULT_SYNC_BYTES,
    WORKER_TIMEOUT,
)
from .errors import ConnectError, ProtocolError
from .messages import Cancel, Landed, StreamClosed, StreamFailed, StreamJob
from .wire import Metadata

#: ... and one not heard from for this long gets new streams only if no other worker can.
WORKER_QUIET_S = 1.5
#: A new worker may take this long to start before its silence counts.
WORKER_START_S = 15.0
#: Descriptors that must be free before a replacement worker is started: its socketpair, the
#: pipe ``subprocess`` uses while it starts it, and the IPC connection its reports arrive on.
#: libzmq aborts the whole process when it cannot accept that last one (EMFILE), so a worker is
#: rather not replaced yet (the next check tries again).
SPAWN_DESCRIPTORS = 8
#: The data streams of a completed session still open this long after its RECEIPT are cut:
#: an honest sender closes them within milliseconds, one that vanished never does.
FINISHED_GRACE_S = 2.0
#: How often the report thread checks the pool (dead or silent workers, due cancels).
CHECK_EVERY_S = 0.5
#: The largest message a worker sends on its channel (``Ready``, ``Beat``: a few bytes).
_LIVENESS_MAX = 64

EventFn = Callable[..., None]


class StreamTarget(Protocol):
    """What a verified JOIN names (the session registry's ``accept_stream`` answers with it)."""

    @property
    def session_id(self) -> bytes: ...
    @property
    def stream(self) -> int: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def path(self) -> str: ...
    @property
    def md(self) -> Metadata: ...
    @property
    def inode(self) -> tuple[int, int] | None: ...


def stream_job(target: StreamTarget, *, sync_bytes: int) -> StreamJob:
    """The job a worker gets for ``target``: the partial file by path and inode (the worker
    writes nothing unless the file it opens is that inode), the transfer's parameters."""
    md = target.md
    return StreamJob(
        session_id=target.session_id,
        stream=target.stream,
        secret=target.secret,
        path=target.path,
        size=md.size,
        block_size=md.block_size,
        file_id=md.file_id,
        rekey_records=md.rekey_records,
        rekey_bytes=md.rekey_bytes,
        sync_bytes=sync_bytes,
        streams=md.streams,  # the worker lands blocks by mapping when there are many
        inode=target.inode,
    )


class Liveness:
    """When each worker was last heard from, and what that silence means (no I/O, the clock
    passed in). A time in the future: the worker is still starting."""

    def __init__(self, n: int, *, stuck_after: float, now: float) -> None:
        self.stuck_after = stuck_after
        self.quiet_after = min(WORKER_QUIET_S, stuck_after / 2)
        self.heard = [now + WORKER_START_S] * n
        self._last_check = now

    def started(self, i: int, now: float) -> None:
        self.heard[i] = now + WORKER_START_S

    def hear(self, i: int, now: float) -> None:
        self.heard[i] = max(self.heard[i], now)

    def checking(self, now: float) -> None:
        """A check begins. If this process itself did not run for a while (stopped with its
        workers by ^Z, or its report thread held up), it cannot tell who else was silent."""
        if now - self._last_check > self.stuck_after / 2:
            self.heard = [max(h, now) for h in self.heard]
        self._last_check = now

    def quiet(self, i: int, now: float) -> bool:
        return now - self.heard[i] > self.quiet_after

    def silence(self, i: int, now: float) -> float | None:
        """Seconds worker ``i`` has been silent, if that makes it stuck; else None."""
        silent = now - self.heard[i]
        return silent if silent > self.stuck_after else None


class WorkerHandle:
    """One local worker process and its channel."""

    def __init__(self, report_endpoint: str) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = ipc.spawn_worker(
                "stxpar.workers.receiver",
                str(theirs.fileno()),
                report_endpoint,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.chan = mine

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def await_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for its ``Ready``; False if it died or is slow."""
        self.chan.settimeout(timeout)
        try:
            data = self.chan.recv(_LIVENESS_MAX)
        except OSError:
            return False
        finally:
            self.chan.settimeout(None)
        return _liveness(data)

    def heard(self) -> bool:
        """Read what it sent (heartbeats) without waiting: whether it said anything."""
        said = False
        while True:
            try:
                data = self.chan.recv(_LIVENESS_MAX, socket.MSG_DONTWAIT)
            except OSError:
                return said  # nothing queued (or a closed channel)
            if not data:
                return said  # the worker exited; exited() says so
            said = said or _liveness(data)

    def send(self, msg: messages.Message, fds: tuple[int, ...] = ()) -> None:
        """Without blocking (OSError if it cannot take it now): a stopped worker whose channel
        is full must not block the pool."""
        data = messages.encode(msg)
        if fds:
            socket.send_fds(self.chan, [data], list(fds), socket.MSG_DONTWAIT)
        else:
            self.chan.send(data, socket.MSG_DONTWAIT)

    def kill(self) -> None:
        """SIGKILL works on a stopped process, and frees whatever it held, the landing lock
        included."""
        self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # in uninterruptible I/O: it dies when that returns

    def close(self) -> None:
        self.chan.close()

    def wait(self) -> None:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _liveness(data: bytes) -> bool:
    try:
        messages.decode(data, expect=messages.RECEIVER_LIVENESS)
    except ProtocolError:
        return False
    return True


class WorkerPool:
    """Receiver worker processes: hand-overs within caps, cancels, replacement of workers that
    exited or stopped beating (see the module's docstring).

    A worker that is alive but does not run (SIGSTOP, a frozen cgroup, a paused container)
    would otherwise keep its streams, and keep getting new ones, forever: it is left out of
    new hand-overs once quiet, and killed and replaced once stuck; its streams are gone and
    their senders replace them. Silence is judged after reading every heartbeat already
    queued on the channel, so a coordinator that was itself busy or stopped for a while does
    not take its healthy workers for stuck ones.
    """

    def __init__(
        self,
        n: int,
        report_endpoint: str,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_worker_streams: int = DEFAULT_MAX_WORKER_STREAMS,
        stuck_after: float = WORKER_TIMEOUT,
        sync_bytes: int = DEFAULT_SYNC_BYTES,
        on_event: EventFn | None = None,
    ) -> None:
        self.report_endpoint = report_endpoint
        self.max_streams = max_streams
        self.max_worker_streams = max_worker_streams
        self.sync_bytes = sync_bytes
        self._on_event = on_event
        self.members: list[WorkerHandle] = []
        self.load = [0] * n
        self.live = Liveness(n, stuck_after=stuck_after, now=time.monotonic())
        self.where: dict[tuple[bytes, int], int] = {}
        self.lock = threading.Lock()
        self.replaced = 0
        self._cancels: list[tuple[float, bytes]] = []
        self._spawn_failed = False
        try:
            for i in range(n):
                self.members.append(WorkerHandle(report_endpoint))
                self.live.started(i, time.monotonic())
        except BaseException:
            self.stop()
            raise
        self._await_ready()

    def _await_ready(self, timeout: float = 10.0) -> None:
        """Wait until every worker has started (its interpreter and imports take ~0.1 s each),
        so that "listening" means a transfer can start at full speed. A worker that dies or
        is slow is not waited for past ``timeout``: check() and hand_over() cope."""
        deadline = time.monotonic() + timeout
        for i, member in enumerate(self.members):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if member.await_ready(left):
                self.live.heard[i] = time.monotonic()

    def _hear(self, i: int, now: float) -> None:
        if self.members[i].heard():
            self.live.hear(i, now)

    def pids(self) -> list[int]:
        with self.lock:
            return [m.pid for m in self.members]

    def check(self) -> None:
        """Replace every worker that exited or went silent; cut the streams of completed
        sessions whose grace ran out. Called by the report thread every ``CHECK_EVERY_S``."""
        events: list[dict[str, Any]] = []
        now = time.monotonic()
        with self.lock:
            self.live.checking(now)
            for i, member in enumerate(self.members):
                self._hear(i, now)
                silent = self.live.silence(i, now)
                if member.exited():
                    self._replace(i, events, None)
                elif silent is not None:
                    self._replace(i, events, f"no heartbeat for {silent:.1f} s (stopped?)")
            due = [sid for t, sid in self._cancels if t <= now]
            self._cancels = [(t, sid) for t, sid in self._cancels if t > now]
        for sid in due:
            self.cancel(sid)
        for fields in events:
            if self._on_event is not None:
                self._on_event("worker_replaced", **fields)

    def _replace(self, i: int, events: list[dict[str, Any]], stuck: str | None) -> None:
        """Start a new worker in place of worker ``i``, killing it first if it is ``stuck``.
        Its streams are gone (their connections close with it; the senders replace them).
        Where no process can be started now (a pids limit), the slot stays dead and the next
        check tries again."""
        old = self.members[i]
        if stuck is not None:
            old.kill()
        old.close()
        self.load[i] = 0
        self.where = {k: v for k, v in self.where.items() if v != i}
        try:
            if _descriptors_free() < SPAWN_DESCRIPTORS:
                raise OSError(errno.EMFILE, "too few file descriptors free")
            self.members[i] = WorkerHandle(self.report_endpoint)
        except OSError as exc:
            if not self._spawn_failed:
                why = exc.strerror or str(exc)
                events.append({"pid": old.pid, "reason": f"cannot start a worker yet: {why}"})
            self._spawn_failed = True
            return
        self._spawn_failed = False
        self.live.started(i, time.monotonic())
        self.replaced += 1
        if stuck is not None:
            events.append({"pid": old.pid, "reason": stuck})

    def replace_dead(self) -> None:
        """Kept for callers of the old name: ``check()``."""
        self.check()

    def hand_over_stream(self, target: StreamTarget, conn: socket.socket) -> None:
        """Give the verified stream ``target`` (its socket ``conn``) to a worker."""
        self.hand_over(stream_job(target, sync_bytes=self.sync_bytes), conn)

    def hand_over(self, job: StreamJob, conn: socket.socket) -> None:
        """Give a verified data stream to the least busy live worker that is heard from;
        ConnectError if the receiver serves as many streams as it may, or if no worker takes
        it (the sender then replaces the stream, later)."""
        with self.lock:
            open_streams = sum(self.load)
            if open_streams >= self.max_streams:
                raise ConnectError(
                    f"receiver busy: {open_streams} data streams open, the most it serves;"
                    " try again shortly"
                )
            now = time.monotonic()
            for i in range(len(self.members)):
                self._hear(i, now)

            def rank(k: int) -> tuple[bool, bool, int]:
                return self.members[k].exited(), self.live.quiet(k, now), self.load[k]

            for i in sorted(range(len(self.members)), key=rank):
                if self.load[i] >= self.max_worker_streams:
                    continue
                try:
                    self.members[i].send(job, (conn.fileno(),))
                except OSError:
                    continue  # that worker just died, or is not reading: check() replaces it
                self.load[i] += 1
                self.where[(job.session_id, job.stream)] = i
                return
        raise ConnectError("receiver busy: no worker could take the data stream; try again shortly")

    def released(self, session_id: bytes, stream: int) -> None:
        with self.lock:
            i = self.where.pop((session_id, stream), None)
            if i is not None:
                self.load[i] -= 1

    def cancel(self, session_id: bytes) -> None:
        """End every stream of a session, now."""
        msg = Cancel(session_id)
        with self.lock:
            for member in self.members:
                try:
                    member.send(msg)
                except OSError:
                    pass  # a dead or stuck worker: its streams go with it

    def cancel_later(self, session_id: bytes, delay: float = FINISHED_GRACE_S) -> None:
        """End every stream of a completed session still open ``delay`` seconds from now."""
        with self.lock:
            self._cancels.append((time.monotonic() + delay, session_id))

    def stop(self) -> None:
        for member in self.members:
            member.close()
        for member in self.members:
            member.wait()


def _descriptors_free() -> int:
    """How many more descriptors this process may open (a large number where that cannot be
    told)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        return soft - len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return 1 << 30


#: on_report(msg): a worker's ``Landed`` or ``StreamFailed``.
ReportFn = Callable[[Landed | StreamFailed], None]


class Releasing(Protocol):
    """What the router needs of a pool."""

    def released(self, session_id: bytes, stream: int) -> None: ...
    def check(self) -> None: ...


class ReportRouter:
    """The report thread's work: decode, release, route (see the module's docstring)."""

    def __init__(self, pool: Releasing, on_report: ReportFn) -> None:
        self.pool = pool
        self.on_report = on_report
        #: Reports that were not a valid message (dropped).
        self.garbage = 0

    def handle(self, data: bytes) -> None:
        """One report: never raises for what a worker sent."""
        try:
            msg = messages.decode(data, expect=messages.RECEIVER_REPORTS)
        except ProtocolError:
            self.garbage += 1
            return
        if isinstance(msg, StreamClosed | StreamFailed):
            self.pool.released(msg.session_id, msg.stream)
        if isinstance(msg, Landed | StreamFailed):
            self.on_report(msg)

    def run(self, pull: zmq.Socket, stopping: threading.Event) -> None:
        """Route what arrives on ``pull`` until ``stopping`` is set (or the socket is closed
        under it)."""
        last_check = 0.0
        while not stopping.is_set():
            if time.monotonic() - last_check > CHECK_EVERY_S:
                last_check = time.monotonic()
                try:
                    self.pool.check()
                except Exception:  # this thread must outlive any one check
                    pass
            try:
                if not pull.poll(200):
                    continue
                data = pull.recv()
            except zmq.ZMQError:
                return
            self.handle(data)
