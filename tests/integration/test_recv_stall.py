"""A sender that stops talking (SIGSTOP, a paused VM, a black-holing middlebox) must not hold
its session and the file's name forever: ``stx recv --stall-timeout S`` ends a session that had
no landed block and no control frame for S seconds (the partial kept for a resume), and a new
version of the file may then take the name. Also: ``Receiver.completed`` stays bounded in a
long-running receiver.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from itest_support import (
    STX,
    CliReceiver,
    assert_dest_exactly,
    assert_no_secrets,
    run_stx,
    sha256_file,
    wait_for,
)
from tcp_relay import UplinkThrottle

import stxpar
import stxpar.receiver

KB = 1 << 10
MB = 1 << 20


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def _send_args(src: Path, port: int, keyfile: Path, *extra: str) -> list[str]:
    return [
        "send",
        str(src),
        f"127.0.0.1:{port}",
        "--psk-file",
        str(keyfile),
        "--workers",
        "2",
        "--block-size",
        "64K",
        "--json",
        *extra,
    ]


@pytest.mark.timeout(120)
def test_stopped_sender_is_timed_out_and_a_new_version_takes_the_name(
    scratch: Path,
    keyfile: tuple[Path, bytes],
    cli_receiver: Callable[..., CliReceiver],
) -> None:
    key_path, _ = keyfile
    dest = scratch / "dst"
    dest.mkdir()
    src = scratch / "stall.bin"
    src.write_bytes(os.urandom(6 * MB))
    (scratch / "v2").mkdir()
    v2 = scratch / "v2" / "stall.bin"
    v2.write_bytes(os.urandom(1 * MB))
    recv = cli_receiver(key_path, dest, once=False, extra=["--stall-timeout", "2"])
    statep = dest / ".stall.bin.stxstate"
    stopped: list[psutil.Process] = []
    proc = None
    try:
        with UplinkThrottle((recv.host, recv.port), rate=512 * KB) as slow:
            proc = subprocess.Popen(
                [str(STX), *_send_args(src, slow.port, key_path, "--max-retries", "2")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            assert wait_for(lambda: "receiving stall.bin" in recv.stderr, timeout=30), recv.stderr
            # some blocks durable (records after the header), then the whole sender freezes
            assert wait_for(lambda: statep.exists() and statep.stat().st_size > 200, timeout=30), (
                recv.stderr
            )
            assert proc.poll() is None, "the transfer ended before the sender could be stopped"
            stopped = _tree(proc.pid)
            _signal_all(stopped, signal.SIGSTOP)
            stopped_at = time.monotonic()
            # While the stopped session lives, the name is taken: another version is refused.
            early = run_stx(*_send_args(v2, recv.port, key_path, "--max-retries", "0"))
            assert early.rc == 1 and "in progress" in early.stderr, (early.rc, early.stderr)
            assert wait_for(lambda: "failed stall.bin" in recv.stderr, timeout=30), recv.stderr
            waited = time.monotonic() - stopped_at
            line = next(ln for ln in recv.stderr.splitlines() if "failed stall.bin" in ln)
            assert "stalled" in line and "stall timeout 2 s" in line, line
            assert "partial kept for a resume" in line, line
            assert 1.5 < waited < 20, waited
            assert (dest / ".stall.bin.stxpart").exists() and statep.exists()

            # A new version of the file (another size: another file_id) takes the name now.
            run = run_stx(*_send_args(v2, recv.port, key_path, "--max-retries", "1"))
            assert run.rc == 0, (run.rc, run.stderr)
            assert sha256_file(dest / "stall.bin") == sha256_file(v2)
            assert "starting stall.bin over" in recv.stderr, recv.stderr
            assert_dest_exactly(dest, {"stall.bin"})
    finally:
        _signal_all(stopped, signal.SIGKILL)
        _signal_all(stopped, signal.SIGCONT)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for p in stopped:
            with contextlib.suppress(psutil.Error):
                p.wait(timeout=10)
    assert_no_secrets(recv.stderr)
    assert recv.proc is not None and recv.proc.poll() is None, "the receiver must keep serving"


@pytest.mark.timeout(60)
def test_stall_timeout_must_be_positive(scratch: Path, keyfile: tuple[Path, bytes]) -> None:
    key_path, key = keyfile
    with pytest.raises(stxpar.UsageError):
        stxpar.Receiver(scratch, psk=key, stall_timeout=0)
    run = run_stx(
        "recv", "--listen", "127.0.0.1:0", "--psk-file", key_path, "--dest", scratch,
        "--stall-timeout", "0",
    )  # fmt: skip
    assert run.rc == 2, (run.rc, run.stderr)
    assert "stall timeout" in run.stderr and "Traceback" not in run.stderr, run.stderr
    helped = run_stx("recv", "--help")
    assert "--stall-timeout" in helped.stdout and "--allow-shared-dest" in helped.stdout
    assert f"default {stxpar.receiver.DEFAULT_STALL_TIMEOUT:g}" in " ".join(helped.stdout.split())


@pytest.mark.timeout(60)
def test_completed_keeps_only_the_most_recent(
    scratch: Path, keyfile: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-running receiver must not grow without bound: ``completed`` keeps the most
    recent ``COMPLETED_KEEP`` transfers and counts all of them in ``completed.total``."""
    _, key = keyfile
    monkeypatch.setattr(stxpar.receiver, "COMPLETED_KEEP", 2, raising=False)
    dest = scratch / "dst"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=key, workers=1) as r:
        for i in range(3):
            src = scratch / f"f{i}.bin"
            src.write_bytes(os.urandom(10 * KB))
            stxpar.send(src, *r.address, psk=key, workers=1, block_size=64 * KB)
        assert [f.name for f in r.completed] == ["f1.bin", "f2.bin"]
        assert r.completed[-1].name == "f2.bin" and len(r.completed) == 2
        assert r.completed.total == 3
