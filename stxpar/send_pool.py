"""The sender's worker processes on this host, and one session's pool of them.

Theory of operation
-------------------
A ``SenderPool`` is one session's workers, the private directory and the ZeroMQ channel they
use (``stxpar.channel``): made before the handshake, so that the workers' start-up (an
interpreter and its imports, about 0.1 s each) overlaps the connection and handshake round
trips; a worker says ``Hello`` at once and waits for its ``Setup`` until the data phase
begins. With ``fork``, and where this process may fork (``ipc.can_fork``: one thread), its
first workers are forked before the pool makes its ZeroMQ context, ready in milliseconds;
replacements and later sessions' pools always start new interpreters. Each worker is a
``LocalWorker`` handle under the pool's ``supervisor.Supervisor``. ``close`` stops whatever
still runs and removes the private directory.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import zmq

from . import ipc
from . import layout as layout_file
from .blocks import BlockSpace
from .channel import CoordinatorLink, Endpoints
from .layout import Layout
from .sources import Sources
from .supervisor import Supervisor, WorkerHandle


class LocalWorker:
    """A worker process on this host."""

    def __init__(self, slot: int, proc: subprocess.Popen[bytes] | ipc.ForkedWorker) -> None:
        self.slot = slot
        self.proc = proc

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"sender worker {self.slot} still runs") from None


class SenderPool:
    """One session's workers, their private directory and the channel to them.

    ``close`` stops whatever still runs and removes the directory. ``source``: the file
    ``prestart_workers`` pinned, for the ``send`` that takes this pool (``take_source``)."""

    def __init__(
        self, width: int, *, fork: bool = False, plan: tuple[Layout, BlockSpace] | None = None
    ) -> None:
        """``plan``: the transfer's layout and block space, known before the workers are
        forked: a forked worker takes them from memory (``layout.recall``), not from the file
        (``layout_path``)."""
        self.endpoints = Endpoints.private("stx-send-")
        #: where the session writes the layout its workers read
        self.layout_path = os.path.join(self.endpoints.workdir, "layout")
        if plan is not None:
            layout_file.remember(self.layout_path, *plan)
        self.supervisor = Supervisor(self._spawn_process)
        self.zctx: zmq.Context | None = None
        self.link: CoordinatorLink | None = None
        self.source: tuple[Sequence[str | os.PathLike[str]], Sources] | None = None
        try:
            if fork and ipc.can_fork():
                for _ in range(width):
                    self.supervisor.spawn(self._fork_process)
            self.zctx = zmq.Context()
            self.link = CoordinatorLink(self.zctx, self.endpoints)
            while len(self.supervisor.workers) < width:
                self.supervisor.spawn()
        except BaseException:
            self.close()
            raise

    def _args(self, slot: int) -> tuple[str, ...]:
        ep = self.endpoints
        return (ep.requests, ep.reports, str(slot), str(os.getpid()))

    def _spawn_process(self, slot: int) -> WorkerHandle:
        return LocalWorker(slot, ipc.spawn_worker("stxpar.workers.sender", *self._args(slot)))

    def _fork_process(self, slot: int) -> WorkerHandle:
        from .workers.sender import main as worker_main

        return LocalWorker(slot, ipc.fork_worker(worker_main, *self._args(slot)))

    @property
    def workers(self) -> dict[int, WorkerHandle]:
        return self.supervisor.workers

    #: The earlier name (slot -> worker; a local worker's process is its ``proc``).
    streams = workers

    def top_up(self, width: int) -> None:
        """Start workers until there are ``width`` (prestarted for other arguments)."""
        while len(self.supervisor.workers) < width:
            self.supervisor.spawn()

    def take_source(self, paths: Sequence[str | os.PathLike[str]]) -> Sources | None:
        """What was read for ``paths``, if it was read for those; the caller owns it now."""
        pinned, self.source = self.source, None
        if pinned is None:
            return None
        was, src = pinned
        if [Path(p) for p in was] != [Path(p) for p in paths]:
            src.close()
            return None
        return src

    def kill(self) -> None:
        self.supervisor.stop_all()

    def close(self) -> None:
        self.kill()
        if self.zctx is not None:
            self.zctx.destroy(linger=0)
            self.zctx = None
        if self.source is not None:
            self.source[1].close()
            self.source = None
        layout_file.forget(self.layout_path)
        self.endpoints.remove()
