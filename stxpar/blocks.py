"""The data model of a transfer: its entries, the block space over them, and the block ledger.

Theory of operation
-------------------
A transfer moves a list of entries (``Entry``: one regular file today; a directory tree
later).
The ``BlockSpace`` numbers every block of every entry in one space: block ``b`` is located as
(entry, offset, length), so the queue, the workers, the resume bitmap and the state log all
speak of blocks and never of files. With one entry, block ``b`` is the file's block ``b`` at
offset ``b * block_size``.

The ``BlockLedger`` is the one record of which blocks a side holds and their digests: the
receiver's durable blocks (from its state log, its workers' reports), the sender's completed
blocks (acknowledged as durable, digest known). The whole-file digest is computed from it
(``digest.file_digest``); the resume bitmap and digests of METADATA_ACK are read from it.

Pure: no I/O here.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
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
    """Every block of a manifest's entries, numbered from 0 in entry order."""

    def __init__(self, sizes: Iterable[int], *, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.sizes = tuple(sizes)
        starts = [0]
        for size in self.sizes:
            starts.append(starts[-1] + blocks_for(size, block_size))
        #: first block of each entry, and the total at the end
        self._starts = tuple(starts)

    @classmethod
    def of(cls, entries: Iterable[Entry], *, block_size: int) -> BlockSpace:
        return cls((e.size for e in entries), block_size=block_size)

    @property
    def total(self) -> int:
        return self._starts[-1]

    def entry_blocks(self, entry: int) -> range:
        return range(self._starts[entry], self._starts[entry + 1])

    def locate(self, block: int) -> BlockRef:
        if not 0 <= block < self.total:
            raise IndexError(f"block {block} outside 0..{self.total - 1}")
        entry = bisect.bisect_right(self._starts, block) - 1
        index = block - self._starts[entry]
        offset = index * self.block_size
        return BlockRef(block, entry, offset, min(self.block_size, self.sizes[entry] - offset))

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
        self.bytes += self.space.length(block)
        return True

    def copy(self) -> BlockLedger:
        """An independent ledger holding the same blocks and digests."""
        other = BlockLedger(self.space)
        other._have[:] = self._have
        other._digests[:] = self._digests
        other.count, other.bytes = self.count, self.bytes
        return other

    def clear(self) -> None:
        """Hold nothing (the digests are forgotten too)."""
        self._have[:] = bytes(self.total)
        self._digests[:] = bytes(len(self._digests))
        self.count = self.bytes = 0

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
