"""The receiver's disk fills up.

* Mid transfer (a small tmpfs mounted as the destination, filled by the test while a proxy
  holds the transfer at a known point): the sender gets one clear error line, the partial file
  and its state stay and are consistent (every block the state claims is in the partial file
  with its digest), and once space is freed the next run resumes from exactly those blocks.
* At admission (``RLIMIT_FSIZE`` on the receiver process: preallocating the partial file fails
  with EFBIG): one clear error, nothing left behind, and the next run succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_relay import GateRelay, ProcGroup, send_args, start_receiver
from itest_support import (
    assert_dest_exactly,
    assert_one_line_error,
    run_stx,
    sha256_file,
    wait_for,
    write_random,
)
from xxhash import xxh3_128_digest

import stxpar

PART_SUFFIX = ".stxpart"
STATE_SUFFIX = ".stxstate"
STATE_MAGIC = b"STXSTATE2\n"
STATE_RECORD = struct.Struct(">I16sI")


@pytest.fixture
def small_fs(scratch: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for this test (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = scratch / "small"
    mnt.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", os.fspath(mnt)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", os.fspath(mnt)], capture_output=True, timeout=10)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True, timeout=10)


def read_state(path: Path) -> dict[int, bytes]:
    """The blocks a ``.NAME.stxstate`` claims, read from the documented layout (not with
    stxpar): magic, u32 header length, header, u32 CRC, then 24-byte records ``u32 seq |
    digest[16] | u32 CRC-32(seq || digest)``; a torn or damaged record ends the log."""
    data = path.read_bytes()
    assert data.startswith(STATE_MAGIC), "the state file lost its header"
    (hlen,) = struct.unpack_from(">I", data, len(STATE_MAGIC))
    start = len(STATE_MAGIC) + 4
    (hcrc,) = struct.unpack_from(">I", data, start + hlen)
    assert zlib.crc32(data[start : start + hlen]) == hcrc, "the state header is damaged"
    pos = start + hlen + 4
    claims: dict[int, bytes] = {}
    while pos + STATE_RECORD.size <= len(data):
        seq, digest, crc = STATE_RECORD.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + 20]) != crc:
            break
        claims[seq] = digest
        pos += STATE_RECORD.size
    return claims


def assert_state_consistent(dest: Path, src: Path, block_size: int) -> dict[int, bytes]:
    """Every block the state claims is, in the partial file, exactly the source's block, and
    the claimed digest is that block's XXH3-128."""
    claims = read_state(dest / f".{src.name}{STATE_SUFFIX}")
    part = (dest / f".{src.name}{PART_SUFFIX}").read_bytes()
    data = src.read_bytes()
    assert len(part) == len(data), "the partial file changed size"
    for seq, digest in claims.items():
        want = data[seq * block_size : (seq + 1) * block_size]
        assert xxh3_128_digest(want) == digest, f"state has a wrong digest for block {seq}"
        assert part[seq * block_size : seq * block_size + len(want)] == want, (
            f"state claims block {seq}, but the partial file does not hold it"
        )
    return claims


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            buf = b"\0" * chunk
            while True:
                try:
                    written += os.write(fd, buf)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


@pytest.mark.timeout(90)
def test_disk_fills_mid_transfer_then_resumes(
    small_fs: Path,
    scratch: Path,
    stx_key: tuple[Path, bytes],
    group: ProcGroup,
) -> None:
    keyfile, key = stx_key
    block = 16 << 10
    size = 4 << 20
    total = size // block  # 256 blocks: the state log grows past its first page (40 B each)
    src = scratch / "payload.bin"
    sha = write_random(src, size)
    dest = small_fs
    with stxpar.Receiver(dest, psk=key, workers=2) as receiver:
        with GateRelay(receiver.address, after=32) as relay:
            sender = group.start(
                *send_args(
                    src,
                    f"127.0.0.1:{relay.port}",
                    keyfile,
                    block_size="16K",
                    extra=["--stall-timeout", "30", "--max-retries", "0"],
                )
            )
            statep = dest / f".{src.name}{STATE_SUFFIX}"
            # the proxy holds every block after the 32nd: wait until the receiver recorded
            # what got through, then take the rest of the space
            assert wait_for(lambda: relay.closed_at is not None, timeout=30), "gate never hit"

            def settled() -> bool:
                return statep.exists() and len(read_state(statep)) >= 16

            assert wait_for(settled, timeout=20), "the receiver recorded nothing"
            before = len(read_state(statep))
            assert before < 100, "the state log must still have room in its first page"
            filler = dest / "filler"
            assert fill(filler) > 0
            relay.open()
            assert wait_for(lambda: sender.poll() is not None, timeout=40), "sender hangs"
            out, err = group.output(sender)

        assert sender.returncode == 1, (sender.returncode, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "disk is full" in lines[0] or "No space left" in lines[0], lines
        assert not out.strip(), "no JSON for a failed transfer"
        assert not (dest / src.name).exists(), "an incomplete file took the final name"

        # the state is consistent with the partial file, and kept for a resume
        claims = assert_state_consistent(dest, src, block)
        assert before <= len(claims) < total, (before, len(claims))

        filler.unlink()  # space is back
        run = run_stx(
            *send_args(src, f"127.0.0.1:{receiver.address[1]}", keyfile, block_size="16K")
        )
        assert run.rc == 0, run.stderr
        result = run.json()
        assert sha256_file(dest / src.name) == sha
        assert_dest_exactly(dest, {src.name})
        assert result["blocks_resumed"] == len(claims), (result, len(claims))
        assert result["blocks_sent"] == total - len(claims), result
        assert result["bytes_resumed"] == len(claims) * block, result
        assert result["retransmits"] == 0 and result["reconnects"] == 0, result


def _limit_file_size() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.timeout(60)
def test_receiver_that_cannot_hold_the_file_refuses_cleanly(
    scratch: Path, stx_key: tuple[Path, bytes], group: ProcGroup
) -> None:
    """A receiver whose files may not grow past 1 MiB (RLIMIT_FSIZE) is sent 4 MiB: the
    partial file cannot be preallocated; one clear error, nothing left in the destination.
    With the limit gone (space freed), the same file goes through."""
    keyfile, _ = stx_key
    src = scratch / "payload.bin"
    sha = write_random(src, 4 << 20)
    dest = scratch / "dst"
    dest.mkdir()

    proc, port = start_receiver(group, keyfile, dest, preexec_fn=_limit_file_size)
    run = run_stx(*send_args(src, f"127.0.0.1:{port}", keyfile))
    assert run.rc == 1, (run.rc, run.stderr)
    assert_one_line_error(run)
    assert len(run.stderr_lines()) == 1, run.stderr
    assert "disk is full" in run.stderr or "File too large" in run.stderr, run.stderr
    assert_dest_exactly(dest, set())
    assert proc.poll() is None, "the receiver must keep serving"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    _, port = start_receiver(group, keyfile, dest)
    run = run_stx(*send_args(src, f"127.0.0.1:{port}", keyfile))
    assert run.rc == 0, run.stderr
    assert sha256_file(dest / src.name) == sha
    assert_dest_exactly(dest, {src.name})
    assert run.json()["blocks_resumed"] == 0
