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

Small files are packed (``of_extents(..., pack=True)``, what a manifest's space uses): a run of
consecutive entries that are each one whole small file (one extent ``(0, size)``, ``size <=
block_size // PACK_DIVISOR``) shares blocks, up to ``block_size`` bytes and ``PACK_MAX_FILES``
files a block, their contents back to back in entry order. Such a block's ``BlockRef`` names
its first entry, offset 0 and ``count`` entries (``members`` lists them); each member's
``entry_blocks`` is that one block. An entry without data (a directory, a symlink, an empty
file) or any other file ends a run, so packs never reach across a subdirectory and a change in
one directory moves no other directory's packs. Both sides compute the same space from the
manifest, so a pack needs no description on the wire, and its AEAD associated data (first
entry, offset 0, length, manifest id) binds every member.

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


#: A file of at most ``block_size // PACK_DIVISOR`` bytes, all data, is packed with its
#: neighbours (``BlockSpace.of_extents(..., pack=True)``).
PACK_DIVISOR = 8
#: At most this many files share one block.
PACK_MAX_FILES = 1024


@dataclass(frozen=True)
class BlockRef:
    """Where block ``block`` of the space lies: ``length`` bytes at ``offset`` of entry ``entry``;
    a packed block (``count`` > 1) holds entries ``entry .. entry + count - 1``, each whole, back
    to back from ``offset`` 0 (``BlockSpace.members``)."""

    block: int
    entry: int
    offset: int
    length: int
    count: int = 1


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
        cls, extents_per_entry: Iterable[Sequence[int]], *, block_size: int, pack: bool = False
    ) -> BlockSpace:
        """Blocks over each entry's flat extents ``(offset, length, offset, length, ...)``
        (sorted, non-overlapping, each length > 0; ``()`` for an entry without data); with
        ``pack``, small whole files share blocks (see the module docstring)."""
        space = cls.__new__(cls)
        space._build(extents_per_entry, block_size, pack=pack)
        return space

    def _build(
        self, extents_per_entry: Iterable[Sequence[int]], block_size: int, *, pack: bool = False
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        small = block_size // PACK_DIVISOR if pack else 0
        #: first block of each entry, and the total at the end (a pack member's is its pack's)
        self._starts = array("q", [0])
        #: per segment (an extent, or a pack): its first block, its first entry, its file
        #: offset (0 for a pack), where it ends (a pack: its length), its entries (1 but a pack)
        self._seg_block = array("q")
        self._seg_entry = array("q")
        self._seg_offset = array("q")
        self._seg_end = array("q")
        self._seg_count = array("i")
        #: per entry: its size if it may be a pack member (a small whole file), else 0
        self._packed = array("i")
        block = 0
        run = 0  # bytes of the open pack (its segment is the last one), 0: none open
        for entry, extents in enumerate(extents_per_entry):
            if len(extents) % 2:
                raise ValueError("extents come in (offset, length) pairs")
            if len(extents) == 2 and extents[0] == 0 and 0 < extents[1] <= small:
                size = extents[1]
                if run and run + size <= block_size and self._seg_count[-1] < PACK_MAX_FILES:
                    run += size
                    self._seg_end[-1] = run
                    self._seg_count[-1] += 1
                else:
                    run = size
                    self._segment(block, entry, 0, size, 1)
                    block += 1
                self._packed.append(size)
                self._starts.append(block)
                continue
            run = 0
            self._packed.append(0)
            end = 0
            for i in range(0, len(extents), 2):
                offset, length = extents[i], extents[i + 1]
                if offset < end or length <= 0:
                    raise ValueError("extents must be sorted, disjoint and non-empty")
                end = offset + length
                self._segment(block, entry, offset, end, 1)
                block += blocks_for(length, block_size)
            self._starts.append(block)

    def _segment(self, block: int, entry: int, offset: int, end: int, count: int) -> None:
        self._seg_block.append(block)
        self._seg_entry.append(entry)
        self._seg_offset.append(offset)
        self._seg_end.append(end)
        self._seg_count.append(count)

    @property
    def total(self) -> int:
        return self._starts[-1]

    @property
    def entries(self) -> int:
        return len(self._starts) - 1

    def packed(self, entry: int) -> bool:
        """Whether entry ``entry`` is a small whole file that may share a block (a pack
        member, written whole by one write)."""
        return bool(self._packed[entry])

    def entry_blocks(self, entry: int) -> range:
        stop = self._starts[entry + 1]
        if self._packed[entry]:  # its pack's block, the last one begun before it ended
            return range(stop - 1, stop)
        return range(self._starts[entry], stop)

    def locate(self, block: int) -> BlockRef:
        """Where block ``block`` lies; ``offset`` is the offset in the entry's file."""
        if not 0 <= block < self.total:
            raise IndexError(f"block {block} outside 0..{self.total - 1}")
        seg = bisect.bisect_right(self._seg_block, block) - 1
        count = self._seg_count[seg]
        if count > 1:
            return BlockRef(block, self._seg_entry[seg], 0, self._seg_end[seg], count)
        offset = self._seg_offset[seg] + (block - self._seg_block[seg]) * self.block_size
        return BlockRef(
            block, self._seg_entry[seg], offset, min(self.block_size, self._seg_end[seg] - offset)
        )

    def block_entries(self, block: int) -> range:
        """The entries block ``block`` holds data of (several for a pack)."""
        ref = self.locate(block)
        return range(ref.entry, ref.entry + ref.count)

    def members(self, ref: BlockRef) -> list[tuple[int, int, int]]:
        """``(entry, offset in the block, length)`` of each entry in block ``ref``: each member
        of a pack, whole; otherwise ``ref``'s one entry."""
        if ref.count == 1:
            return [(ref.entry, 0, ref.length)]
        out = []
        at = 0
        packed = self._packed
        for entry in range(ref.entry, ref.entry + ref.count):
            size = packed[entry]
            out.append((entry, at, size))
            at += size
        return out

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
        if where.count > 1:  # a pack: its one block is each member's every block
            self.entries_complete += where.count
            return True
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
