"""``--limit-rate`` (issue 15) with real processes on 127.0.0.1: what the receiver lands, sampled
from /proc every 50 ms (psutil ``write_chars`` of its processes: their ``pwrite``s, with
``STX_LANDING=pwrite`` so that no block lands through a mapping), must stay within the limit
over every 1-second window (plus a few blocks of slack for where a window's edges fall and for
the blocks in flight), and a transfer must take at least as long as its bytes need at the
limit. How close to the limit a
transfer gets (4.0 s +- 10% for 400 MiB at 100M) is measured by perf/ratelimit.py, not here.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from itest_support import (
    STX,
    CliReceiver,
    WriteMeter,
    assert_one_line_error,
    cli_receiver_rig,
    run_stx,
    sha256_file,
    write_random,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
BLOCK = 256 << 10
WINDOW = 1.0


def _send(recv: CliReceiver, key: Path, src: Path, *opts: str) -> subprocess.Popen[bytes]:
    argv = [str(STX), "send", str(src), recv.address, "--psk-file", str(key), "--quiet"]
    argv += ["--json", "--block-size", "256K", *opts]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


@pytest.fixture(autouse=True)
def _pwrite_landing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STX_LANDING", "pwrite")


def test_sender_limit_holds_over_every_window() -> None:
    rate = 8 * MiB
    with cli_receiver_rig("stx-rate-") as (recv, key, root):
        src = root / "src" / "f.bin"
        digest = write_random(src, 24 * MiB)
        assert recv.proc is not None
        with WriteMeter(recv.proc.pid) as meter:
            started = time.monotonic()
            result = _finish(_send(recv, key, src, "--workers", "3", "--limit-rate", "8M"))
            took = time.monotonic() - started
        assert sha256_file(root / "dest" / "f.bin") == digest
        assert result["workers"] == 3 and result["limit_rate"] == rate  # --json shows it
        assert took >= 24 * MiB / rate * 0.95, took
        busiest = meter.busiest_window(WINDOW)
        assert busiest <= rate * WINDOW * 1.05 + 3 * BLOCK, (busiest / MiB, "MiB in 1 s")
        assert busiest >= rate * WINDOW * 0.5, "the meter saw nothing: it measures nothing"


def test_receiver_limit_holds_over_two_concurrent_senders() -> None:
    rate = 8 * MiB
    with cli_receiver_rig("stx-rate-") as (_, key, root):
        dest = root / "dest2"
        dest.mkdir()
        recv = CliReceiver(
            key, dest, root / "logs", once=False, extra=["--limit-rate", "8M"]
        ).start()
        try:
            a, b = root / "src" / "a.bin", root / "src" / "b.bin"
            da, db = write_random(a, 12 * MiB), write_random(b, 12 * MiB)
            assert recv.proc is not None
            with WriteMeter(recv.proc.pid) as meter:
                started = time.monotonic()
                pa = _send(recv, key, a, "--workers", "2")
                pb = _send(recv, key, b, "--workers", "2")
                _finish(pa)
                _finish(pb)
                took = time.monotonic() - started
            assert sha256_file(dest / "a.bin") == da and sha256_file(dest / "b.bin") == db
            assert "at most 8.0 MiB/s" in recv.stderr  # the limit in force, in its log
            assert took >= 24 * MiB / rate * 0.95, took
            busiest = meter.busiest_window(WINDOW)
            assert busiest <= rate * WINDOW * 1.05 + 4 * BLOCK, (busiest / MiB, "MiB in 1 s")
            assert busiest >= rate * WINDOW * 0.5
        finally:
            recv.stop()


@pytest.mark.parametrize("value", ["0", "100G"])
def test_no_limit_or_one_far_above_moves_the_file(value: str) -> None:
    # 0 is no limit; 100G is more than the 32 bits SO_MAX_PACING_RATE takes (capped)
    with cli_receiver_rig("stx-rate-") as (recv, key, root):
        src = root / "src" / "f.bin"
        digest = write_random(src, 8 * MiB)
        result = _finish(_send(recv, key, src, "--workers", "2", "--limit-rate", value))
        assert sha256_file(root / "dest" / "f.bin") == digest
        assert result["bytes"] == 8 * MiB


@pytest.mark.parametrize("value", ["-5M", "fast", "1.5.2"])
def test_bad_rates_are_usage_errors(value: str) -> None:
    with cli_receiver_rig("stx-rate-") as (recv, key, root):
        write_random(root / "src" / "f", 100)
        run = run_stx(
            "send", root / "src" / "f", recv.address, "--psk-file", key, "--limit-rate", value
        )
        assert run.rc == 2 and "--limit-rate" in run.stderr, run.stderr
        assert_one_line_error(run)
