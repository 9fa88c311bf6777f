"""Rate limits (issue 15): the receiver's token bucket, the receiver's shares per worker, and
the sender scheduler's share per worker and batch cap. Pure: the clock is passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stxpar.blocks import BlockLedger, BlockSpace
from stxpar.messages import Blocks
from stxpar.pacing import SLICE, Pacer
from stxpar.recvpool import pace_shares
from stxpar.scheduler import Scheduler

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def test_no_rate_never_waits() -> None:
    b = Pacer()
    assert [b.charge(10 * MiB, t) for t in (0.0, 0.0, 0.001)] == [0.0, 0.0, 0.0]


@given(
    st.integers(1 * MiB, 500 * MiB),
    st.lists(st.integers(1, 4 * MiB), min_size=1, max_size=200),
)
def test_a_reader_that_sleeps_as_told_never_beats_the_rate(rate: int, reads: list[int]) -> None:
    """Reading back to back and sleeping exactly as told, the bytes taken in by any moment
    are at most rate x elapsed + the bucket's burst."""
    b = Pacer(rate)
    now, total = 100.0, 0
    burst = max(SLICE, rate * 0.05)
    for n in reads:
        now += b.charge(n, now)
        total += n
        # what has been read by ``now`` (the last read happens at ``now``)
        assert total <= rate * (now - 100.0) + burst + n + 1e-6 * rate
    # and it is not slower than the rate either: the waits add up to what the bytes need
    assert now - 100.0 <= total / rate + 1e-6


def test_credit_after_idling_is_capped() -> None:
    b = Pacer(10 * MiB)
    assert b.charge(SLICE, 0.0) > 0  # a fresh bucket has no credit
    # after 10 s idle, only the burst is there: 5 MiB read at once must wait for most of it
    assert b.charge(5 * MiB, 10.0) == pytest.approx((5 * MiB - 0.5 * MiB) / (10 * MiB), rel=0.01)


def test_rate_change_applies_to_the_next_charge() -> None:
    b = Pacer(1 * MiB)
    b.charge(1 * MiB, 0.0)
    b.set_rate(0)
    assert b.charge(100 * MiB, 0.0) == 0.0
    b.set_rate(2 * MiB)
    assert b.charge(2 * MiB, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("load", "want"),
    [
        ([0, 0], [100, 100]),  # nobody busy: whoever gets a stream starts at the whole rate
        ([1, 0], [100, 100]),
        ([1, 1], [50, 50]),
        ([3, 1], [75, 25]),
        ([2, 0, 2], [50, 25, 50]),
    ],
)
def test_receiver_shares_follow_the_open_streams(load: list[int], want: list[int]) -> None:
    shares = pace_shares(100, load)
    assert shares == want
    busy = sum(s for s, n in zip(shares, load, strict=True) if n)
    assert busy <= 100  # the workers with streams never add up to more than the limit


def _sched(blocks: int, bs: int = MiB, workers: int = 2, rate: int = 0) -> Scheduler:
    ledger = BlockLedger(BlockSpace([blocks * bs], block_size=bs))
    s = Scheduler(range(blocks), ledger)
    for w in range(workers):
        s.add_worker(w)
    s.rate = rate
    return s


def test_no_limit_no_pace() -> None:
    got = _sched(100).take(0)
    assert isinstance(got, Blocks) and got.pace == 0 and len(got.blocks) > 1


def test_each_busy_worker_gets_its_share_and_a_second_of_it_a_batch() -> None:
    s = _sched(1000, rate=4 * MiB, workers=2)
    a = s.take(0)
    assert isinstance(a, Blocks) and a.pace == 2 * MiB
    assert len(a.blocks) == 2  # PACED_BATCH_S (1 s) of 2 MiB/s in 1 MiB blocks
    # a worker that is done, or parked, does not count: the other takes the whole rate
    s.slots[1].done = True
    b = s.take(0)
    assert isinstance(b, Blocks) and b.pace == 4 * MiB and len(b.blocks) == 4


def test_a_slow_limit_still_hands_out_a_whole_block() -> None:
    s = _sched(10, rate=1000, workers=4)
    got = s.take(3)
    assert isinstance(got, Blocks) and got.pace == 250 and len(got.blocks) == 1
