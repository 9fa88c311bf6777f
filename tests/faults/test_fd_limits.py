"""A receiver short of file descriptors stays alive.

Each receiving stream used to open its own ZeroMQ PUSH connection to the coordinator, so the
coordinator's descriptors grew with the streams; out of descriptors, libzmq's IPC listener hit
an assertion in ``accept`` and the receiver died of SIGABRT (3 of 3 runs under
``prlimit --nofile=40``). Now every worker reports over one connection, so the coordinator's
IPC descriptors are fixed by the pool size. What a descriptor shortage may still cost is one
connection or one transfer attempt, with an error the sender retries; the receiver keeps its
port and serves the next sender.

Real ``stx recv`` under ``prlimit``, real ``stx send`` processes, many streams at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest
from itest_support import CliReceiver, sha256_file, wait_for

from stxpar.gatekeeper import FdBudget
from stxpar.receiver import SPAWN_DESCRIPTORS

KB = 1 << 10
MB = 1 << 20
#: The coordinator of a 2-worker ``stx recv`` holds 17 descriptors once it listens: 40 is
#: the limit of the original report, 24 leaves it almost nothing.
LIMITS = [40, 24]
#: The lowest of LIMITS at which the receiver serves at all: below it the descriptors it holds
#: at rest plus the reserve it keeps free (stxpar.gatekeeper.FdBudget) leave no room, and every
#: connection is refused with a retryable "receiver busy" -- which is what that case checks.
SERVES_FROM = 40
SENDERS = 4
STREAMS = 8

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit(1)")


def _receiver(procs: Any, key: Path, dest: Path, logdir: Path, nofile: int) -> CliReceiver:
    r = CliReceiver(key, dest, logdir, workers=2, once=False)
    r.args = ["prlimit", f"--nofile={nofile}", "--", *r.args]
    r.start()
    assert r.proc is not None
    procs.track(r.proc)
    return r


def _sender(
    kit: Any,
    procs: Any,
    src: Path,
    recv: CliReceiver,
    key: Path,
    logdir: Path,
    max_retries: int = 10,
) -> Any:
    return kit.CliSender(
        procs,
        src,
        recv.address,
        key,
        logdir,
        workers=STREAMS,
        block_size="64K",
        max_retries=max_retries,
    ).start()


def _fds(pid: int) -> int:
    try:
        return psutil.Process(pid).num_fds()
    except psutil.Error:
        return -1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nofile", LIMITS, ids=lambda n: f"nofile{n}")
def test_many_streams_under_a_small_descriptor_limit(
    nofile: int, procs: Any, fault_key: Path, scratch: Path, kit: Any
) -> None:
    logdir = scratch / "logs"
    logdir.mkdir()
    dest = scratch / "dest"
    dest.mkdir()
    sources = [kit.make_source(scratch / f"f{i}.bin", 8 * MB).path for i in range(SENDERS)]
    recv = _receiver(procs, fault_key, dest, logdir, nofile)
    assert recv.proc is not None
    pid = recv.proc.pid
    # below SERVES_FROM every attempt is refused: a few retries show it, more only take time
    retries = 10 if nofile >= SERVES_FROM else 2
    senders = [_sender(kit, procs, src, recv, fault_key, logdir, retries) for src in sources]
    runs = [s.wait(timeout=150) for s in senders]
    alive = recv.proc.poll()
    assert alive is None, (
        f"stx recv died (status {alive}"
        f"{', SIGABRT' if alive == -signal.SIGABRT else ''}) under nofile={nofile}:"
        f" {recv.stderr[-2000:]}"
    )
    for run in runs:
        # completed, or refused with the code a sender retries (4): never anything else
        assert run.rc in (0, 4), (run.rc, run.stderr)
    # whatever did not get through does now, one at a time, from the same receiver -- where
    # the limit leaves room above the receiver's descriptor reserve to serve at all; below
    # that every sender is told, retryably, that the receiver is busy
    for src, run in zip(sources, runs, strict=True):
        if run.rc != 0 and nofile < SERVES_FROM:
            assert "receiver busy" in run.stderr, run.stderr
            continue
        if run.rc != 0:
            again = _sender(kit, procs, src, recv, fault_key, logdir).wait(timeout=90)
            assert again.rc == 0, again.stderr
        assert sha256_file(dest / src.name) == sha256_file(src)
    assert recv.proc.poll() is None
    assert 0 < _fds(pid) <= nofile
    assert "Assertion failed" not in recv.stderr, recv.stderr[-2000:]
    assert "Traceback" not in recv.stderr, recv.stderr[-2000:]
    assert recv.stop() == 0
    if nofile >= SERVES_FROM:
        for name in os.listdir(dest):
            assert not name.endswith((".stxpart", ".stxstate")), sorted(os.listdir(dest))


@pytest.mark.timeout(120)
def test_worker_replaced_while_idle_connections_fill_the_descriptors(
    procs: Any, fault_key: Path, scratch: Path, kit: Any
) -> None:
    """A worker dies while idle connections take every descriptor the gatekeeper will give
    them: the gatekeeper's reserve (stxpar.gatekeeper.FdBudget) leaves what a replacement
    worker needs (SPAWN_DESCRIPTORS), so the pool replaces it at once, and neither the report
    thread (socketpair failing) nor the whole process (libzmq's IPC accept aborting) goes down."""
    nofile = 32
    reserve = FdBudget().reserve(nofile)
    assert reserve >= SPAWN_DESCRIPTORS
    logdir = scratch / "logs"
    logdir.mkdir()
    dest = scratch / "dest"
    dest.mkdir()
    src = kit.make_source(scratch / "after.bin", 4 * MB).path
    recv = _receiver(procs, fault_key, dest, logdir, nofile)
    assert recv.proc is not None
    pid = recv.proc.pid
    idle: list[socket.socket] = []
    try:
        for _ in range(nofile):
            idle.append(socket.create_connection((recv.host, recv.port), timeout=5))
        assert wait_for(lambda: _fds(pid) >= nofile - reserve - 1, timeout=10), _fds(pid)
        victim = kit.workers_of(pid, kit.RECEIVER_WORKER)[0]
        victim.kill()

        def replaced() -> bool:
            ws = kit.workers_of(pid, kit.RECEIVER_WORKER)
            return len(ws) == 2 and victim.pid not in {w.pid for w in ws}

        assert wait_for(replaced, timeout=30), recv.stderr[-2000:]
        assert recv.proc.poll() is None, f"stx recv died: {recv.stderr[-2000:]}"
    finally:
        for s in idle:
            s.close()
    run = _sender(kit, procs, src, recv, fault_key, logdir).wait(timeout=60)
    assert run.rc == 0, run.stderr
    assert sha256_file(dest / src.name) == sha256_file(src)
    assert recv.proc.poll() is None
    assert "Traceback" not in recv.stderr, recv.stderr[-2000:]
    assert recv.stop() == 0
