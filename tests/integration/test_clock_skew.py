"""A sender whose clock is off (issue 11): told "clock skew" with the numbers, exit 3, not the
"authentication failed" of a wrong key; ``stx recv --clock-window`` sets what is allowed.

The sender is a real ``stx send`` process whose wall clock runs ``SKEW`` seconds ahead (its
``time.time`` shifted before the CLI starts: the one clock the handshake reads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from itest_support import CliReceiver, assert_no_secrets, make_keyfile, write_random

SKEW = 600

_SKEWED_SEND = f"""
import sys, time
_real = time.time
time.time = lambda: _real() + {SKEW}
from stxpar.cli import main
sys.exit(main(["send", *sys.argv[1:]]))
"""


def _skewed_send(src: Path, address: str, key: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("STX_PSK_FILE", None)
    args = [sys.executable, "-c", _SKEWED_SEND, str(src), address, "--psk-file", str(key)]
    run = subprocess.run(
        [*args, "--quiet", "--max-retries", "1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert_no_secrets(run.stdout, run.stderr)
    return run


@pytest.mark.timeout(90)
def test_clock_skew_is_named_and_the_window_can_be_set(tmp_path: Path) -> None:
    for d in ("dest", "logs"):
        (tmp_path / d).mkdir()
    key = tmp_path / "stx.key"
    make_keyfile(key)
    src = tmp_path / "f.bin"
    write_random(src, 100_000)

    recv = CliReceiver(key, tmp_path / "dest", tmp_path / "logs", once=False).start()
    try:
        run = _skewed_send(src, recv.address, key)
    finally:
        recv.stop()
    assert run.returncode == 3, run.stderr
    assert "clock skew: the sender's clock differs from the receiver's by 600" in run.stderr
    assert "(ahead); allowed ±300 s" in run.stderr
    assert "authentication failed" not in run.stderr
    assert "clock skew" in recv.stderr  # and the receiver's log says so too
    assert not (tmp_path / "dest" / "f.bin").exists()

    wide = CliReceiver(
        key, tmp_path / "dest", tmp_path / "logs", extra=["--clock-window", "900"]
    ).start()
    try:
        run = _skewed_send(src, wide.address, key)
        assert wide.wait(timeout=30) == 0
    finally:
        wide.stop()
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "dest" / "f.bin").read_bytes() == src.read_bytes()
