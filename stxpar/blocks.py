"""The data model of a transfer: its entries, the block space over them, and the block ledger.

Theory of operation
-------------------
A transfer moves a list of entries (``Entry``: one regular file today; a directory tree
later).
The ``BlockSpace`` numbers every block of every entry in one space: block ``b`` is located as
(entry, offset, length), so the queue, the workers, the resume bitmap and the state log all
speak of blocks and never of files. With one entry, block ``b`` is the file's block ``b`` at
offset ``b * block_size``. A tree's space (``BlockSpace.of_extents``, from ``manifest.Manifest``)
covers only the data extents of its files: holes of a sparse file, directories and symlinks
have no blocks.

The ``BlockLedger`` is the one record of which blocks a side holds and their digests: the
receiver's durable blocks (from its state log, its workers' reports), the sender's completed
blocks (acknowledged as durable, digest known). The whole-file digest is computed from it
(``digest.file_digest``); the resume bitmap and digests of METADATA_ACK are read from it.

Pure: no I/O here.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .digest import BLOCK_DIGEST_LEN, file_digest
from .wire import bitmap, blocks_for


@dataclass(frozen=True)
class Entry:
    """One file of a transfer, as its sender describes it."""

    name: str
    size: int
    mtime_ns: int
    file_id: bytes


@dataclass(frozen=True)
class BlockRef:
    """Where block ``block`` of the space lies: ``length`` bytes at ``offset`` of entry ``entry``."""

    block: int
    entry: int
    offset: int
    length: int


class BlockSpace:
    """Every block of a manifest's entries, numbered from 0 in entry order.

    Each entry's data is a list of extents (file offset, length); each extent is cut into
    blocks of ``block_size`` (a block never spans two extents, so the last block of an extent
    may be short). Stored as ``array`` columns, one row per extent and one per entry, so a
    million entries cost tens of megabytes, not a Python object per block."""

    def __init__(self, sizes: Iterable[int], *, block_size: int) -> None:
        """One extent ``(0, size)`` per entry (none for an empty entry)."""
        self._build(((0, size) if size else () for size in sizes), block_size)

    @classmethod
    def of(cls, entries: Iterable[Entry], *, block_size: int) -> BlockSpace:
        return cls((e.size for e in entries), block_size=block_size)

    @classmethod
    def of_extents(
        cls, extents_per_entry: Iterable[Sequence[int]], *, block_size: int
    ) -> BlockSpace:
        """Blocks over each entry's flat extents ``(offset, length, offset, length, ...)``
        (sorted, non-overlapping, each length > 0; ``()`` for an entry without data)."""
        space = cls.__new__(cls)
        space._build(extents_per_entry, block_size)
        return space

    def _build(self, extents_per_entry: Iterable[Sequence[int]], block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        #: first block of each entry, and the total at the end
        self._starts = array("q", [0])
        #: per extent: its first block, its file offset, and the file offset where it ends
        self._seg_block = array("q")
        self._seg_offset = array("q")
        self._seg_end = array("q")
        block = 0
        for extents in extents_per_entry:
            if len(extents) % 2:
                raise ValueError("extents come in (offset, length) pairs")
            end = 0
            for i in range(0, len(extents), 2):
                offset, length = extents[i], extents[i + 1]
                if offset < end or length <= 0:
                    raise ValueError("extents must be sorted, disjoint and non-empty")
                end = offset + length
                self._seg_block.append(block)
                self._seg_offset.append(offset)
                self._seg_end.append(end)
                block += blocks_for(length, block_size)
            self._starts.append(block)

    @property
    def total(self) -> int:
        return self._starts[-1]

    @property
    def entries(self) -> int:
        return len(self._starts) - 1

    def entry_blocks(self, entry: int) -> range:
        return range(self._starts[entry], self._starts[entry + 1])

    def locate(self, block: int) -> BlockRef:
        """Where block ``block`` lies; ``offset`` is the offset in the entry's file."""
        if not 0 <= block < self.total:
            raise IndexError(f"block {block} outside 0..{self.total - 1}")
        entry = bisect.bisect_right(self._starts, block) - 1
        seg = bisect.bisect_right(self._seg_block, block) - 1
        offset = self._seg_offset[seg] + (block - self._seg_block[seg]) * self.block_size
        return BlockRef(block, entry, offset, min(self.block_size, self._seg_end[seg] - offset))

    def length(self, block: int) -> int:
        return self.locate(block).length


class BlockLedger:
    """Which blocks of a space are held, and each one's digest (16 bytes, XXH3-128).

    A block is *held* once it is recorded with its digest; recording it again replaces the
    digest (the last report wins, as the state log's replay does)."""

    def __init__(self, space: BlockSpace) -> None:
        self.space = space
        self._have = bytearray(space.total)
        self._digests = bytearray(space.total * BLOCK_DIGEST_LEN)
        self.count = 0
        self.bytes = 0
        #: blocks held per entry, and the entries (with data) whose every block is held
        self._entry_held = array("q", bytes(8 * space.entries))
        self.entries_complete = 0

    @classmethod
    def of(cls, space: BlockSpace, held: Iterable[tuple[int, bytes]]) -> BlockLedger:
        ledger = cls(space)
        for block, digest in held:
            ledger.record(block, digest)
        return ledger

    @property
    def total(self) -> int:
        return len(self._have)

    @property
    def complete(self) -> bool:
        return self.count == self.total

    def has(self, block: int) -> bool:
        return bool(self._have[block])

    def digest(self, block: int) -> bytes:
        return bytes(self._digests[block * BLOCK_DIGEST_LEN : (block + 1) * BLOCK_DIGEST_LEN])

    def record(self, block: int, digest: bytes) -> bool:
        """Hold ``block`` with ``digest``; True if it was not held before. ValueError for a
        block outside the space or a digest of the wrong length."""
        if not 0 <= block < self.total or len(digest) != BLOCK_DIGEST_LEN:
            raise ValueError("no such block, or a digest of the wrong length")
        self._digests[block * BLOCK_DIGEST_LEN : (block + 1) * BLOCK_DIGEST_LEN] = digest
        if self._have[block]:
            return False
        self._have[block] = 1
        self.count += 1
        where = self.space.locate(block)
        self.bytes += where.length
        held = self._entry_held[where.entry] = self._entry_held[where.entry] + 1
        if held == len(self.space.entry_blocks(where.entry)):
            self.entries_complete += 1
        return True

    def copy(self) -> BlockLedger:
        """An independent ledger holding the same blocks and digests."""
        other = BlockLedger(self.space)
        other._have[:] = self._have
        other._digests[:] = self._digests
        other.count, other.bytes = self.count, self.bytes
        other._entry_held[:] = self._entry_held
        other.entries_complete = self.entries_complete
        return other

    def clear(self) -> None:
        """Hold nothing (the digests are forgotten too)."""
        self._have[:] = bytes(self.total)
        self._digests[:] = bytes(len(self._digests))
        self.count = self.bytes = 0
        self._entry_held = array("q", bytes(8 * self.space.entries))
        self.entries_complete = 0

    def held(self) -> Iterator[int]:
        return (i for i, v in enumerate(self._have) if v)

    def missing(self) -> list[int]:
        return [i for i, v in enumerate(self._have) if not v]

    def held_pairs(self) -> list[tuple[int, bytes]]:
        return [(i, self.digest(i)) for i in self.held()]

    def bitmap(self) -> bytes:
        """The held blocks as METADATA_ACK's bitmap (least significant bit first)."""
        return bitmap(self._have)

    def held_digests(self) -> bytes:
        """The digests of the held blocks, in block order (METADATA_ACK's ``digests``)."""
        return b"".join(
            self._digests[i * BLOCK_DIGEST_LEN : (i + 1) * BLOCK_DIGEST_LEN] for i in self.held()
        )

    def all_digests(self) -> bytes:
        return bytes(self._digests)

    def whole_digest(self, *, size: int) -> bytes:
        """The whole-file digest over every block's digest (``digest.file_digest``)."""
        return file_digest(block_digests=self._digests, block_size=self.space.block_size, size=size)
