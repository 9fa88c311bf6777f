"""A receiver worker that cannot start a thread refuses that one stream and goes on.

A stream gets a thread in its receiver worker. Where no thread can start (a cgroup's
``pids.max``, systemd's ``TasksMax``, ``RLIMIT_NPROC``), ``Thread.start`` raised out of the
worker's main loop: the worker died and took every stream it served with it. Now the stream
is refused with the code a sender retries, the coordinator hears it released, the worker logs
it once and keeps serving its other streams.

The limit is put on one live worker only: a child cgroup of the v1 ``pids`` hierarchy with
``pids.max`` at the worker's current thread count (as root), else the worker's own
``RLIMIT_NPROC`` (not as root, whom that limit does not bind); skipped where neither works.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from itest_support import CliReceiver, sha256_file, wait_for
from tcp_relay import UplinkThrottle

MB = 1 << 20
RATE = 1 * MB  # per connection: the first transfer lasts a few seconds
PIDS_ROOT = Path("/sys/fs/cgroup/pids")


@contextlib.contextmanager
def _thread_limit() -> Iterator[Callable[[int], Callable[[], None]]]:
    """``limit(pid)`` stops process ``pid`` from starting more threads; it returns a function
    that lifts the limit. Everything is undone when the block ends."""
    undo: list[Callable[[], None]] = []
    cgroup = PIDS_ROOT / f"stx-test-{os.getpid()}"
    if os.geteuid() == 0:
        try:
            cgroup.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot make a pids cgroup ({exc.strerror}); RLIMIT_NPROC binds no root")

        def in_cgroup(pid: int) -> Callable[[], None]:
            (cgroup / "pids.max").write_text(str(psutil.Process(pid).num_threads()))
            (cgroup / "cgroup.procs").write_text(str(pid))

            def lift() -> None:
                (cgroup / "pids.max").write_text("max")

            return lift

        def remove() -> None:
            with contextlib.suppress(OSError):
                for pid in (cgroup / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (PIDS_ROOT / "cgroup.procs").write_text(pid)
            wait_for(lambda: not (cgroup / "cgroup.procs").read_text().split(), timeout=10)
            with contextlib.suppress(OSError):
                cgroup.rmdir()

        undo.append(remove)
        limit = in_cgroup
    else:

        def by_rlimit(pid: int) -> Callable[[], None]:
            old = resource.prlimit(pid, resource.RLIMIT_NPROC)
            resource.prlimit(pid, resource.RLIMIT_NPROC, (1, old[1]))

            def lift() -> None:
                with contextlib.suppress(OSError):
                    resource.prlimit(pid, resource.RLIMIT_NPROC, old)

            return lift

        limit = by_rlimit
    try:
        yield limit
    finally:
        for fn in undo:
            fn()


@pytest.mark.timeout(180)
def test_thread_start_failure_refuses_one_stream(
    procs: Any, fault_key: Path, scratch: Path, kit: Any
) -> None:
    logdir = scratch / "logs"
    logdir.mkdir()
    dest = scratch / "dest"
    dest.mkdir()
    first = kit.make_source(scratch / "first.bin", 6 * MB).path
    second = kit.make_source(scratch / "second.bin", 2 * MB).path
    recv = CliReceiver(fault_key, dest, logdir, workers=1, once=False).start()
    assert recv.proc is not None
    procs.track(recv.proc)
    (worker,) = kit.workers_of(recv.proc.pid, kit.RECEIVER_WORKER)
    # settled: a worker that has just said "ready" may still be starting its heartbeat thread
    counts = [worker.num_threads()]
    while len(counts) < 40 and (len(counts) < 2 or counts[-1] != counts[-2]):
        time.sleep(0.5)
        counts.append(worker.num_threads())
    base_threads = counts[-1]
    relay = UplinkThrottle(("127.0.0.1", recv.port), RATE).start()

    def sender(src: Path, address: str) -> Any:
        return kit.CliSender(
            procs, src, address, fault_key, logdir, workers=2, block_size="64K", max_retries=10
        ).start()

    try:
        with _thread_limit() as limit:
            a = sender(first, f"127.0.0.1:{relay.port}")
            assert wait_for(lambda: worker.num_threads() >= base_threads + 2, timeout=30), (
                "the first transfer's streams never reached the worker"
            )
            lift = limit(worker.pid)
            b = sender(second, recv.address)  # its streams find no thread to run on
            assert wait_for(lambda: "cannot start a thread" in recv.stderr, timeout=30), recv.stderr
            run_a = a.wait(timeout=90)
            lift()
            run_b = b.wait(timeout=120)
    finally:
        relay.stop()
    assert run_a.rc == 0, run_a.stderr
    result = run_a.json()
    # the streams already running on that worker were never touched
    assert result["streams_replaced"] == 0 and result["reconnects"] == 0, result
    assert run_b.rc == 0, run_b.stderr
    for src in (first, second):
        assert sha256_file(dest / src.name) == sha256_file(src)
    # the same worker, alive all along, said it once
    (still,) = kit.workers_of(recv.proc.pid, kit.RECEIVER_WORKER)
    assert still.pid == worker.pid
    assert recv.stderr.count("cannot start a thread") == 1, recv.stderr
    assert "Traceback" not in recv.stderr, recv.stderr
    assert recv.stop() == 0
