"""How a receiver worker puts verified blocks into the partial file (``workers/receiver.py``
``Lander``) and how the partial file is made (``destination.create_partial``), on real files:
tmpfs and a disk directory, a small tmpfs mounted to fill up."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from stxpar.workers.receiver import Lander, use_mapped_landing

from stxpar.destination import create_partial, is_tmpfs
from stxpar.errors import RejectedError

pytestmark = pytest.mark.timeout(60)

BLOCK = 100_003  # not a multiple of the page size: every block but the first is unaligned


def _on_tmpfs(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return is_tmpfs(fd)
    finally:
        os.close(fd)


@pytest.fixture(params=["tmpfs", "disk"])
def where(request: pytest.FixtureRequest) -> Iterator[Path]:
    if request.param == "tmpfs":
        if not os.path.isdir("/dev/shm") or not _on_tmpfs(Path("/dev/shm")):
            pytest.skip("no tmpfs at /dev/shm")
        base = "/dev/shm"
    else:
        base = os.environ.get("STX_DISK_TMP", "/var/tmp")
        if not os.path.isdir(base) or _on_tmpfs(Path(base)):
            pytest.skip(f"{base} is not a disk file system")
    with tempfile.TemporaryDirectory(prefix="stx-land-", dir=base) as d:
        yield Path(d)


def _blocks(n: int, last: int) -> list[bytes]:
    return [os.urandom(BLOCK) for _ in range(n - 1)] + [os.urandom(last)]


@pytest.mark.parametrize("mapped", [False, True], ids=["pwrite", "mapped"])
def test_blocks_land_in_any_order_at_unaligned_offsets(where: Path, mapped: bool) -> None:
    blocks = _blocks(5, 777)
    size = sum(map(len, blocks))
    part = where / ".f.stxpart"
    create_partial(part, size)
    fd = os.open(part, os.O_RDWR if mapped else os.O_WRONLY)
    try:
        lander = Lander(fd, mapped=mapped)
        for i in (3, 0, 4, 1, 2):
            lander.write(memoryview(blocks[i]), i * BLOCK)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert lander.locking
    assert lander.mapped_blocks == (5 if mapped else 0)
    assert part.read_bytes() == b"".join(blocks)


def test_mapped_landing_falls_back_to_pwrite_on_a_write_only_descriptor(where: Path) -> None:
    part = where / ".f.stxpart"
    create_partial(part, BLOCK)
    data = os.urandom(BLOCK)
    fd = os.open(part, os.O_WRONLY)  # cannot be mapped shared
    try:
        lander = Lander(fd, mapped=True)
        lander.write(memoryview(data), 0)
    finally:
        os.close(fd)
    assert not lander.mapped and lander.mapped_blocks == 0
    assert part.read_bytes() == data


@pytest.mark.parametrize(
    ("streams", "override", "mapped"),
    [
        (1, None, False),
        (3, None, False),
        (4, None, True),
        (16, None, True),
        (16, "pwrite", False),
        (1, "mmap", True),
        (8, "bogus", True),
        (2, "", False),
    ],
)
def test_landing_is_chosen_by_stream_count(
    streams: int, override: str | None, mapped: bool
) -> None:
    assert use_mapped_landing(streams, override) is mapped


def test_one_writer_at_a_time(where: Path) -> None:
    """Each write holds an exclusive flock on its own descriptor: while another descriptor of
    the file holds it (another stream), a write waits, then lands."""
    part = where / ".f.stxpart"
    create_partial(part, 2 * BLOCK)
    other = os.open(part, os.O_WRONLY)
    fd = os.open(part, os.O_WRONLY)
    data = os.urandom(BLOCK)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        writer = threading.Thread(target=Lander(fd).write, args=(memoryview(data), BLOCK))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive(), "the write did not wait for the other writer"
        assert part.read_bytes()[BLOCK:] == bytes(BLOCK)
        fcntl.flock(other, fcntl.LOCK_UN)
        writer.join(10)
        assert not writer.is_alive()
    finally:
        os.close(fd)
        os.close(other)
    assert part.read_bytes()[BLOCK:] == data


def test_partial_file_is_preallocated_on_disk_and_only_sized_on_tmpfs(where: Path) -> None:
    size = 64 << 20
    part = where / ".f.stxpart"
    create_partial(part, size)
    st = part.stat()
    assert st.st_size == size
    assert st.st_mode & 0o777 == 0o600
    if _on_tmpfs(where):
        assert st.st_blocks == 0, "tmpfs pages were allocated up front"
    else:
        assert st.st_blocks * 512 >= size, "the disk blocks were not preallocated"


_FILL = """
import os, sys
from stxpar.errors import RejectedError
from stxpar.workers.receiver import Lander
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4 << 20)  # sized, nothing allocated: the 1 MiB tmpfs cannot hold it
try:
    Lander(fd, mapped=sys.argv[2] == "mapped").write(memoryview(os.urandom(4 << 20)), 0)
except RejectedError as exc:
    print("refused:", exc)
else:
    print("written?")
"""


@pytest.mark.parametrize("how", ["pwrite", "mapped"])
def test_full_tmpfs_is_a_clean_disk_error(tmp_path: Path, how: str) -> None:
    """A block that does not fit: the short write is an error naming the full disk (mapped:
    the populate call fails, no SIGBUS, and pwrite says why)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", os.fspath(mnt)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {proc.stderr.strip()}")
    try:
        run = subprocess.run(
            [sys.executable, "-c", _FILL, os.fspath(mnt / ".f.stxpart"), how],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        subprocess.run(["umount", "-l", os.fspath(mnt)], capture_output=True, timeout=10)
    assert run.returncode == 0, f"the writer died (signal {-run.returncode}): {run.stderr}"
    assert run.stdout.startswith("refused:") and "No space left" in run.stdout, run.stdout


def test_rejected_error_is_what_a_write_failure_raises(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(RejectedError, match="write failed"):
            Lander(fd).write(memoryview(b"x" * 10), 0)
    finally:
        os.close(fd)
