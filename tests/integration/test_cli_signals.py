"""Stopping the CLI with a signal: SIGTERM (what a service manager sends), SIGINT (Ctrl-C) and
SIGHUP (the terminal went away).

Real ``stx recv`` and ``stx send`` processes over loopback. Either signal must leave nothing
behind: no worker process, no private IPC directory, one line on stderr, no traceback, and on
the sender's side a partial that the next run resumes."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from itest_support import (
    STX,
    CliReceiver,
    make_keyfile,
    process_tree,
    sha256_file,
    wait_dead,
    wait_for,
    write_random,
)

pytestmark = pytest.mark.timeout(120)

SIZE = 1 << 30  # long enough on 2 cores to be stopped half way


def _ipc_dirs(procs: list[psutil.Process]) -> set[Path]:
    """The private IPC directories of these processes: named in a worker's arguments (a worker
    started as a new interpreter is given its coordinator's ``ipc://DIR/NAME`` endpoints), or
    holding the ZeroMQ endpoints a coordinator has bound (``DIR/ctl``, ``DIR/report``)."""
    dirs = set()
    for p in procs:
        for arg in p.cmdline():
            if arg.startswith("ipc://"):
                dirs.add(Path(arg.removeprefix("ipc://")).parent)
        for conn in p.net_connections(kind="unix"):
            if isinstance(conn.laddr, str) and Path(conn.laddr).name in ("ctl", "report"):
                dirs.add(Path(conn.laddr).parent)
    return dirs


def _all_gone(procs: list[psutil.Process]) -> bool:
    return all(wait_dead(p) for p in procs)


@pytest.fixture
def keyfile(scratch: Path) -> Path:
    path = scratch / "sig.key"
    make_keyfile(path)
    return path


@pytest.fixture
def receiver(keyfile: Path, scratch: Path) -> Iterator[CliReceiver]:
    dest = scratch / "dst"
    dest.mkdir()
    rx = CliReceiver(keyfile, dest, scratch, once=False).start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.mark.parametrize(
    ("sig", "name"), [(signal.SIGTERM, "TERM"), (signal.SIGINT, "INT"), (signal.SIGHUP, "HUP")]
)
def test_receiver_stops_cleanly(keyfile: Path, scratch: Path, sig: int, name: str) -> None:
    dest = scratch / f"dst-{name}"
    dest.mkdir()
    rx = CliReceiver(keyfile, dest, scratch, once=False).start()
    assert rx.proc is not None
    procs = process_tree(rx.proc.pid)
    assert len(procs) >= 3, "the receiver and its workers"
    mine = _ipc_dirs(procs)
    assert mine and all(d.is_dir() for d in mine), "the receiver's private IPC directory"
    rx.proc.send_signal(sig)
    assert rx.wait(timeout=15) == 0
    assert _all_gone(procs), "a receiver process outlived the signal"
    assert not any(d.exists() for d in mine), "the IPC directory was left behind"
    assert "Traceback" not in rx.stderr


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [
        (signal.SIGTERM, 143, "terminated (SIGTERM)"),
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGHUP, 129, "terminated (SIGHUP)"),
    ],
)
def test_sender_stopped_half_way_cleans_up_and_resumes(
    keyfile: Path, scratch: Path, receiver: CliReceiver, sig: int, code: int, word: str
) -> None:
    src = scratch / f"big-{code}.bin"
    want = write_random(src, SIZE)
    argv = [str(STX), "send", "--psk-file", str(keyfile), "--workers", "2", "-q", str(src),
            receiver.address]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: "receiving big-" in receiver.stderr, timeout=30)
        # Stop it once the receiver has made some of it durable (its state log has records).
        state = receiver.dest / f".{src.name}.stxstate"
        assert wait_for(lambda: state.exists() and state.stat().st_size > 0, timeout=30)
        first = state.stat().st_size
        assert wait_for(lambda: state.stat().st_size > first, timeout=30, step=0.005)
        procs = process_tree(proc.pid)
        mine = _ipc_dirs(procs)
        assert mine and all(d.is_dir() for d in mine), "the sender's private IPC directory"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip() == f"stx: {word}", err
    assert _all_gone(procs), "a sender worker outlived its coordinator"
    assert not any(d.exists() for d in mine), "the sender's IPC directory was left behind"
    assert wait_for(lambda: "partial kept" in receiver.stderr, timeout=15), receiver.stderr

    # The same command again resumes and completes.
    run = subprocess.run(argv[:-2] + ["--json", str(src), receiver.address], capture_output=True,
                         text=True, timeout=90)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["blocks_resumed"] > 0
    assert sha256_file(receiver.dest / src.name) == want
