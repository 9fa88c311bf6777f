"""A sender worker that is alive but silent (stopped) is replaced like a dead one.

Liveness is by heartbeat: each sender worker says ``Alive`` every half second on its report
channel, and the coordinator replaces one it has not heard from for
``supervisor.SILENCE_TIMEOUT`` seconds (it is killed: a stopped process does not act on
SIGTERM), its unfinished blocks requeued. Before, a stopped worker held its blocks until the
session's stall timeout forced a reconnect. Real ``stx recv`` and ``stx send``; the streams go
through a throttling relay so that the transfer lasts long enough to stop a worker in it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from itest_support import CliReceiver, expected_digest, sha256_file, wait_dead, wait_for
from tcp_relay import UplinkThrottle

MB = 1 << 20

#: A failed test must not leave a stopped process behind (conftest.py).
pytestmark = pytest.mark.usefixtures("continue_stopped_workers")


@pytest.mark.timeout(150)
def test_stopped_sender_worker_is_replaced(
    procs: Any, fault_key: Path, scratch: Path, kit: Any
) -> None:
    logdir = scratch / "logs"
    logdir.mkdir()
    dest = scratch / "dest"
    dest.mkdir()
    src = kit.make_source(scratch / "silent.bin", 24 * MB).path
    recv = CliReceiver(fault_key, dest, logdir, workers=2, once=False)
    recv.start()
    assert recv.proc is not None
    procs.track(recv.proc)
    throttle = UplinkThrottle(("127.0.0.1", recv.port), 1 * MB).start()
    try:
        sender = kit.CliSender(
            procs,
            src,
            f"127.0.0.1:{throttle.port}",
            fault_key,
            logdir,
            workers=2,
            block_size="1M",
            max_retries=0,  # a reconnect would hide the replacement: none is allowed
            extra=["--stall-timeout", "120"],
        ).start()
        part = dest / f".{src.name}.stxpart"
        assert wait_for(part.exists, timeout=30, step=0.01), "the transfer never started"
        assert wait_for(lambda: len(kit.workers_of(sender.pid, kit.SENDER_WORKER)) >= 2, timeout=10)
        victim = kit.workers_of(sender.pid, kit.SENDER_WORKER)[0]
        os.kill(victim.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert wait_dead(victim, timeout=30), "the stopped sender worker was never killed"
        assert time.monotonic() - t0 < 25
        throttle.rate = 0  # the fault is over: the rest of the file at full speed
        run = sender.wait(timeout=120)
    finally:
        throttle.stop()
    assert run.rc == 0, (run.rc, run.stderr, recv.stderr)
    result = run.json()
    assert result["digest"] == expected_digest(src, 1 * MB), result
    assert result["reconnects"] == 0, result
    assert result.get("streams_replaced", 1) >= 1, result
    assert sha256_file(dest / src.name) == sha256_file(src)
    assert recv.stop() == 0, recv.stderr
