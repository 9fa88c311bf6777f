"""The receiver's worker processes, their channels, and the thread that reads their reports.

Theory of operation
-------------------
A receiver lands blocks in worker processes. Each worker has one private channel from the
coordinator, a SEQPACKET socketpair: it carries ``StreamJob`` (with the verified stream's
socket beside it, by SCM_RIGHTS: a kernel socket cannot travel over ZeroMQ) and ``Cancel``
down, ``Ready`` and ``Beat`` up. What a worker landed goes up on the coordinator's one ZeroMQ
PULL socket (``Landed``, ``StreamFailed``, ``StreamClosed``). Every message is a typed
``stxpar.messages`` message.

``ReceiverWorker`` is the one place that touches a worker's process and channel: a local process
today, the seam where a worker on another host would plug in. ``ReceiverPool`` hands streams
over, cancels sessions, and replaces workers that exited or went silent; what it decides
(placement within the caps, liveness, report routing) is pure and lives in ``placement.py``.
``route_reports`` is the report thread.
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
from typing import Any

import zmq

from . import ipc, messages
from .config import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_WORKER_STREAMS,
    DEFAULT_SYNC_BYTES,
    WORKER_TIMEOUT,
)
from .errors import ConnectError
from .messages import Cancel, Pace, Prepare, StreamJob
from .placement import FINISHED_GRACE_S as FINISHED_GRACE_S
from .placement import WORKER_QUIET_S as WORKER_QUIET_S
from .placement import WORKER_START_S as WORKER_START_S
from .placement import Liveness, Placement, ReportRouter, StreamTarget, is_liveness, stream_job

#: Descriptors that must be free before a replacement worker is started: its socketpair, the
#: pipe ``subprocess`` uses while it starts it, and the IPC connection its reports arrive on.
#: libzmq aborts the whole process when it cannot accept that last one (EMFILE), so a worker is
#: rather not replaced yet (the next check tries again).
SPAWN_DESCRIPTORS = 8
#: How often the report thread checks the pool (dead or silent workers, due cancels).
CHECK_EVERY_S = 0.5
#: The largest message a worker sends on its channel (``Ready``, ``Beat``: a few bytes).
_LIVENESS_MAX = 64

EventFn = Callable[..., None]


class ReceiverWorker:
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
        return is_liveness(data)

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
            said = said or is_liveness(data)

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


def pace_shares(rate: int, load: list[int]) -> list[int]:
    """Each worker's share of ``rate`` (bytes a second) by its open streams; a worker without
    streams gets one stream's share, so that a stream handed to it starts at a fair pace."""
    total = sum(load)
    if not total:
        return [rate] * len(load)
    return [max(1, rate * (n or 1) // total) for n in load]


class ReceiverPool:
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
        self.sync_bytes = sync_bytes
        #: ``--limit-rate`` (0: none), and the share each worker was last told (``_repace``)
        self.limit_rate = 0
        self._paces: dict[int, int] = {}
        self._on_event = on_event
        self.members: list[ReceiverWorker] = []
        self.placement = Placement(
            n, max_streams=max_streams, max_worker_streams=max_worker_streams
        )
        self.live = Liveness(n, stuck_after=stuck_after, now=time.monotonic())
        self.lock = threading.Lock()
        self.replaced = 0
        self._cancels: list[tuple[float, bytes]] = []
        self._spawn_failed = False
        try:
            for i in range(n):
                self.members.append(ReceiverWorker(report_endpoint))
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
        self.placement.clear(i)
        try:
            if _descriptors_free() < SPAWN_DESCRIPTORS:
                raise OSError(errno.EMFILE, "too few file descriptors free")
            self.members[i] = ReceiverWorker(self.report_endpoint)
        except OSError as exc:
            if not self._spawn_failed:
                why = exc.strerror or str(exc)
                events.append({"pid": old.pid, "reason": f"cannot start a worker yet: {why}"})
            self._spawn_failed = True
            return
        self._spawn_failed = False
        self.live.started(i, time.monotonic())
        self.replaced += 1
        self._paces.pop(i, None)
        self._repace()
        if stuck is not None:
            events.append({"pid": old.pid, "reason": stuck})

    def hand_over_stream(self, target: StreamTarget, conn: socket.socket) -> None:
        """Give the verified stream ``target`` (its socket ``conn``) to a worker."""
        self.hand_over(stream_job(target, sync_bytes=self.sync_bytes), conn)

    def hand_over(self, job: StreamJob, conn: socket.socket) -> None:
        """Give a verified data stream to the least busy live worker that is heard from;
        ConnectError if the receiver serves as many streams as it may, or if no worker takes
        it (the sender then replaces the stream, later)."""
        with self.lock:
            if self.placement.full():
                raise ConnectError(
                    f"receiver busy: {self.placement.open_streams()} data streams open, the most"
                    " it serves; try again shortly"
                )
            now = time.monotonic()
            for i in range(len(self.members)):
                self._hear(i, now)

            def health(k: int) -> tuple[bool, bool]:
                return self.members[k].exited(), self.live.quiet(k, now)

            for i in self.placement.order(health):
                try:
                    self.members[i].send(job, (conn.fileno(),))
                except OSError:
                    continue  # that worker just died, or is not reading: check() replaces it
                self.placement.assign(i, job.session_id, job.stream)
                self._repace()
                return
        raise ConnectError("receiver busy: no worker could take the data stream; try again shortly")

    def prepare(self, session_id: bytes, layout: str, streams: int) -> None:
        """Tell the workers the session's first ``streams`` streams will go to (the next in
        line now) to read its layout before they come (``Prepare``): the first block is
        then not held up by it. A worker that misses the message reads it when its stream
        comes, as any other does."""
        msg = Prepare(session_id, layout)
        with self.lock:
            now = time.monotonic()

            def health(k: int) -> tuple[bool, bool]:
                return self.members[k].exited(), self.live.quiet(k, now)

            for i in self.placement.order(health)[: max(1, streams)]:
                try:
                    self.members[i].send(msg)
                except OSError:
                    pass  # dead or stuck: check() replaces it

    def released(self, session_id: bytes, stream: int) -> None:
        with self.lock:
            self.placement.release(session_id, stream)
            self._repace()

    def _repace(self) -> None:
        """``--limit-rate``: each worker's share of the rate, by its share of the open
        streams, sent to the workers whose share changed (under ``lock``)."""
        if not self.limit_rate:
            return
        shares = pace_shares(self.limit_rate, self.placement.load)
        for i, rate in enumerate(shares):
            if self._paces.get(i) != rate:
                try:
                    self.members[i].send(Pace(rate))
                except OSError:
                    continue  # dead or stuck: check() replaces it, and the new one is paced
                self._paces[i] = rate

    def set_limit(self, rate: int) -> None:
        """Take in at most ``rate`` bytes a second over every stream (0: no limit)."""
        with self.lock:
            self.limit_rate = rate
            self._paces.clear()
            if rate:
                self._repace()
            else:
                for member in self.members:
                    try:
                        member.send(Pace(0))
                    except OSError:
                        pass

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


def route_reports(
    pull: zmq.Socket, router: ReportRouter, pool: ReceiverPool, stopping: threading.Event
) -> None:
    """The report thread: what arrives on ``pull`` goes to ``router``, and the pool is checked
    every ``CHECK_EVERY_S``, until ``stopping`` is set (or the socket is closed under it)."""
    last_check = 0.0
    while not stopping.is_set():
        if time.monotonic() - last_check > CHECK_EVERY_S:
            last_check = time.monotonic()
            try:
                pool.check()
            except Exception:  # this thread must outlive any one check
                pass
        try:
            if not pull.poll(200):
                continue
            data = pull.recv()
        except zmq.ZMQError:
            return
        if stopping.is_set():
            return  # the wake-up of Receiver.stop(), or a report nobody waits for any more
        router.handle(data)
