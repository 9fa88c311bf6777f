"""The block space and the block ledger."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stxpar.blocks import BlockLedger, BlockSpace, Entry
from stxpar.digest import file_digest
from stxpar.wire import MetadataAck, bitmap

pytestmark = pytest.mark.timeout(60)


def test_one_entry_is_the_files_blocks() -> None:
    space = BlockSpace.of([Entry("f", 10, 0, b"i" * 16)], block_size=4)
    assert space.total == 3
    assert [space.locate(b).offset for b in range(3)] == [0, 4, 8]
    assert [space.length(b) for b in range(3)] == [4, 4, 2]
    with pytest.raises(IndexError):
        space.locate(3)


@given(st.lists(st.integers(0, 50), max_size=8), st.integers(1, 16))
def test_many_entries_tile_the_space(sizes: list[int], bs: int) -> None:
    space = BlockSpace(sizes, block_size=bs)
    seen: dict[int, int] = {}
    for b in range(space.total):
        ref = space.locate(b)
        assert b in space.entry_blocks(ref.entry)
        assert ref.offset == seen.get(ref.entry, 0)
        seen[ref.entry] = ref.offset + ref.length
        assert 0 < ref.length <= bs
    assert [seen.get(i, 0) for i in range(len(sizes))] == sizes


def test_ledger_records_and_reports() -> None:
    space = BlockSpace([10], block_size=4)
    ledger = BlockLedger(space)
    assert ledger.record(2, b"c" * 16) and not ledger.record(2, b"C" * 16)
    assert ledger.record(0, b"a" * 16)
    assert (ledger.count, ledger.bytes, ledger.missing()) == (2, 6, [1])
    assert ledger.digest(2) == b"C" * 16  # the last report wins
    ack = MetadataAck(have=ledger.bitmap(), digests=ledger.held_digests())
    assert ack.held(3) == [0, 2] and ack.digests == b"a" * 16 + b"C" * 16
    assert ledger.bitmap() == bitmap(bytes([1, 0, 1]))
    with pytest.raises(ValueError):
        ledger.record(3, b"x" * 16)
    with pytest.raises(ValueError):
        ledger.record(1, b"short")
    ledger.record(1, b"b" * 16)
    assert ledger.complete and ledger.bytes == 10
    want = file_digest(block_digests=b"a" * 16 + b"b" * 16 + b"C" * 16, block_size=4, size=10)
    assert ledger.whole_digest(size=10) == want
    again = BlockLedger.of(space, ledger.held_pairs())
    assert again.all_digests() == ledger.all_digests()
    ledger.clear()
    assert (ledger.count, ledger.bytes, list(ledger.held())) == (0, 0, [])


# ---------------------------------------------------------------- BlockSpace.of_extents (stx3)


@st.composite
def _extents(draw: st.DrawFn) -> tuple[int, ...]:
    """Sorted, disjoint (possibly adjacent) extents of one file."""
    out: list[int] = []
    end = 0
    for _ in range(draw(st.integers(0, 5))):
        offset = end + draw(st.integers(0, 20))
        length = draw(st.integers(1, 30))
        out += [offset, length]
        end = offset + length
    return tuple(out)


@given(st.lists(_extents(), max_size=8), st.integers(1, 16))
def test_extents_tile_the_space(per_entry: list[tuple[int, ...]], bs: int) -> None:
    space = BlockSpace.of_extents(per_entry, block_size=bs)
    covered: dict[int, list[tuple[int, int]]] = {}
    for b in range(space.total):
        ref = space.locate(b)
        assert b in space.entry_blocks(ref.entry)
        assert 0 < ref.length <= bs
        covered.setdefault(ref.entry, []).append((ref.offset, ref.length))
    for e, extents in enumerate(per_entry):
        blocks = covered.get(e, [])
        assert len(blocks) == len(space.entry_blocks(e))
        # the blocks, in order, are each extent cut at block_size, never spanning two extents
        want = [
            (off + i, min(bs, n - i))
            for off, n in zip(extents[::2], extents[1::2], strict=True)
            for i in range(0, n, bs)
        ]
        assert blocks == want
    assert space.entries == len(per_entry)
    with pytest.raises(IndexError):
        space.locate(space.total)


@given(st.lists(st.integers(0, 50), max_size=8), st.integers(1, 16))
def test_one_extent_per_entry_is_the_old_space(sizes: list[int], bs: int) -> None:
    old = BlockSpace(sizes, block_size=bs)
    new = BlockSpace.of_extents([(0, s) if s else () for s in sizes], block_size=bs)
    assert old.total == new.total
    assert [old.entry_blocks(e) for e in range(len(sizes))] == [
        new.entry_blocks(e) for e in range(len(sizes))
    ]
    assert [old.locate(b) for b in range(old.total)] == [new.locate(b) for b in range(new.total)]


def test_a_sparse_file_locates_at_its_file_offsets() -> None:
    space = BlockSpace.of_extents([(), (100, 10, 1000, 9), (), (0, 4)], block_size=4)
    assert space.entry_blocks(0) == range(0, 0) and space.entry_blocks(2) == range(5, 5)
    refs = [(r.entry, r.offset, r.length) for r in map(space.locate, range(space.total))]
    assert refs == [(1, 100, 4), (1, 104, 4), (1, 108, 2), (1, 1000, 4), (1, 1004, 4)] + [
        (1, 1008, 1),
        (3, 0, 4),
    ]
    ledger = BlockLedger(space)
    ledger.record(2, b"d" * 16)
    ledger.record(5, b"e" * 16)
    assert ledger.bytes == 3


@pytest.mark.parametrize(
    "extents", [(0,), (0, 0), (5, 1, 0, 1), (0, 5, 4, 1), (-1, 2), (0, -3)], ids=repr
)
def test_bad_extents_are_a_value_error(extents: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        BlockSpace.of_extents([extents], block_size=4)


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BlockSpace.of_extents([(0, 1)], block_size=0)
    with pytest.raises(ValueError):
        BlockSpace([1], block_size=0)


def test_a_million_entries_stay_small() -> None:
    import time
    import tracemalloc

    per_entry = [(0, 1000) if i % 3 else () for i in range(1_000_000)]
    start = time.perf_counter()
    space = BlockSpace.of_extents(per_entry, block_size=512)
    assert time.perf_counter() - start < 3
    tracemalloc.start()
    try:
        space = BlockSpace.of_extents(per_entry, block_size=512)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a few array columns, not an object per block or per entry (~40 MB of Python objects)
    assert size < 40 << 20, size
    assert space.total == 2 * 666_666
    last = space.locate(space.total - 1)
    assert (last.entry, last.offset, last.length) == (999_998, 512, 488)
    assert space.entry_blocks(999_998) == range(space.total - 2, space.total)
    assert len(space.entry_blocks(999_999)) == 0
