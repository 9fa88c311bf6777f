"""The block space and the block ledger."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stxpar.blocks import PACK_DIVISOR, PACK_MAX_FILES, BlockLedger, BlockSpace, Entry
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


# ---------------------------------------------------------------- packed small files


@st.composite
def _mixed(draw: st.DrawFn) -> tuple[int, ...]:
    """One entry's extents: often a small whole file, sometimes nothing, a big or a sparse file."""
    kind = draw(st.sampled_from(["small", "small", "small", "none", "big", "sparse"]))
    if kind == "small":
        return (0, draw(st.integers(1, 12)))
    if kind == "big":
        return (0, draw(st.integers(13, 300)))
    if kind == "sparse":
        return draw(_extents())
    return ()


@given(st.lists(_mixed(), max_size=40), st.sampled_from([8, 16, 64, 100]))
def test_packed_blocks_cover_every_byte_once(per_entry: list[tuple[int, ...]], bs: int) -> None:
    space = BlockSpace.of_extents(per_entry, block_size=bs, pack=True)
    small = bs // PACK_DIVISOR
    covered: dict[int, list[tuple[int, int]]] = {}
    for b in range(space.total):
        ref = space.locate(b)
        assert 0 < ref.length <= bs and 1 <= ref.count <= PACK_MAX_FILES
        assert space.block_entries(b) == range(ref.entry, ref.entry + ref.count)
        members = space.members(ref)
        assert [m[0] for m in members] == list(space.block_entries(b))
        if ref.count > 1:
            assert ref.offset == 0
            at = 0
            for entry, offset, length in members:
                # only whole small files, back to back, each with this one block
                assert per_entry[entry] == (0, length) and length <= small
                assert offset == at
                at += length
                assert space.entry_blocks(entry) == range(b, b + 1)
                covered.setdefault(entry, []).append((0, length))
            assert at == ref.length
        else:
            assert members == [(ref.entry, 0, ref.length)]
            assert b in space.entry_blocks(ref.entry)
            covered.setdefault(ref.entry, []).append((ref.offset, ref.length))
    for e, extents in enumerate(per_entry):
        want = [
            (off + i, min(bs, n - i))
            for off, n in zip(extents[::2], extents[1::2], strict=True)
            for i in range(0, n, bs)
        ]
        assert covered.get(e, []) == want
    # packing only merges: never more blocks than without it
    assert space.total <= BlockSpace.of_extents(per_entry, block_size=bs).total


def test_packs_fill_blocks_and_break_at_other_entries() -> None:
    # block 64: files up to 8 bytes pack; a directory (no data) or a big file ends a pack
    per_entry = [(0, 8)] * 9 + [()] + [(0, 5), (0, 5)] + [(0, 9)] + [(0, 1)]
    space = BlockSpace.of_extents(per_entry, block_size=64, pack=True)
    refs = [space.locate(b) for b in range(space.total)]
    assert [(r.entry, r.count, r.length) for r in refs] == [
        (0, 8, 64),  # eight 8-byte files fill a block
        (8, 1, 8),  # the ninth starts the next one, closed by the directory
        (10, 2, 10),
        (12, 1, 9),  # 9 > 64 // 8: not packed
        (13, 1, 1),
    ]


def test_a_pack_holds_at_most_pack_max_files() -> None:
    n = 2 * PACK_MAX_FILES + 5
    space = BlockSpace.of_extents([(0, 1)] * n, block_size=1 << 20, pack=True)
    assert [space.locate(b).count for b in range(space.total)] == [
        PACK_MAX_FILES,
        PACK_MAX_FILES,
        5,
    ]


def test_a_recorded_pack_completes_each_of_its_files() -> None:
    space = BlockSpace.of_extents([(0, 3), (0, 4), (0, 100), (0, 5)], block_size=64, pack=True)
    assert space.total == 4  # (0, 1) packed, then 100 bytes in 2 blocks, then a lone file
    ledger = BlockLedger(space)
    assert ledger.record(0, b"p" * 16)
    assert ledger.entries_complete == 2 and ledger.bytes == 7
    assert not ledger.record(0, b"p" * 16)
    assert ledger.entries_complete == 2
    ledger.record(1, b"a" * 16)
    assert ledger.entries_complete == 2
    ledger.record(2, b"b" * 16)
    ledger.record(3, b"c" * 16)
    assert ledger.entries_complete == 4 and ledger.complete
