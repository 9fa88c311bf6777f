"""A receiver worker that is alive but does not run, and a landing lock that is never let go.

Transfers of fewer than 4 streams land blocks with ``pwrite`` under an exclusive ``flock`` on
the partial file (``workers/receiver.py``, ``Lander``). A worker stopped (SIGSTOP) while it
held that lock used to stall every stream of the file, and of every later session of the same
name, for good; a stopped worker without the lock kept getting new streams. Now:

- a stream waits a bounded time for the lock, then writes without it (the lock only saves
  CPU; writes of disjoint ranges are correct without it);
- each worker beats every 0.5 s on its channel; the coordinator stops handing streams to a
  worker it has not heard from, kills it (SIGKILL works on a stopped process) and starts a
  new one; the sender replaces the streams it lost.

Real ``stx recv`` and ``stx send`` processes; the sender's streams go through a throttling
relay so that the transfer lasts long enough to stop a worker in the middle of it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from itest_support import CliReceiver, expected_digest, sha256_file, wait_dead, wait_for
from tcp_relay import UplinkThrottle

KB = 1 << 10
MB = 1 << 20
BLOCK = "4M"  # a pwrite of 4 MiB holds the lock long enough to be caught holding it
RATE = 3 * MB  # per connection, sender -> receiver

#: A failed test must not leave a stopped process behind (conftest.py).
pytestmark = pytest.mark.usefixtures("continue_stopped_workers")


def _flock_holders(inode: int) -> set[int]:
    """Pids that hold (not wait for) an FLOCK on ``inode``, from ``/proc/locks``."""
    holders = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or parts[1] == "->" or parts[1] != "FLOCK":
                    continue
                if int(parts[5].rsplit(":", 1)[1]) == inode:
                    holders.add(int(parts[4]))
    except OSError:
        pass
    return holders


def _part_inode(dest: Path, name: str) -> int | None:
    try:
        return os.stat(dest / f".{name}.stxpart").st_ino
    except FileNotFoundError:
        return None


def _stop_lock_holder(recv_pid: int, dest: Path, name: str, kit: Any, timeout: float) -> int:
    """SIGSTOP a receiver worker of ``recv_pid`` at a moment it holds the landing lock of
    ``name``'s partial (checked again after the stop: a worker caught just releasing it is
    continued and the hunt goes on); its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inode = _part_inode(dest, name)
        workers = {w.pid for w in kit.workers_of(recv_pid, kit.RECEIVER_WORKER)}
        if inode is None or not workers:
            time.sleep(0.001)
            continue
        held = _flock_holders(inode) & workers
        if not held:
            continue
        pid = held.pop()
        os.kill(pid, signal.SIGSTOP)
        victim = psutil.Process(pid)
        if wait_for(lambda p=victim: p.status() == psutil.STATUS_STOPPED, timeout=2):
            if pid in _flock_holders(inode):
                return pid
        os.kill(pid, signal.SIGCONT)
    raise AssertionError("never caught a receiver worker holding the landing lock")


def _receiver(procs: Any, fault_key: Path, dest: Path, logdir: Path, **kw: Any) -> CliReceiver:
    r = CliReceiver(fault_key, dest, logdir, workers=2, once=False, **kw)
    r.start()
    assert r.proc is not None
    procs.track(r.proc)
    return r


def _send(kit: Any, procs: Any, src: Path, address: str, key: Path, logdir: Path) -> Any:
    return kit.CliSender(
        procs,
        src,
        address,
        key,
        logdir,
        workers=2,  # 2 streams: the pwrite + flock landing
        block_size=BLOCK,
        max_retries=8,
        extra=["--stall-timeout", "60"],
    ).start()


def _assert_copy(run: Any, src: Path, dest: Path, recv: CliReceiver | None = None) -> None:
    assert run.rc == 0, (run.rc, run.stderr, recv.stderr if recv is not None else "")
    result = run.json()
    assert result["digest"] == expected_digest(src, 4 * MB), result
    assert sha256_file(dest / src.name) == sha256_file(src)


@pytest.mark.timeout(180)
def test_stopped_worker_holding_the_landing_lock(
    procs: Any, fault_key: Path, scratch: Path, kit: Any
) -> None:
    """A worker stopped while it holds the lock: the transfer still completes, identical, in
    bounded time; the stopped worker is killed and replaced; a later transfer completes."""
    logdir = scratch / "logs"
    logdir.mkdir()
    dest = scratch / "dest"
    dest.mkdir()
    src = kit.make_source(scratch / "first.bin", 40 * MB).path
    later = kit.make_source(scratch / "later.bin", 12 * MB).path
    recv = _receiver(procs, fault_key, dest, logdir)
    throttle = _throttle_relay(("127.0.0.1", recv.port))
    try:
        sender = _send(kit, procs, src, f"127.0.0.1:{throttle.port}", fault_key, logdir)
        assert recv.proc is not None
        stopped = _stop_lock_holder(recv.proc.pid, dest, src.name, kit, timeout=30)
        victim = psutil.Process(stopped)
        t0 = time.monotonic()
        run = sender.wait(timeout=90)
        took = time.monotonic() - t0
        _assert_copy(run, src, dest, recv)
        assert took < 60, f"the transfer took {took:.0f} s after a worker was stopped"
        # the stopped worker was killed (not merely left stopped) and replaced
        assert wait_dead(victim, timeout=15), "the stopped worker still exists"

        def replaced() -> bool:
            ws = kit.workers_of(recv.proc.pid, kit.RECEIVER_WORKER)
            return len(ws) == 2 and stopped not in {w.pid for w in ws}

        assert wait_for(replaced, timeout=15), "no replacement for the stopped worker"
        assert "worker" in recv.stderr and str(stopped) in recv.stderr, recv.stderr
    finally:
        throttle.stop()
    # a later transfer, straight to the receiver
    run = _send(kit, procs, later, recv.address, fault_key, logdir).wait(timeout=60)
    _assert_copy(run, later, dest, recv)
    assert recv.proc.poll() is None
    assert recv.stop() == 0, recv.stderr


@pytest.mark.timeout(120)
def test_landing_lock_held_elsewhere(procs: Any, fault_key: Path, scratch: Path, kit: Any) -> None:
    """A process that is not a worker (here: the test, as a same-user process could) takes
    the partial's lock and never lets go: the streams wait a bounded time and then write
    without it; the transfer completes, identical, while the lock is still held."""
    logdir = scratch / "logs"
    logdir.mkdir()
    dest = scratch / "dest"
    dest.mkdir()
    src = kit.make_source(scratch / "locked.bin", 16 * MB).path
    recv = _receiver(procs, fault_key, dest, logdir)
    throttle = _throttle_relay(("127.0.0.1", recv.port))
    fd = -1
    try:
        sender = _send(kit, procs, src, f"127.0.0.1:{throttle.port}", fault_key, logdir)
        part = dest / f".{src.name}.stxpart"
        assert wait_for(part.exists, timeout=30, step=0.0005), "the transfer never started"
        fd = os.open(part, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a writer that holds it right now
        run = sender.wait(timeout=60)
        _assert_copy(run, src, dest, recv)
        assert os.getpid() in _flock_holders(os.fstat(fd).st_ino)  # never let go
        assert recv.proc is not None and recv.proc.poll() is None
    finally:
        if fd >= 0:
            os.close(fd)
        throttle.stop()
    assert recv.stop() == 0, recv.stderr


def _throttle_relay(target: tuple[str, int]) -> UplinkThrottle:
    return UplinkThrottle(target, RATE).start()


@pytest.mark.timeout(90)
def test_whole_receiver_stopped_and_continued(
    procs: Any, fault_key: Path, scratch: Path, kit: Any
) -> None:
    """^Z and ``fg`` (the coordinator stopped with its workers, longer than the heartbeat
    timeout): nobody was heard from, but nobody is replaced either; transfers go on."""
    logdir = scratch / "logs"
    logdir.mkdir()
    dest = scratch / "dest"
    dest.mkdir()
    src = kit.make_source(scratch / "after.bin", 4 * MB).path
    recv = _receiver(procs, fault_key, dest, logdir)
    assert recv.proc is not None
    group = [psutil.Process(recv.proc.pid), *kit.workers_of(recv.proc.pid, kit.RECEIVER_WORKER)]
    before = {p.pid for p in group[1:]}
    assert len(before) == 2
    time.sleep(1.5)  # a few heartbeats and checks first
    # The workers a moment before the coordinator (which reads what they sent meanwhile).
    for p in group[1:]:
        p.send_signal(signal.SIGSTOP)
    time.sleep(0.7)
    group[0].send_signal(signal.SIGSTOP)
    time.sleep(8)
    # The coordinator first: on a busy machine the workers may well run a little later.
    group[0].send_signal(signal.SIGCONT)
    time.sleep(0.7)
    for p in group[1:]:
        p.send_signal(signal.SIGCONT)
    time.sleep(3)
    run = _send(kit, procs, src, recv.address, fault_key, logdir).wait(timeout=60)
    _assert_copy(run, src, dest, recv)
    assert {w.pid for w in kit.workers_of(recv.proc.pid, kit.RECEIVER_WORKER)} == before
    assert "replaced receiver worker" not in recv.stderr, recv.stderr
    assert recv.stop() == 0, recv.stderr
