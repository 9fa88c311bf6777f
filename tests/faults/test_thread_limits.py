"""Exhausted tasks and descriptors in the receiver's coordinator (issue 11): a thread that
cannot start and a descriptor that cannot be had must cost one connection (told to retry), never
the receiver.

The pids limit comes from a cgroup (v1 ``pids`` controller, or v2) that only the coordinator
process is moved into once it listens: its worker processes keep their own room, so what is
tested is the coordinator alone. The descriptor limit is set on the running coordinator with
``prlimit --pid``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from itest_support import (
    STX,
    CliReceiver,
    cli_receiver_rig,
    sha256_file,
    wait_for,
    write_random,
)


class PidsCgroup:
    """A pids cgroup of our own (removed on close), or a skip with the reason."""

    def __init__(self) -> None:
        name = f"stx-test-{os.getpid()}-{time.monotonic_ns()}"
        v1 = Path("/sys/fs/cgroup/pids")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "cgroup.procs").exists():
            self.path = v1 / name
        elif "pids" in _read(v2 / "cgroup.subtree_control").split():
            self.path = v2 / name
        else:
            pytest.skip("no pids cgroup controller to limit threads with")
        try:
            self.path.mkdir()
            (self.path / "pids.max").write_text("max")
        except OSError as exc:
            pytest.skip(f"cannot make a pids cgroup here: {exc.strerror}")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    @property
    def current(self) -> int:
        return int(_read(self.path / "pids.current"))

    def limit(self, n: int | str) -> None:
        (self.path / "pids.max").write_text(str(n))

    def close(self) -> None:
        parent = self.path.parent / "cgroup.procs"
        for pid in _read(self.path / "cgroup.procs").split():
            try:
                parent.write_text(pid)
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@pytest.fixture
def rig() -> Iterator[tuple[CliReceiver, Path, Path]]:
    with cli_receiver_rig("stx-limits-") as r:
        yield r


def _send(recv: CliReceiver, key: Path, src: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("STX_PSK_FILE", None)
    return subprocess.Popen(
        [str(STX), "send", str(src), recv.address, "--psk-file", str(key), "--quiet", *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _idle(addr: tuple[str, int], sources: int, each: int) -> list[socket.socket]:
    socks = []
    for i in range(sources):
        for _ in range(each):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i}", 0))
            s.settimeout(1)
            try:
                s.connect(addr)
            except OSError:
                s.close()
                continue
            socks.append(s)
    return socks


@pytest.mark.timeout(120)
def test_no_thread_to_spare_costs_one_connection_not_the_receiver(
    rig: tuple[CliReceiver, Path, Path],
) -> None:
    """The coordinator may not start one more thread: idle keyless connections from 9
    addresses cost none (no thread before authentication), an honest sender is told "receiver
    busy" and retries, and once threads may start again it gets through. (Before: the first
    thread that failed to start killed the accept loop; the port stayed open, serving nobody.)"""
    recv, key, root = rig
    assert recv.proc is not None
    cg = PidsCgroup()
    try:
        cg.add(recv.proc.pid)
        cg.limit(cg.current)  # not one more thread
        idle = _idle((recv.host, recv.port), sources=9, each=20)
        assert idle, "no idle connection could be made"
        src = root / "src" / "honest.bin"
        digest = write_random(src, 200_000)
        sender = _send(recv, key, src, "--deadline", "40", "--max-retries", "30")
        assert wait_for(lambda: "cannot start a thread" in recv.stderr, timeout=20), recv.stderr
        time.sleep(0.5)
        assert sender.poll() is None, sender.communicate()
        cg.limit("max")
        out, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
        assert sha256_file(recv.dest / "honest.bin") == digest
        assert recv.proc.poll() is None
        assert recv.stderr.count("cannot start a thread") <= 12  # the log is rate-limited
        for s in idle:
            s.close()
    finally:
        cg.close()


@pytest.mark.timeout(120)
def test_out_of_descriptors_refuses_with_busy_and_keeps_serving(
    rig: tuple[CliReceiver, Path, Path],
) -> None:
    """The coordinator may open only a few more descriptors: idle keyless connections beyond its
    reserve are evicted (or, with nothing to evict, refused with a retryable "receiver busy"
    ERROR), the receiver does not die (before: libzmq aborted it), and an honest sender gets
    through meanwhile."""
    recv, key, root = rig
    assert recv.proc is not None
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit(1) is not installed")
    pid = recv.proc.pid
    open_now = len(os.listdir(f"/proc/{pid}/fd"))
    limit = open_now + 40
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    idle = _idle((recv.host, recv.port), sources=4, each=30)
    time.sleep(1.0)  # accepted (and evicted) by now
    cut = []
    for s in idle:
        s.setblocking(False)
        try:
            s.recv(1)
        except BlockingIOError:
            continue  # still held
        except OSError:
            pass
        cut.append(s)
    # Those held stay under the limit less the reserve; the rest were evicted or refused.
    assert len(idle) - len(cut) < 40, f"{len(idle) - len(cut)} idle connections held"
    assert len(os.listdir(f"/proc/{pid}/fd")) < limit
    src = root / "src" / "honest.bin"
    digest = write_random(src, 200_000)
    done: dict[str, object] = {}

    def more_idle() -> None:  # the attacker keeps coming while the honest sender works
        done["more"] = _idle((recv.host, recv.port), sources=4, each=30)

    t = threading.Thread(target=more_idle)
    t.start()
    sender = _send(recv, key, src, "--workers", "2")
    out, err = sender.communicate(timeout=60)
    t.join(30)
    assert sender.returncode == 0, err
    assert sha256_file(recv.dest / "honest.bin") == digest
    assert recv.proc.poll() is None, recv.stderr
    for s in idle + list(done.get("more", [])):  # type: ignore[call-overload]
        s.close()
