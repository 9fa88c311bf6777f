"""The receiver worker pool's pure parts (placement, liveness, report routing, jobs), without
processes or sockets."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from hypothesis import given
from hypothesis import strategies as st
from transfers import one_file

from stxpar import messages
from stxpar.messages import Beat, Landed, StreamClosed, StreamFailed, StreamJob
from stxpar.placement import (
    WORKER_START_S,
    Liveness,
    Placement,
    ReportRouter,
    is_liveness,
    stream_job,
)
from stxpar.transfer import Transfer

SID = bytes(range(16))


class FakePool:
    def __init__(self) -> None:
        self.released_streams: list[tuple[bytes, int]] = []

    def released(self, session_id: bytes, stream: int) -> None:
        self.released_streams.append((session_id, stream))


def _router() -> tuple[ReportRouter, FakePool, list[Landed | StreamFailed]]:
    pool = FakePool()
    got: list[Landed | StreamFailed] = []
    return ReportRouter(pool.released, got.append), pool, got


def test_landed_goes_to_the_session_and_keeps_the_stream() -> None:
    router, pool, got = _router()
    msg = Landed(SID, 3, ((0, b"\x01" * 16), (7, b"\x02" * 16)))
    router.handle(messages.encode(msg))
    assert got == [msg]
    assert pool.released_streams == []


def test_a_failed_stream_is_released_and_reported() -> None:
    router, pool, got = _router()
    msg = StreamFailed(SID, 2, 3, "block 5 failed authentication")
    router.handle(messages.encode(msg))
    assert got == [msg]
    assert pool.released_streams == [(SID, 2)]


def test_a_closed_stream_is_released_only() -> None:
    router, pool, got = _router()
    router.handle(messages.encode(StreamClosed(SID, 1)))
    assert got == []
    assert pool.released_streams == [(SID, 1)]


def test_what_is_no_report_is_counted_and_dropped() -> None:
    router, pool, got = _router()
    for data in (
        b"",
        b"\xc1",  # never valid msgpack
        messages.encode(Beat()),  # a liveness message, on the wrong channel
        msgpack.packb(["blocks", SID, [[0, b"x" * 16]]]),  # the old positional format
        msgpack.packb([messages.VERSION + 1, "landed", SID, 0, []]),
        msgpack.packb([messages.VERSION, "landed", SID, "0", []]),
    ):
        router.handle(data)
    assert router.garbage == 6
    assert got == [] and pool.released_streams == []


@given(st.binary(max_size=256))
def test_garbage_never_raises(data: bytes) -> None:
    router, _, _ = _router()
    router.handle(data)


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.binary(max_size=40),
            st.text(max_size=20),
            st.lists(st.integers(0, 10), max_size=3),
        ),
        max_size=6,
    )
)
def test_wrong_fields_never_raise(fields: list[object]) -> None:
    router, _, got = _router()
    for tag in ("landed", "failed", "closed"):
        router.handle(msgpack.packb([messages.VERSION, tag, *fields], use_bin_type=True))
    assert all(isinstance(m, Landed | StreamFailed) for m in got)


def test_liveness_quiet_and_stuck() -> None:
    live = Liveness(2, stuck_after=5.0, now=100.0)
    assert live.quiet_after == 1.5
    # starting workers are neither quiet nor stuck
    assert not live.quiet(0, 100.0 + WORKER_START_S - 1)
    assert live.silence(0, 100.0 + WORKER_START_S + 4) is None
    live.hear(0, 200.0)
    live.hear(1, 200.0)
    assert not live.quiet(0, 201.0)
    assert live.quiet(0, 202.0)
    assert live.silence(0, 204.0) is None
    assert live.silence(0, 206.0) == 6.0
    # hearing never moves the time back
    live.hear(1, 150.0)
    assert live.heard[1] == 200.0


def test_liveness_forgives_a_coordinator_that_did_not_run() -> None:
    live = Liveness(1, stuck_after=5.0, now=0.0)
    live.hear(0, 10.0)
    live.checking(10.5)
    # the coordinator itself was stopped for a minute: nobody counts as silent for it
    live.checking(70.0)
    assert live.silence(0, 70.0) is None
    assert live.silence(0, 76.0) is not None


@dataclass(frozen=True)
class Target:
    session_id: bytes
    stream: int
    secret: bytes
    path: str
    md: Transfer
    inode: tuple[int, int] | None
    tree: bool = False
    layout: str = ""


def test_stream_job_from_a_target() -> None:
    md = one_file(
        "f.bin",
        10 << 20,
        block_size=4 << 20,
        file_id=b"\x07" * 16,
        mtime_ns=1,
        streams=4,
        rekey_records=1000,
        rekey_bytes=1 << 30,
    )
    target = Target(SID, 2, b"\x09" * 32, "/dest/.f.bin.stxpart", md, (5, 6), False, "/p/l0")
    job = stream_job(target, sync_bytes=1 << 20)
    assert job == StreamJob(
        session_id=SID,
        stream=2,
        secret=b"\x09" * 32,
        path="/dest/.f.bin.stxpart",
        tree=False,
        layout="/p/l0",
        manifest_id=md.manifest.id,
        rekey_records=1000,
        rekey_bytes=1 << 30,
        sync_bytes=1 << 20,
        streams=4,
        inode=(5, 6),
    )
    # it crosses the channel and comes back the same
    assert messages.decode(messages.encode(job), expect=messages.RECEIVER_JOBS) == job
    # a tree's: its staging directory, its layout
    tree = Target(SID, 3, b"\x09" * 32, "/dest/.D.stxtree", md, (7, 8), True, "/p/l1")
    job = stream_job(tree, sync_bytes=1 << 20)
    assert (job.path, job.tree, job.layout, job.inode) == (
        "/dest/.D.stxtree",
        True,
        "/p/l1",
        (7, 8),
    )
    assert messages.decode(messages.encode(job), expect=messages.RECEIVER_JOBS) == job


def test_liveness_messages() -> None:
    assert is_liveness(messages.encode(Beat()))
    assert is_liveness(messages.encode(messages.Ready()))
    assert not is_liveness(b"beat")  # the old bytes
    assert not is_liveness(messages.encode(StreamClosed(SID, 0)))


def test_placement_caps_and_order() -> None:
    place = Placement(3, max_streams=4, max_worker_streams=2)

    def healthy(k: int) -> tuple[bool, bool]:
        return False, False

    assert place.order(healthy) == [0, 1, 2]
    place.assign(0, SID, 0)
    place.assign(0, SID, 1)
    place.assign(1, SID, 2)
    # worker 0 is at its cap; the least loaded comes first
    assert place.order(healthy) == [2, 1]
    # an exited worker comes last, a quiet one after those heard from
    assert place.order(lambda k: (k == 2, False)) == [1, 2]
    assert place.order(lambda k: (False, k == 2)) == [1, 2]
    assert not place.full()
    place.assign(2, SID, 3)
    assert place.full() and place.open_streams() == 4
    place.release(SID, 0)
    place.release(SID, 0)  # twice: counted once
    assert place.load == [1, 1, 1] and not place.full()
    place.clear(1)
    assert place.load == [1, 0, 1] and (SID, 2) not in place.where
    place.release(SID, 2)  # a stream of a replaced worker: nothing left to give back
    assert place.load == [1, 0, 1]
