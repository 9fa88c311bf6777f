"""The key never shows on a command line, in an environment or in output, on either side,
while a transfer is running."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from itest_support import (
    STX,
    CliReceiver,
    assert_no_secrets,
    is_worker,
    process_tree,
    sha256_file,
    wait_for,
    write_random,
)
from tcp_relay import UP, Direction, RelayConnection, TcpRelay


class HoldingRelay(TcpRelay):
    """Holds the client->receiver bytes of every data stream (every connection after the
    first) until ``release`` is set, so that the sender's workers stay alive to be looked at."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.release = threading.Event()

    def transform(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        if direction == UP and conn.id > 0:
            self.release.wait(timeout=8.0)
        return data


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except psutil.Error:
        return {}


@pytest.mark.timeout(90)
def test_key_never_in_argv_environment_or_output(
    cli_receiver: Callable[..., CliReceiver],
    keyfile: tuple[Path, bytes],
    scratch: Path,
) -> None:
    path, key = keyfile
    hexkey = key.hex()
    dest = scratch / "dst"
    dest.mkdir()
    src = scratch / "big.bin"
    size = 64 << 20
    want = write_random(src, size)
    receiver = cli_receiver(path, dest, workers=2, once=True)
    workers = 3

    with HoldingRelay((receiver.host, receiver.port)) as relay:
        env = dict(os.environ)
        env["STX_PSK_FILE"] = str(path)  # the documented alternative to --psk-file
        sender = subprocess.Popen(
            [str(STX), "send", str(src), f"127.0.0.1:{relay.port}", "--workers", str(workers)]
            + ["--json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            # every data stream is connected (and held): all sender workers are alive now
            assert relay.wait_accepted(1 + workers, timeout=30), relay.accepted
            assert receiver.proc is not None
            procs = process_tree(sender.pid) + process_tree(receiver.proc.pid)
            cmdlines = [_cmdline(p) for p in procs]
            sender_workers = [p for p in procs if is_worker(p, "stxpar.workers.sender")]
            receiver_workers = [p for p in procs if is_worker(p, "stxpar.workers.receiver")]
            assert len(sender_workers) == workers, cmdlines
            assert len(receiver_workers) == 2, cmdlines
            # The CLI forks its sender workers (their command line is its own); the receiver's
            # are new interpreters.
            assert all(_cmdline(p) == cmdlines[0] for p in sender_workers), cmdlines
            for p, cmd in zip(procs, cmdlines, strict=True):
                assert cmd, f"could not read the command line of {p.pid}"
                assert hexkey not in " ".join(cmd).lower()
                environ = _environ(p)
                assert hexkey not in "\0".join(f"{k}={v}" for k, v in environ.items()).lower()
            # and no other process on the machine shows it either
            for p in psutil.process_iter():
                assert hexkey not in " ".join(_cmdline(p)).lower(), p.pid
        finally:
            relay.release.set()
            try:
                out, err = sender.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                sender.kill()
                out, err = sender.communicate()

    assert sender.returncode == 0, err
    assert receiver.wait(timeout=20) == 0
    assert wait_for(lambda: (dest / src.name).exists())
    assert sha256_file(dest / src.name) == want
    assert_no_secrets(out, err, receiver.stdout, receiver.stderr)
    assert hexkey not in (out + err + receiver.stdout + receiver.stderr).lower()
    assert hexkey in path.read_text()  # the check above would have seen it
