"""Retries are spread out in time even when every attempt fails at once (issue 11).

A real ``stx send`` is started against a port where nothing listens yet (every connect is
refused at once); a real receiver appears on that port 3.3 s later. With ``--max-retries 4``
the old schedule (full jitter: at most 0.2 + 0.4 + 0.8 + 1.6 = 3.0 s of waits in all) had given
up by then; the new one (equal jitter: at least 0.25 + 0.5 + 1 + 2 = 3.75 s) is still trying
and gets through. The default budget's property (at least a minute) is checked on the schedule
itself in tests/unit/test_backoff.py; this test is the same rule, scaled down, end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from itest_support import STX, assert_no_secrets, free_port, sha256_file, wait_for, write_random

import stxpar

OUTAGE = 3.3


@pytest.mark.timeout(60)
def test_send_outlasts_a_refusing_port_then_gets_through(
    scratch: Path, keyfile: tuple[Path, bytes]
) -> None:
    src = scratch / "data.bin"
    sha = write_random(src, 300_000)
    dest = scratch / "dst"
    dest.mkdir()
    port = free_port()
    args = [
        str(STX),
        "send",
        str(src),
        f"127.0.0.1:{port}",
        "--psk-file",
        str(keyfile[0]),
        "--workers",
        "1",
        "--block-size",
        "64K",
        "--max-retries",
        "4",
        "--json",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("STX_PSK_FILE", "STX_DEBUG")}
    started = time.monotonic()
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        time.sleep(max(0.0, started + OUTAGE - time.monotonic()))
        assert proc.poll() is None, "stx send gave up during the outage: " + (
            proc.stderr.read().decode() if proc.stderr else ""
        )
        with stxpar.Receiver(dest, psk=keyfile[1], host="127.0.0.1", port=port, workers=1):
            out, err = proc.communicate(timeout=30)
            elapsed = time.monotonic() - started
            assert_no_secrets(out.decode(), err.decode())
            assert proc.returncode == 0, err.decode()
            assert wait_for(lambda: (dest / src.name).exists(), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert sha256_file(dest / src.name) == sha
    assert elapsed >= OUTAGE
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["reconnects"] >= 1, report
