"""The receiver's worker pool, its pure bookkeeping: which worker serves which stream, which
workers are alive, and where their reports go.

Theory of operation
-------------------
``recvpool.ReceiverPool`` owns the processes and channels; every decision it makes is taken
here, from plain values and a clock passed in, so that it can be tested without a process.

- ``stream_job`` turns a verified JOIN's target (``StreamTarget``: session, stream, secret,
  partial path and inode, the transfer's metadata) into the ``StreamJob`` a worker gets.
- ``Placement`` counts streams per worker and picks who takes the next one: within the caps
  (streams open in all, and per worker), a worker that has not exited before one that has,
  one heard from lately before a quiet one, the least loaded first.
- ``Liveness`` is when each worker was last heard from (its ``Ready`` and ``Beat``): quiet
  workers get new streams only if no other can, stuck ones are killed and replaced. A
  coordinator that did not run for a while (stopped by ^Z with its workers) cannot judge
  anyone's silence, so it forgives everyone.
- ``ReportRouter`` turns a worker's report bytes into messages: ``StreamClosed`` and
  ``StreamFailed`` give the stream's place back, ``Landed`` and ``StreamFailed`` go on to the
  session (``on_report``). Bytes that are no report are counted and dropped, never raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from . import messages
from .errors import ProtocolError
from .messages import Landed, StreamClosed, StreamFailed, StreamJob
from .transfer import Transfer

#: A worker not heard from for this long gets new streams only if no other worker can (and
#: never more than half the stuck timeout).
WORKER_QUIET_S = 1.5
#: A new worker may take this long to start before its silence counts.
WORKER_START_S = 15.0
#: The data streams of a completed session still open this long after its RECEIPT are cut:
#: an honest sender closes them within milliseconds, one that vanished never does.
FINISHED_GRACE_S = 2.0


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
    def md(self) -> Transfer: ...
    @property
    def inode(self) -> tuple[int, int] | None: ...
    @property
    def tree(self) -> bool: ...
    @property
    def layout(self) -> str: ...


def stream_job(target: StreamTarget, *, sync_bytes: int) -> StreamJob:
    """The job a worker gets for ``target``: the partial file by path and inode (the worker
    writes nothing unless the file it opens is that inode), the transfer's parameters."""
    md = target.md
    return StreamJob(
        session_id=target.session_id,
        stream=target.stream,
        secret=target.secret,
        path=target.path,
        tree=target.tree,
        layout=target.layout,
        manifest_id=md.file_id,
        rekey_records=md.rekey_records,
        rekey_bytes=md.rekey_bytes,
        sync_bytes=sync_bytes,
        streams=md.streams,  # the worker lands blocks by mapping when there are many
        inode=target.inode,
    )


class Placement:
    """Streams per worker, and the order in which workers are offered the next one."""

    def __init__(self, n: int, *, max_streams: int, max_worker_streams: int) -> None:
        self.max_streams = max_streams
        self.max_worker_streams = max_worker_streams
        self.load = [0] * n
        self.where: dict[tuple[bytes, int], int] = {}

    def open_streams(self) -> int:
        return sum(self.load)

    def full(self) -> bool:
        """The receiver serves as many streams as it may."""
        return self.open_streams() >= self.max_streams

    def order(self, health: Callable[[int], tuple[bool, bool]]) -> list[int]:
        """The workers that may take one more stream, best first. ``health(i)`` is
        ``(exited, quiet)`` of worker ``i``."""
        ranked = sorted(range(len(self.load)), key=lambda k: (*health(k), self.load[k]))
        return [i for i in ranked if self.load[i] < self.max_worker_streams]

    def assign(self, i: int, session_id: bytes, stream: int) -> None:
        self.load[i] += 1
        self.where[(session_id, stream)] = i

    def release(self, session_id: bytes, stream: int) -> None:
        i = self.where.pop((session_id, stream), None)
        if i is not None:
            self.load[i] -= 1

    def clear(self, i: int) -> None:
        """Worker ``i`` is gone, with every stream it served."""
        self.load[i] = 0
        self.where = {k: v for k, v in self.where.items() if v != i}


class Liveness:
    """When each worker was last heard from, and what that silence means. A time in the
    future: the worker is still starting."""

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


def is_liveness(data: bytes) -> bool:
    """Whether ``data`` is a worker's ``Ready`` or ``Beat``."""
    try:
        messages.decode(data, expect=messages.RECEIVER_LIVENESS)
    except ProtocolError:
        return False
    return True


#: on_report(msg): a worker's ``Landed`` or ``StreamFailed``.
ReportFn = Callable[[Landed | StreamFailed], None]
#: release(session_id, stream): the stream no longer counts against its worker.
ReleaseFn = Callable[[bytes, int], None]


class ReportRouter:
    """Decode, release, route (see the module's docstring)."""

    def __init__(self, release: ReleaseFn, on_report: ReportFn) -> None:
        self.release = release
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
            self.release(msg.session_id, msg.stream)
        if isinstance(msg, Landed | StreamFailed):
            self.on_report(msg)
