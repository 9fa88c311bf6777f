"""Measure process trees: wall time, CPU seconds and peak RSS of a sender and a receiver tree.

Used by ``perf/bench.py``. Everything is read straight from ``/proc`` (cheap enough to sample
every 50 ms on a 2-core machine without stealing much from what is measured):

* **Tree membership**: the root and, recursively, every pid listed in
  ``/proc/PID/task/TID/children`` of a member (all threads, since a child belongs to the thread
  that forked it). Re-walked at every sample, so workers started late are found.
* **Peak RSS of a tree**: the largest sum, over one sample, of field 24 (rss pages) of
  ``/proc/PID/stat`` of every member. Shared pages (the Python interpreter, libraries) are
  counted once per process, as ``ps`` and ``top`` would; a spike shorter than the sampling
  interval can be missed.
* **CPU seconds of a tree**: user + system time of the tree. For a root that the harness
  started, that is the ``rusage`` that ``os.wait4`` returns when it is reaped, which includes
  every descendant that was waited for (stx waits for its workers). For a root that lives on
  (the loopback ``sshd``), or to subtract what a long-lived receiver spent before the sender
  started, it is the sum over the live members of ``utime + stime + cutime + cstime`` (the
  last two: children already reaped), read at both ends. As a cross-check the sampler also
  keeps each member's last-seen own ``utime + stime``; a sum of those well above the
  ``rusage`` figure means a descendant was not reaped by its parent (it is reported).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Stat:
    utime: float  # seconds
    stime: float
    cutime: float
    cstime: float
    rss: int  # bytes
    start: int  # clock ticks after boot: tells a reused pid apart
    state: str  # R, S, D, Z (zombie)...


def read_stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): field N is fields[N - 3]
    return Stat(
        utime=int(fields[11]) / TICK,
        stime=int(fields[12]) / TICK,
        cutime=int(fields[13]) / TICK,
        cstime=int(fields[14]) / TICK,
        rss=int(fields[21]) * PAGE,
        start=int(fields[19]),
        state=fields[0].decode(),
    )


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def tree(root: int) -> list[int]:
    seen = [root]
    i = 0
    while i < len(seen):
        for c in children(seen[i]):
            if c not in seen:
                seen.append(c)
        i += 1
    return seen


def tree_cpu(root: int) -> float:
    """User + system seconds of the live tree under ``root``, including reaped descendants."""
    total = 0.0
    for pid in tree(root):
        st = read_stat(pid)
        if st is not None:
            total += st.utime + st.stime + st.cutime + st.cstime
    return total


@dataclass
class TreeWatch:
    """Samples one process tree: peak RSS, and each member's last-seen CPU."""

    root: int
    peak_rss: int = 0
    samples: int = 0
    own_cpu: dict[tuple[int, int], float] = field(default_factory=dict)  # (pid, start) -> s
    alive: bool = True

    def sample(self) -> None:
        if not self.alive:
            return
        rss = 0
        for pid in tree(self.root):
            st = read_stat(pid)
            if st is None:
                continue
            rss += st.rss
            self.own_cpu[(pid, st.start)] = st.utime + st.stime
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)

    @property
    def sampled_cpu(self) -> float:
        return sum(self.own_cpu.values())

    def members_still_alive(self) -> list[int]:
        """Members seen earlier that still run (after the root was reaped: orphans)."""
        out = []
        for pid, start in self.own_cpu:
            st = read_stat(pid)
            if st is not None and st.start == start and st.state not in "ZX" and pid != self.root:
                out.append(pid)
        return out


@dataclass
class Ended:
    """A child the harness started and reaped."""

    returncode: int
    at: float  # time.monotonic() when it exited
    cpu: float  # user + system of it and its reaped descendants (rusage)
    #: bytes, ru_maxrss: NOT used for peak RSS, because Linux carries the pre-exec high-water
    #: mark of the forked copy of the parent (the harness) into it
    maxrss: int


class Timeout(Exception):
    pass


def reap(proc: subprocess.Popen[bytes], pidfd: int | None = None) -> Ended:
    """Block until ``proc`` exits; its rusage. ``proc.returncode`` is set as Popen would."""
    _, status, ru = os.wait4(proc.pid, 0)
    at = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if pidfd is not None:
        os.close(pidfd)
    return Ended(proc.returncode, at, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024)


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a child started with ``start_new_session=True``."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Measured:
    wall: float
    cpu_send: float
    cpu_recv: float | None
    rss_send: int
    rss_recv: int | None
    rc_send: int
    rc_recv: int | None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, float | int | None] = field(default_factory=dict)


def measure(
    launch: Callable[[], subprocess.Popen[bytes]],
    *,
    receiver: subprocess.Popen[bytes] | None = None,
    external_receiver: int | None = None,
    done_when: str = "sender",
    interval: float = 0.05,
    timeout: float = 600.0,
    receiver_grace: float = 60.0,
) -> Measured:
    """Run one transfer and measure both sides.

    ``launch`` starts the sender (``subprocess.Popen`` with ``start_new_session=True``); the
    clock starts just before it is called. ``receiver`` is a receiving child already started
    and ready (what it spent before the sender started is not counted); ``external_receiver``
    is the pid of a long-lived receiving root that is not our child (sshd): the run then also
    waits until it has no children left. ``done_when``: "sender" (wall time ends when the
    sender exits: it exits only once the copy is complete) or "both" (when the later of the two
    exits). A child that fails to finish in ``timeout`` s raises ``Timeout`` (both trees are
    killed); a receiver still running ``receiver_grace`` s after the sender is killed (noted).
    """
    recv_root = receiver.pid if receiver is not None else external_receiver
    recv_cpu0 = tree_cpu(recv_root) if recv_root is not None else 0.0
    recv_watch = TreeWatch(recv_root) if recv_root is not None else None
    t0 = time.monotonic()
    sender = launch()
    send_watch = TreeWatch(sender.pid)
    watch_of = {sender.pid: send_watch}
    fds: dict[int, subprocess.Popen[bytes]] = {os.pidfd_open(sender.pid): sender}
    if receiver is not None:
        assert recv_watch is not None
        watch_of[receiver.pid] = recv_watch
        fds[os.pidfd_open(receiver.pid)] = receiver
    ended: dict[int, Ended] = {}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    next_sample = t0
    notes: list[str] = []
    give_up_at = t0 + timeout
    killed_receiver = False
    try:
        while True:
            now = time.monotonic()
            if now >= next_sample:
                for w in (send_watch, recv_watch):
                    if w is not None and w.root not in ended:
                        w.sample()
                next_sample = now + interval
            if sender.pid in ended:
                if receiver is not None and receiver.pid not in ended:
                    pass
                elif external_receiver is not None and children(external_receiver):
                    pass
                else:
                    break
                grace = receiver_grace if ended[sender.pid].returncode == 0 else 2.0
                if not killed_receiver and now > ended[sender.pid].at + grace:
                    killed_receiver = True
                    if grace == receiver_grace:
                        notes.append(f"receiver still busy {grace:.0f} s after the sender; killed")
                    if receiver is not None:
                        kill_tree(receiver)
                    else:
                        break
            if now > give_up_at:
                raise Timeout(f"no result after {timeout:.0f} s")
            wait_ms = max(0, int((next_sample - time.monotonic()) * 1000) + 1)
            if external_receiver is not None and sender.pid in ended:
                wait_ms = min(wait_ms, 5)
            for fd, _ev in poller.poll(wait_ms):
                proc = fds[fd]
                watch_of[proc.pid].sample()  # a last look at the tree (the root is a zombie now)
                poller.unregister(fd)
                ended[proc.pid] = reap(proc, fd)
        external_cpu_end = tree_cpu(external_receiver) if external_receiver is not None else None
    except BaseException:
        kill_tree(sender)
        if receiver is not None:
            kill_tree(receiver)
        for fd, proc in fds.items():
            if proc.pid not in ended:
                ended[proc.pid] = reap(proc, fd)
        raise
    s_end = ended[sender.pid]
    wall_end = s_end.at
    cpu_recv: float | None = None
    rc_recv: int | None = None
    rss_recv: int | None = None
    extra: dict[str, float | int | None] = {
        "samples": send_watch.samples,
        "cpu_sampled_send": round(send_watch.sampled_cpu, 3),
    }
    checks: list[tuple[str, TreeWatch, float]] = [("sender", send_watch, s_end.cpu)]
    if receiver is not None:
        assert recv_watch is not None
        r_end = ended[receiver.pid]
        cpu_recv = r_end.cpu - recv_cpu0
        rc_recv = r_end.returncode
        rss_recv = recv_watch.peak_rss
        extra["cpu_sampled_recv"] = round(recv_watch.sampled_cpu, 3)
        extra["recv_cpu_before_sender"] = round(recv_cpu0, 3)
        checks.append(("receiver", recv_watch, r_end.cpu))
        if done_when == "both":
            wall_end = max(wall_end, r_end.at)
    elif recv_watch is not None and external_cpu_end is not None:
        cpu_recv = external_cpu_end - recv_cpu0
        rss_recv = recv_watch.peak_rss
    for name, w, cpu in checks if not killed_receiver else []:
        if w.sampled_cpu > cpu * 1.05 + 0.1:
            notes.append(
                f"{name} tree: CPU sampled per process {w.sampled_cpu:.2f} s > rusage {cpu:.2f} s"
                " (a descendant was not waited for by its parent?)"
            )
        orphans = w.members_still_alive()
        if orphans:
            notes.append(f"{name} tree: {len(orphans)} process(es) outlived the root: {orphans}")
    return Measured(
        wall=wall_end - t0,
        cpu_send=s_end.cpu,
        cpu_recv=cpu_recv,
        rss_send=send_watch.peak_rss,
        rss_recv=rss_recv,
        rc_send=s_end.returncode,
        rc_recv=rc_recv,
        notes=notes,
        extra=extra,
    )
