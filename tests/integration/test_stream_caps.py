"""Data streams are bounded: in number (over all sessions, and per worker) and in lifetime
(a completed session's streams do not outlive it).

The clients here hold the key and speak the protocol by hand (``tests/adversarial/attacker.py``):
an honest sender never keeps a silent stream open, but one that was paused or cut off without a
FIN does, and its stream thread, buffers and descriptors stayed in the receiver worker after the
session completed (keepalive cannot tell a live peer that says nothing from a busy one).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

_ADV = str(Path(__file__).resolve().parent.parent / "adversarial")
if _ADV not in sys.path:
    sys.path.insert(0, _ADV)

from attacker import (  # noqa: E402
    ErrorMsg,
    Session,
    close_all_peers,
    make_metadata,
    open_session,
)
from itest_support import wait_for  # noqa: E402

import stxpar  # noqa: E402
from stxpar.errors import ConnectError  # noqa: E402

BLOCK = 4096


@pytest.fixture(autouse=True)
def _close_peers() -> Iterator[None]:
    yield
    close_all_peers()


def _workers(r: stxpar.Receiver) -> list[psutil.Process]:
    """The receiver's worker processes (not any other process this test process started)."""
    return [psutil.Process(pid) for pid in r.snapshot().worker_pids]


def _settled_threads(procs: list[psutil.Process]) -> int:
    """Their thread count, once it held still for half a second (a worker that has just said
    "ready" may still be starting its heartbeat thread)."""
    last = -1
    for _ in range(40):
        now = sum(p.num_threads() for p in procs)
        if now == last:
            return now
        last = now
        time.sleep(0.5)
    raise AssertionError("the workers' thread count never settled")


def _session(r: stxpar.Receiver, psk: bytes, name: str, streams: int) -> tuple[Session, bytes]:
    data = os.urandom(3 * BLOCK + 100)
    md = make_metadata(name, len(data), block_size=BLOCK, streams=streams)
    return open_session(r.address, psk, md), data


def _refused_busy(stream: object) -> bool:
    msg = stream.read(timeout=5)  # type: ignore[attr-defined]
    return (
        isinstance(msg, ErrorMsg)
        and msg.code == ConnectError.wire_code
        and "receiver busy" in msg.message
    )


@pytest.mark.timeout(60)
def test_completed_session_cancels_its_silent_streams(scratch: Path, psk: bytes) -> None:
    dest = scratch / "dest"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=psk, workers=1) as r:
        (worker,) = _workers(r)
        base = _settled_threads([worker])
        s, data = _session(r, psk, "done.bin", streams=2)
        silent = s.stream(1)  # JOINs, then never sends a byte nor closes
        honest = s.stream(0)
        for seq in range(s.md.total_blocks):  # type: ignore[union-attr]
            honest.send_block(seq, data)
        honest.wait_durable(range(s.md.total_blocks))  # type: ignore[union-attr]
        assert wait_for(lambda: worker.num_threads() >= base + 2, timeout=10)
        honest.finish()
        s.send_end(data)
        assert s.receipt() is not None, s.peer.errors
        assert (dest / "done.bin").read_bytes() == data
        # the silent stream's thread ends and its connection is closed, soon
        assert wait_for(lambda: worker.num_threads() == base, timeout=15), (
            f"{worker.num_threads() - base} stream threads outlived the session"
        )
        assert silent.peer.closed_by_peer(wait=5)
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE


@pytest.mark.timeout(60)
def test_global_stream_cap(scratch: Path, psk: bytes) -> None:
    dest = scratch / "dest"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=psk, workers=2, max_streams=3) as r:
        workers = _workers(r)
        base = _settled_threads(workers)
        a, _ = _session(r, psk, "a.bin", streams=2)
        b, _ = _session(r, psk, "b.bin", streams=2)
        held = [a.stream(0), a.stream(1), b.stream(0)]
        assert wait_for(lambda: r.snapshot().streams_open == 3, timeout=10)
        # a fourth stream, of either session, is refused as busy (the sender retries it)
        extra = b.stream(1)
        assert _refused_busy(extra)
        assert extra.peer.closed_by_peer(wait=5)
        threads = lambda: sum(p.num_threads() for p in workers)  # noqa: E731
        assert wait_for(lambda: threads() == base + 3, timeout=5), (threads(), base)
        # once one is gone, a new one is taken
        held.pop().close()
        assert wait_for(lambda: r.snapshot().streams_open == 2, timeout=10)
        again = b.stream(2)
        assert wait_for(lambda: r.snapshot().streams_open == 3, timeout=10)
        assert not again.peer.closed_by_peer(wait=0.5)


@pytest.mark.timeout(60)
def test_per_worker_stream_cap(scratch: Path, psk: bytes) -> None:
    dest = scratch / "dest"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=psk, workers=1, max_worker_streams=2) as r:
        s, _ = _session(r, psk, "w.bin", streams=4)
        held = [s.stream(0), s.stream(1)]
        assert wait_for(lambda: r.snapshot().streams_open == 2, timeout=10)
        assert _refused_busy(s.stream(2))
        assert len(held) == 2


@pytest.mark.timeout(60)
def test_honest_transfer_within_the_caps(scratch: Path, psk: bytes) -> None:
    dest = scratch / "dest"
    dest.mkdir()
    src = scratch / "src.bin"
    data = os.urandom(40 * BLOCK + 5)
    src.write_bytes(data)
    with stxpar.Receiver(dest, psk=psk, workers=2, max_streams=4, max_worker_streams=2) as r:
        result = stxpar.send(src, *r.address, psk=psk, workers=4, block_size=BLOCK)
        assert result.bytes == len(data)
    assert (dest / "src.bin").read_bytes() == data
