"""The sender's worker pool: starting workers, knowing which live, replacing the lost ones.

Theory of operation
-------------------
A worker is known through a ``WorkerHandle``: its slot, whether it runs, its exit status,
and how to stop it. ``LocalWorker`` is a process on this host (a new interpreter, or a fork
made by ``ipc.fork_worker``); a worker on another host (issue 14) would be a handle over its
channel. The ``Supervisor`` starts workers, hears from them (every message a worker sends,
its ``Alive`` beats among them, counts: ``heard``), and says which are lost: a worker that
exited (a local process's exit is seen at once, the fast path) or one that was heard once and
then stayed silent for longer than ``SILENCE_TIMEOUT`` (alive but stopped or hung: it is
replaced like a dead one). It replaces a lost worker within a budget of replacements per
session, and stops them all (SIGTERM, then SIGKILL for any still there shortly).

A ``WorkerPool`` is one session's workers, the private directory and the ZeroMQ channel they
use (``stxpar.channel``): made before the handshake, so the workers' start-up overlaps it.
With ``fork``, and where this process may fork, its first workers are forked before the pool
makes its ZeroMQ context (ready in milliseconds); replacements always start new interpreters.

Scheduling is not here: which blocks a worker sends is ``stxpar.scheduler``'s business.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import zmq

from . import ipc
from .channel import CoordinatorLink, Endpoints
from .errors import ConnectError
from .source import SourceFile

#: Seconds a worker that was heard from may stay silent before it counts as lost (it beats
#: every ``channel.BEAT_INTERVAL``).
SILENCE_TIMEOUT = 10.0
#: Seconds ``stop_all`` gives a worker to exit after SIGTERM before SIGKILL.
STOP_GRACE = 0.5


class WorkerHandle(Protocol):
    """A worker as the supervisor sees it."""

    slot: int

    def exit_status(self) -> int | None:
        """Its exit status, or None while it runs (or while that cannot be known)."""

    def terminate(self) -> None:
        """Ask it to stop (it reports its last count and exits)."""

    def kill(self) -> None:
        """Stop it now."""

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status once it exited; ``subprocess.TimeoutExpired`` after ``timeout``."""


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
        return self.proc.wait(timeout=timeout)


class Supervisor:
    """Starts workers (``start(slot) -> WorkerHandle``), tracks liveness, replaces, stops."""

    def __init__(self, start: Callable[[int], WorkerHandle]) -> None:
        self._start = start
        self.workers: dict[int, WorkerHandle] = {}
        self.next_slot = 0
        #: slot -> when it was last heard from (only workers heard at least once)
        self.last_heard: dict[int, float] = {}
        self.replacements_left = 0
        self.replaced = 0
        #: workers found silent: stopped or hung, they would not act on a SIGTERM
        self.silent: set[int] = set()

    def spawn(self, start: Callable[[int], WorkerHandle] | None = None) -> WorkerHandle:
        slot = self.next_slot
        self.next_slot += 1
        handle = self.workers[slot] = (start or self._start)(slot)
        return handle

    def heard(self, slot: int, now: float) -> None:
        self.last_heard[slot] = now

    def lost(self, now: float, ignore: Callable[[int], bool]) -> list[tuple[int, str]]:
        """Workers lost now (and why), leaving out those ``ignore(slot)`` says are no concern
        (done, or already replaced). A clean exit (status 0) is not a loss."""
        out = []
        for slot, handle in self.workers.items():
            if ignore(slot):
                continue
            rc = handle.exit_status()
            if rc is not None:
                if rc != 0:
                    out.append((slot, f"sender worker {slot} exited with status {rc}"))
                continue
            heard = self.last_heard.get(slot)
            if heard is not None and now - heard > SILENCE_TIMEOUT:
                self.silent.add(slot)
                out.append((slot, f"sender worker {slot} silent for {now - heard:.0f} s"))
        return out

    def exited(self, ignore: Callable[[int], bool]) -> bool:
        """Whether a worker that matters exited (the fast path: nothing else is read)."""
        return any(h.exit_status() is not None and not ignore(s) for s, h in self.workers.items())

    def replace(self, slot: int, why: str) -> WorkerHandle:
        """Stop ``slot`` (it reports its count of blocks sent and exits; a silent one is
        killed) and start another; ConnectError once the session's budget of replacements is
        spent."""
        if slot in self.silent:
            self.workers[slot].kill()
        else:
            self.workers[slot].terminate()
        self.last_heard.pop(slot, None)
        if self.replacements_left <= 0:
            raise ConnectError(f"data streams keep failing ({why})")
        self.replacements_left -= 1
        self.replaced += 1
        return self.spawn()

    def all_exited(self) -> bool:
        return all(h.exit_status() is not None for h in self.workers.values())

    def stop_all(self) -> None:
        """Stop every worker now: SIGTERM (a worker then flushes its last reports and exits,
        even from a send blocked on a frozen stream), SIGKILL for any still there shortly."""
        for h in self.workers.values():
            h.terminate()
        deadline = time.monotonic() + STOP_GRACE
        self.reap(deadline)

    def reap(self, deadline: float) -> None:
        """Wait for every worker until ``deadline``, then SIGKILL what is left."""
        for h in self.workers.values():
            try:
                h.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.kill()
                h.wait()


class WorkerPool:
    """One session's workers, their private directory and the channel to them.

    ``close`` stops whatever still runs and removes the directory. ``source``: the file
    ``prestart_workers`` pinned, for the ``send`` that takes this pool (``take_source``)."""

    def __init__(self, width: int, *, fork: bool = False) -> None:
        self.endpoints = Endpoints.private("stx-send-")
        self.supervisor = Supervisor(self._spawn_process)
        self.zctx: zmq.Context | None = None
        self.link: CoordinatorLink | None = None
        self.source: SourceFile | None = None
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

    def take_source(self, path: str | os.PathLike[str]) -> SourceFile | None:
        """The pinned source, if it was pinned for ``path``; the caller owns it from now on."""
        src, self.source = self.source, None
        if src is not None and src.path != Path(path):
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
            self.source.close()
            self.source = None
        self.endpoints.remove()
