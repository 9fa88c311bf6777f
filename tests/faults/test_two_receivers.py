"""Two receivers (two ``stx recv`` processes) writing into one destination.

Each admits transfers by name on its own; without a lock in the destination, R2 admitted a
different ``same.bin`` while R1 was receiving one, unlinked and recreated the partial file and
the state log under R1, and R1 then renamed by path: sender A exited 0 with its digest while
the file on disk was B's, or a mix of both. Now the name is locked in the destination
(``.same.bin.stxlock``, ``flock``) from admission to the end: the second receiver refuses
with a retryable error, and the first one's success is real.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from itest_support import (
    STX,
    CliReceiver,
    assert_dest_exactly,
    assert_no_secrets,
    expected_digest,
    run_stx,
    sha256_file,
    wait_for,
)
from tcp_relay import UplinkThrottle

MB = 1 << 20


def _send_args(src: Path, port: int, keyfile: Path, retries: int) -> list[str]:
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
        "--max-retries",
        str(retries),
        "--json",
    ]


@pytest.fixture
def receivers(scratch: Path) -> Callable[..., CliReceiver]:
    started: list[CliReceiver] = []
    logdir = scratch / "logs"
    logdir.mkdir(exist_ok=True)

    def factory(keyfile: Path, dest: Path) -> CliReceiver:
        r = CliReceiver(keyfile, dest, logdir, workers=1, once=False)
        started.append(r)
        return r.start()

    yield factory  # type: ignore[misc]
    for r in started:
        r.stop()


@pytest.mark.timeout(120)
def test_second_receiver_on_one_destination_refuses_a_name_in_progress(
    scratch: Path, stx_key: tuple[Path, bytes], receivers: Callable[..., CliReceiver]
) -> None:
    keyfile, _ = stx_key
    dest = scratch / "dst"
    dest.mkdir()
    (scratch / "a").mkdir()
    (scratch / "b").mkdir()
    src_a, src_b = scratch / "a" / "same.bin", scratch / "b" / "same.bin"
    src_a.write_bytes(b"A" * (3 * MB))
    src_b.write_bytes(b"B" * (2 * MB))
    sha_a, sha_b = sha256_file(src_a), sha256_file(src_b)
    r1 = receivers(keyfile, dest)
    r2 = receivers(keyfile, dest)
    with UplinkThrottle((r1.host, r1.port), rate=512 * 1024) as slow:
        a = subprocess.Popen(
            [str(STX), *_send_args(src_a, slow.port, keyfile, 3)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert wait_for(lambda: "receiving same.bin" in r1.stderr, timeout=30), r1.stderr
            b = run_stx(*_send_args(src_b, r2.port, keyfile, 1), timeout=60)
            assert b.rc == 4, (b.rc, b.stderr)
            assert len(b.stderr_lines()) == 1 and "Traceback" not in b.stderr, b.stderr
            assert "another receiver" in b.stderr, b.stderr
            assert "another receiver" in r2.stderr, r2.stderr
            assert a.poll() is None, "the first transfer must not be disturbed"
            out, err = a.communicate(timeout=60)
        finally:
            if a.poll() is None:
                a.kill()
                a.communicate()
    assert_no_secrets(out, err)
    assert a.returncode == 0, err
    assert sha256_file(dest / "same.bin") == sha_a, "A was told success for another file"
    assert r1.json_lines()[-1]["digest"] == expected_digest(src_a, 64 << 10)
    assert_dest_exactly(dest, {"same.bin"})  # no partial, no state log, no lock file
    # the name is free again: B gets through R2 now
    b = run_stx(*_send_args(src_b, r2.port, keyfile, 1), timeout=60)
    assert b.rc == 0, b.stderr
    assert sha256_file(dest / "same.bin") == sha_b
    assert_dest_exactly(dest, {"same.bin"})


@pytest.mark.timeout(120)
def test_second_receiver_serves_the_name_once_the_first_is_done(
    scratch: Path, stx_key: tuple[Path, bytes], receivers: Callable[..., CliReceiver]
) -> None:
    """With retries left, the refused sender backs off and gets through once the first
    transfer has ended; each sender's success is about its own bytes."""
    keyfile, _ = stx_key
    dest = scratch / "dst"
    dest.mkdir()
    (scratch / "a").mkdir()
    (scratch / "b").mkdir()
    src_a, src_b = scratch / "a" / "same.bin", scratch / "b" / "same.bin"
    src_a.write_bytes(b"a" * (2 * MB))
    src_b.write_bytes(b"b" * (1 * MB))
    r1 = receivers(keyfile, dest)
    r2 = receivers(keyfile, dest)
    with UplinkThrottle((r1.host, r1.port), rate=512 * 1024) as slow:
        a = subprocess.Popen(
            [str(STX), *_send_args(src_a, slow.port, keyfile, 3)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert wait_for(lambda: "receiving same.bin" in r1.stderr, timeout=30), r1.stderr
            b = run_stx(*_send_args(src_b, r2.port, keyfile, 10), timeout=90)
            _, err = a.communicate(timeout=60)
        finally:
            if a.poll() is None:
                a.kill()
                a.communicate()
    assert a.returncode == 0, err
    assert b.rc == 0, b.stderr
    assert "another receiver" in r2.stderr, r2.stderr
    # B was admitted only after A had finished: B's file is the one left, whole
    assert r1.json_lines()[-1]["digest"] == expected_digest(src_a, 64 << 10)
    assert r2.json_lines()[-1]["digest"] == expected_digest(src_b, 64 << 10)
    assert (dest / "same.bin").read_bytes() == src_b.read_bytes()
    assert_dest_exactly(dest, {"same.bin"})
