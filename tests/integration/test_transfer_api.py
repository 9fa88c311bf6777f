"""Whole transfers through the Python API: stxpar.Receiver + stxpar.send, real worker processes
and real loopback TCP streams. One receiver serves the whole module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from itest_support import (
    BLOCK,
    assert_dest_exactly,
    blocks_for,
    expected_digest,
    sha256_file,
    wait_for,
    write_random,
)

import stxpar

#: 0, 1, block-1, block, block+1, and a multi-block file whose last block is partial
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 32 * BLOCK + 12345]


@pytest.fixture(scope="module")
def module_key() -> bytes:
    return stxpar.generate_key()


@pytest.fixture(scope="module")
def receiver(shm_dir: Path, module_key: bytes) -> Iterator[stxpar.Receiver]:
    dest = shm_dir / "dst"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=module_key, host="127.0.0.1", port=0, workers=2) as r:
        yield r


@pytest.fixture
def dest(receiver: stxpar.Receiver) -> Iterator[Path]:
    """The receiver's destination, emptied after each test."""
    path = Path(receiver.dest)
    assert_dest_exactly(path, set())
    yield path
    for p in path.iterdir():
        p.unlink()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("size", SIZES)
def test_api_transfer_arrives_identical(
    receiver: stxpar.Receiver,
    dest: Path,
    scratch: Path,
    module_key: bytes,
    size: int,
    workers: int,
) -> None:
    src = scratch / f"file-{size}-{workers}.bin"
    want = write_random(src, size)
    before = len(receiver.completed)
    seen: list[tuple[int, int]] = []

    result = stxpar.send(
        src,
        *receiver.address,
        psk=module_key,
        workers=workers,
        block_size=BLOCK,
        progress=lambda done, total: seen.append((done, total)),
    )

    nblocks = blocks_for(size, BLOCK)
    out = dest / src.name
    assert out.is_file()
    assert out.stat().st_size == size
    assert sha256_file(out) == want
    assert_dest_exactly(dest, {src.name})

    assert result.file == os.fspath(src)
    assert result.bytes == size
    assert result.block_size == BLOCK
    assert result.blocks_total == nblocks
    assert result.blocks_sent == nblocks
    assert result.blocks_resumed == 0
    assert result.retransmits == 0
    assert result.reconnects == 0
    assert result.workers == min(workers, max(1, nblocks))
    assert result.seconds > 0
    assert result.digest == expected_digest(src, BLOCK)

    # the receiver's own record of it (it may lag the sender's return by a moment)
    assert wait_for(lambda: len(receiver.completed) > before, timeout=10)
    got = receiver.completed[-1]
    assert got.name == src.name
    assert got.size == size
    assert got.digest == result.digest
    assert got.blocks_total == nblocks
    if nblocks:
        assert seen, "progress was never called"
        assert seen[-1] == (size, size)
        assert all(0 <= d <= t == size for d, t in seen)


@pytest.mark.timeout(60)
def test_receiver_is_ready_when_start_returns(shm_dir: Path, module_key: bytes) -> None:
    """ "listening" means the worker processes are up, imports done, not merely spawned: a
    sender that starts right away does not share the CPU with their start-up."""
    dest = shm_dir / "ready"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=module_key, host="127.0.0.1", port=0, workers=2) as r:
        procs = [psutil.Process(pid) for pid in r.snapshot().worker_pids]
        assert len(procs) == 2
        for proc in procs:
            assert proc.status() != psutil.STATUS_ZOMBIE, "a worker died at start"
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            assert "cryptography" in maps and "zmq" in maps, "worker still starting"


def test_default_workers_to_a_receiver_on_this_machine(
    receiver: stxpar.Receiver, dest: Path, scratch: Path, module_key: bytes
) -> None:
    """Not told how many workers, a sender whose receiver listens on a loopback address starts
    half as many as for a remote one: both sides share this machine's CPUs."""
    from stxpar.config import default_workers

    src = scratch / "default-workers.bin"
    want = write_random(src, 16 * BLOCK)
    result = stxpar.send(src, *receiver.address, psk=module_key, block_size=BLOCK)
    assert sha256_file(dest / src.name) == want
    assert result.workers == default_workers(peer_on_this_machine=True)
    assert result.workers < default_workers() or default_workers() == 8
    (dest / src.name).unlink()
