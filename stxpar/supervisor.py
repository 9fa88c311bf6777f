"""Supervision of the sender's workers: which live, which are lost, replacing them. Pure.

Theory of operation
-------------------
A worker is known through a ``WorkerHandle``: its slot, its exit status, and how to stop
it. ``send_pool.LocalWorker`` is a process on this host (a new interpreter, or a fork made
by ``ipc.fork_worker``); a worker on another host (issue 14) would be a handle over its
channel. The ``Supervisor`` starts workers, hears from them (every message a worker sends,
its ``Alive`` beats among them, counts: ``heard``), and says which are lost: a worker that
exited (a local process's exit is seen at once, the fast path) or one that was heard once and
then stayed silent for longer than ``SILENCE_TIMEOUT`` (alive but stopped or hung: it is
replaced like a dead one). It replaces a lost worker within a budget of replacements per
session, and stops them all (SIGTERM, then SIGKILL for any still there shortly).

Neither scheduling (``stxpar.scheduler``) nor processes and sockets (``stxpar.send_pool``)
are here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .errors import ConnectError

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
        """Its exit status once it exited; TimeoutError after ``timeout`` seconds."""


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
            except TimeoutError:
                h.kill()
                h.wait()
