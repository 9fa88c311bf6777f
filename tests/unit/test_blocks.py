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
