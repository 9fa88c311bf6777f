"""Where a transfer's blocks live, as one coordinator tells its workers: the layout file.

Theory of operation
-------------------
A worker needs the transfer's block space (which entry, which file offset, how long is block
``b``) and, per entry with data, where its bytes are: for a sender worker the source file it reads
(path and the identity the coordinator pinned, ``messages.FileRef``), for a receiver worker the
file it writes (the partial's name in the tree's staging directory, or nothing for a single file,
whose partial the stream job names). A manifest of a million entries does not fit in one worker
message, so the coordinator writes this description once per session into its private 0700
directory and names the file in the worker's job; every worker of the session reads it once.

The file is msgpack ``[MAGIC, block_size, entries, index, counts, extents, names, devs, inodes,
sizes, mtimes_ns, ctimes_ns, modes]``: columns, one item per entry with data (``index``: the
entry's number; ``counts``: how many numbers of the flat ``extents`` list are its (offset,
length) pairs), so that a worker decodes ten thousand entries in milliseconds rather than a row
object at a time. A sender's layout puts zeros in ``modes``; a receiver's puts zeros in the
identity columns and, in ``sizes``, ``mtimes_ns`` and ``modes``, what the finished file must
have (its worker gives a pack's files their size, mode and mtime as it writes them, so the
coordinator only renames them). It is read with hard limits and
checked for consistent columns; anything else is a ProtocolError.

Pure apart from ``write``/``read`` (a file in a directory only this user can enter).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from .blocks import BlockSpace
from .errors import ProtocolError
from .fileref import FileRef
from .fsutil import read_at_most
from .gcpause import no_collection

MAGIC = "stx3 layout 3"
#: A row: path or name, dev, ino, size, mtime_ns, ctime_ns, mode.
Row = tuple[str, int, int, int, int, int, int]
_COLUMNS = 7
#: The largest layout file read (a million entries with a path and a few extents each).
MAX_LAYOUT = 1 << 30


class _Rows(Sequence["FileRef | None"]):
    """Per entry, its file (a ``FileRef``, made when asked for: a million entries must not
    cost a million objects up front) or None."""

    def __init__(self, n: int, rows: dict[int, Row]) -> None:
        self.n = n
        self.rows = rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> FileRef | None:  # type: ignore[override]
        row = self.rows.get(i)
        return None if row is None else FileRef(*row[:6])


@dataclass(frozen=True)
class Layout:
    """Per manifest entry: its data extents (``()`` for none) and its file (``None``: none)."""

    block_size: int
    extents: tuple[tuple[int, ...], ...]
    files: Sequence[FileRef | None]

    @classmethod
    def named(
        cls,
        block_size: int,
        extents: Sequence[tuple[int, ...]],
        names: dict[int, tuple[str, int, int, int]],
    ) -> Layout:
        """A receiver's layout: per entry with data, its partial file's name and the size,
        mtime and mode the finished file must have."""
        rows = {
            i: (name, 0, 0, size, mtime, 0, mode) for i, (name, size, mtime, mode) in names.items()
        }
        return cls(block_size, tuple(extents), _Rows(len(extents), rows))

    def finished(self, i: int) -> tuple[str, int, int, int]:
        """A receiver's layout: entry ``i``'s partial name, and the size, mtime and mode of the
        finished file; ProtocolError if the entry holds no data."""
        row = self.files.rows.get(i) if isinstance(self.files, _Rows) else None
        if row is None:
            raise ProtocolError(f"block for entry {i}, which holds no data")
        return row[0], row[3], row[4], row[6]

    def name(self, i: int) -> str | None:
        """Entry ``i``'s file name or path (None: the entry holds no data)."""
        files = self.files
        if isinstance(files, _Rows):
            row = files.rows.get(i)
            return None if row is None else row[0]
        ref = files[i]
        return None if ref is None else ref.path

    def space(self) -> BlockSpace:
        return BlockSpace.of_extents(self.extents, block_size=self.block_size, pack=True)

    def encode(self) -> bytes:
        files = self.files
        if isinstance(files, _Rows):
            index = list(files.rows)
            cols: list[Sequence[Any]] = list(zip(*files.rows.values(), strict=True))
            cols = cols or [()] * _COLUMNS
        else:
            index = []
            refs: list[FileRef] = []
            for i, f in enumerate(files):
                if f is not None:
                    index.append(i)
                    refs.append(f)
            cols = [
                [f.path for f in refs],
                [f.dev for f in refs],
                [f.ino for f in refs],
                [f.size for f in refs],
                [f.mtime_ns for f in refs],
                [f.ctime_ns for f in refs],
                [0] * len(refs),
            ]
        return _pack(self.block_size, self.extents, index, [list(c) for c in cols])

    @classmethod
    def decode(cls, data: bytes) -> Layout:
        try:
            magic, block_size, n, index, counts, flat, *cols = msgpack.unpackb(
                data,
                raw=False,
                max_str_len=1 << 16,
                max_bin_len=0,
                max_array_len=1 << 26,
                max_map_len=0,
                max_ext_len=0,
            )
            if magic != MAGIC or not 0 < n <= 1 << 24 or len(cols) != _COLUMNS:
                raise ValueError("not a layout")
            k = len(index)
            if len(counts) != k or sum(counts) != len(flat) or any(len(c) != k for c in cols):
                raise ValueError("columns of different lengths")
            if k and (min(index) < 0 or max(index) >= n or min(counts) < 0):
                raise ValueError("an entry out of range")
            extents: list[tuple[int, ...]] = [()] * n
            at = 0
            for i, c in zip(index, counts, strict=True):
                extents[i] = tuple(flat[at : at + c])
                at += c
            files = dict(zip(index, zip(*cols, strict=True), strict=True))
            if len(files) != k:
                raise ValueError("an entry twice")
            return cls(int(block_size), tuple(extents), _Rows(n, files))
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as exc:
            raise ProtocolError("malformed layout file") from exc


def receiver_bytes(
    block_size: int,
    extents: Sequence[tuple[int, ...]],
    index: list[int],
    names: list[str],
    sizes: list[int],
    mtimes: list[int],
    modes: list[int],
) -> bytes:
    """What ``Layout.named(...).encode()`` makes, from its columns at once (a receiver writes
    this for every tree it admits: ten thousand rows are never made). ``index``: the entries
    with data, in order; the other lists: their partial names and finished files' fields."""
    zeros = [0] * len(index)
    return _pack(block_size, extents, index, [names, zeros, zeros, sizes, mtimes, zeros, modes])


def _pack(
    block_size: int, extents: Sequence[tuple[int, ...]], index: list[int], cols: list[list[Any]]
) -> bytes:
    """The layout file: the header, the entries with data (``index``) and their extents, then
    the ``_COLUMNS`` columns of their rows."""
    counts = [len(extents[i]) for i in index]
    flat = [x for i in index for x in extents[i]]
    body = [MAGIC, block_size, len(extents), index, counts, flat, *cols]
    return msgpack.packb(body, use_bin_type=True)


#: Layouts this process made before it forked its workers: path -> (layout, its block space).
_KNOWN: dict[str, tuple[Layout, BlockSpace]] = {}


def remember(path: str, layout: Layout, space: BlockSpace) -> None:
    """Keep ``layout`` (to be written at ``path``) in memory: a worker forked after this call
    finds it there (``recall``) instead of reading and decoding the file."""
    _KNOWN[path] = (layout, space)


def recall(path: str) -> tuple[Layout, BlockSpace] | None:
    """The layout ``remember`` kept for ``path`` in this process (or before it was forked)."""
    return _KNOWN.get(path)


def forget(path: str) -> None:
    _KNOWN.pop(path, None)


def write(path: str, layout: Layout | bytes) -> None:
    """Write ``layout`` (or its encoding) to a new file at ``path`` (in the coordinator's
    private directory)."""
    data = layout if isinstance(layout, bytes) else layout.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read(path: str) -> Layout:
    """The layout at ``path``; ProtocolError if it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(f"cannot read the transfer's layout: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_size > MAX_LAYOUT:
            raise ProtocolError("the transfer's layout is too large")
        data = read_at_most(fd, MAX_LAYOUT)
    finally:
        os.close(fd)
    with no_collection():  # ten thousand rows that all live on
        return Layout.decode(data)
