"""The sender's scheduler, in memory: batches, parking, requeue of a lost worker, completion."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from stxpar.blocks import BlockLedger, BlockSpace
from stxpar.messages import Blocks, Done
from stxpar.scheduler import MAX_BATCH, Scheduler

BS = 1024


def _sched(total: int, workers: int = 2, held: tuple[int, ...] = ()) -> Scheduler:
    ledger = BlockLedger(BlockSpace([total * BS], block_size=BS))
    for b in held:
        ledger.record(b, bytes(16))
    s = Scheduler(ledger.missing(), ledger)
    for slot in range(workers):
        s.add_worker(slot)
    return s


def _d(b: int) -> bytes:
    return b.to_bytes(16, "big")


def test_batch_size_follows_the_queue_and_the_live_workers() -> None:
    s = _sched(100, workers=2)
    first = s.take(0)
    assert isinstance(first, Blocks)
    assert first.blocks == tuple(range(16))  # min(16, 100 // 4)
    s2 = _sched(12, workers=2)
    got = s2.take(0)
    assert isinstance(got, Blocks) and got.blocks == (0, 1, 2)  # 12 // 4
    s3 = _sched(1, workers=4)
    got = s3.take(3)
    assert isinstance(got, Blocks) and got.blocks == (0,)


def test_parked_until_blocks_come_back_then_done() -> None:
    s = _sched(2, workers=2)
    a = s.take(0)
    assert isinstance(a, Blocks) and a.blocks == (0,)
    b = s.take(1)
    assert isinstance(b, Blocks) and b.blocks == (1,)
    assert s.take(0) is None and s.parked == [0]
    assert s.take(0) is None and s.parked == [0]  # parked once
    assert s.wake() == []  # nothing queued
    assert s.retire(1) == [1]
    assert s.queue[0] == 1
    assert s.wake() == [0]
    c = s.take(0)
    assert isinstance(c, Blocks) and c.blocks == (1,)
    assert s.acked(0, [(0, _d(0)), (1, _d(1))]) == 2
    assert s.complete
    assert isinstance(s.take(0), Done) and s.is_done(0)
    assert isinstance(s.take(1), Done)  # retired


def test_requeue_goes_to_the_front_in_order() -> None:
    s = _sched(64, workers=1)
    got = s.take(0)
    assert isinstance(got, Blocks)
    s.acked(0, [(got.blocks[1], _d(1))])
    s.add_worker(1)
    back = s.retire(0)
    assert back == [b for b in got.blocks if b != got.blocks[1]]
    assert list(s.queue)[: len(back)] == back


def test_acked_without_digest_is_not_complete_and_out_of_range_is_ignored() -> None:
    s = _sched(4, workers=1)
    s.take(0)
    assert s.acked(0, [(0, b""), (99, _d(1)), (-1, _d(1))]) == 0
    assert not s.ledger.has(0)
    assert s.acked(0, [(0, _d(0)), (0, _d(0))]) == 1  # twice: counted once


def test_resume_needs_only_the_missing_blocks() -> None:
    s = _sched(8, workers=1, held=(0, 1, 5))
    assert list(s.queue) == [2, 3, 4, 6, 7]


def test_sent_counts() -> None:
    s = _sched(4, workers=2)
    s.count_sent(0, 3)
    s.count_sent(0, 2)  # older report: ignored
    s.count_sent(1, 1, last=True)
    s.count_sent(7, 5)  # unknown worker
    assert s.blocks_sent == 4 and s.said_last(1) and not s.said_last(0)


def test_release_parked() -> None:
    s = _sched(1, workers=2)
    s.take(0)
    assert s.take(1) is None
    s.acked(0, [(0, _d(0))])
    assert s.release_parked() == [1] and s.is_done(1)


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(1, 200),
    workers=st.integers(1, 6),
    ops=st.lists(st.tuples(st.sampled_from("tarw"), st.integers(0, 7)), max_size=200),
)
def test_every_block_is_sent_or_queued_exactly_once(
    total: int, workers: int, ops: list[tuple[str, int]]
) -> None:
    """Whatever happens, a needed block not complete is queued or assigned to one live
    worker, never both, never twice; and the run always completes when workers keep asking."""
    s = _sched(total, workers=workers)
    nxt = workers
    for op, k in ops:
        slot = k % nxt
        if op == "t":
            s.take(slot)
        elif op == "a":
            held = s.slots.get(slot)
            if held and held.assigned:
                b = min(held.assigned)
                s.acked(slot, [(b, os.urandom(16))])
        elif op == "r" and s.is_live(slot) and len(s.live) > 1:
            s.retire(slot)
        elif op == "w":
            s.wake()
        if op == "r" and not s.live:
            s.add_worker(nxt)
            nxt += 1
        outstanding = [b for sl in s.live for b in s.slots[sl].assigned]
        everywhere = list(s.queue) + outstanding
        missing = [b for b in range(total) if not s.ledger.has(b)]
        assert sorted(everywhere) == missing
    # drain: one live worker finishes everything
    slot = min(s.live)
    for _ in range(total * 2 + 2):
        answer = s.take(slot)
        if isinstance(answer, Done):
            break
        if isinstance(answer, Blocks):
            s.acked(slot, [(b, _d(b)) for b in answer.blocks])
        else:
            for other in list(s.live):
                for b in sorted(s.slots[other].assigned):
                    s.acked(other, [(b, _d(b))])
    assert s.complete
    assert isinstance(s.take(slot), Done)


def test_batches_never_exceed_the_maximum() -> None:
    s = _sched(10_000, workers=1)
    got = s.take(0)
    assert isinstance(got, Blocks) and len(got.blocks) == MAX_BATCH
