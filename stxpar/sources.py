"""What one ``send()`` moves: its manifest and, for each file in it, where its bytes are read.

Theory of operation
-------------------
One PATH naming a regular file is sent as before: the file is resolved and pinned by a
descriptor (``source.SourceFile``) and travels as a manifest of one entry. Anything else (a
directory, several PATHs) is walked once (``scan.scan``: nothing below a PATH is followed) into
a manifest of files, directories and symlinks; each file is pinned by its identity (device,
inode, size, mtime, ctime), which every worker proves again when it opens the file and checks
after every read of it (``source.check_read``); before a reconnect's session the coordinator
checks them all by name (``check_unchanged``). The block size is chosen here, once,
from the data to move, so a resumed run computes the same blocks again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .blocks import BlockSpace
from .errors import UsageError
from .fileref import FileRef
from .layout import Layout
from .manifest import Entry, Kind, Manifest
from .prescan import Prescan
from .scan import Scan, check_top_name, extents_of, scan
from .source import SourceFile
from .wire import MAX_BLOCK_SIZE, MAX_BLOCKS, blocks_for, printable


@dataclass
class Sources:
    """The entries of a transfer and the files behind them."""

    entries: list[Entry]
    refs: list[FileRef | None]
    #: a single pinned file (one PATH, a regular file), or None for a tree
    single: SourceFile | None = None
    tree: Scan | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    label: str = ""

    _blocks: dict[int, int] = field(default_factory=dict, repr=False)
    _spaces: dict[int, BlockSpace] = field(default_factory=dict, repr=False)
    _layouts: dict[int, Layout] = field(default_factory=dict, repr=False)
    _tally: tuple[dict[Kind, int], int, int] | None = field(default=None, repr=False)

    # Counted once each: a tree's walk made them and only ``rename_root`` changes the entries
    # (their paths, not these).

    @property
    def data_bytes(self) -> int:
        return self._counts()[2]

    @property
    def bytes(self) -> int:
        return self._counts()[1]

    def count(self, kind: Kind) -> int:
        return self._counts()[0].get(kind, 0)

    def _counts(self) -> tuple[dict[Kind, int], int, int]:
        if self._tally is None and self.tree is not None:  # the walk counted them
            t = self.tree
            kinds = {Kind.FILE: t.files, Kind.DIR: t.dirs, Kind.SYMLINK: t.symlinks}
            self._tally = (kinds, t.bytes, t.data_bytes)
        if self._tally is None:
            kinds = dict.fromkeys(Kind, 0)
            apparent = data = 0
            for e in self.entries:
                kinds[e.kind] += 1
                if e.kind is Kind.FILE:
                    apparent += e.size
                    data += e.data_bytes
            self._tally = (kinds, apparent, data)
        return self._tally

    def blocks(self, block_size: int) -> int:
        got = self._blocks.get(block_size)
        if got is None:
            got = self._blocks[block_size] = sum(
                blocks_for(length, block_size) for e in self.entries for length in e.extents[1::2]
            )
        return got

    def space(self, block_size: int) -> BlockSpace:
        """The block space over the entries' data (made once per block size: the workers
        forked with it and the manifest share it)."""
        got = self._spaces.get(block_size)
        if got is None:
            got = self._spaces[block_size] = BlockSpace.of_extents(
                (e.extents for e in self.entries), block_size=block_size, pack=True
            )
        return got

    def manifest(self, block_size: int) -> Manifest:
        return Manifest(
            self.entries, block_size=block_size, encodings=True, space=self.space(block_size)
        )

    def layout(self, block_size: int) -> Layout:
        """The workers' layout (made once per block size, like ``space``)."""
        got = self._layouts.get(block_size)
        if got is None:
            got = self._layouts[block_size] = Layout(
                block_size, tuple(e.extents for e in self.entries), tuple(self.refs)
            )
        return got

    def rename_root(self, name: str) -> None:
        """Send the one top-level entry as ``name`` (``--as``): its path and every path
        below it. UsageError when there is not exactly one."""
        roots = [e for e in self.entries if "/" not in e.path]
        if len(roots) != 1:
            raise UsageError("--as needs exactly one PATH")
        old = roots[0].path
        prefix = old + "/"
        self.entries = [
            e._replace(path=name + e.path[len(old) :])
            if e.path == old or e.path.startswith(prefix)
            else e
            for e in self.entries
        ]

    def check_unchanged(self) -> None:
        """SourceChangedError (exit 5) if any file changed or was replaced since it was read."""
        if self.single is not None:
            self.single.check_unchanged()
        elif self.tree is not None:
            self.tree.check_unchanged()

    def close(self) -> None:
        if self.single is not None:
            self.single.close()

    def summary(self) -> dict[str, int]:
        """The counts ``--json`` reports."""
        return {
            "files": self.count(Kind.FILE),
            "dirs": self.count(Kind.DIR),
            "symlinks": self.count(Kind.SYMLINK),
            "skipped": len(self.skipped),
            "bytes_sparse": self.bytes - self.data_bytes,
        }


def open_sources(
    paths: Sequence[str | os.PathLike[str]],
    *,
    warn: Callable[[str], None] | None = None,
    scanned: Prescan | None = None,
) -> Sources:
    """Resolve and read what ``paths`` name (UsageError for a bad PATH); ``scanned``: their
    walk, going on in another process (``prescan.start``)."""
    if not paths:
        raise UsageError("nothing to send: give at least one PATH")
    if scanned is not None:
        return _of_scan(paths, scanned.result())
    if len(paths) == 1:
        try:
            st = os.stat(paths[0])
        except OSError:
            st = None  # scan says what is wrong with it
        if st is not None and stat.S_ISREG(st.st_mode):
            return of_file(SourceFile.open(paths[0]))
    return _of_scan(paths, scan(paths, warn=warn))


def _of_scan(paths: Sequence[str | os.PathLike[str]], found: Scan) -> Sources:
    refs: list[FileRef | None] = [None] * len(found.entries)
    for i, ref in found.sources.items():
        refs[i] = ref
    label = ", ".join(os.fspath(p) for p in paths)
    return Sources(found.entries, refs, tree=found, skipped=list(found.skipped), label=label)


def of_file(src: SourceFile) -> Sources:
    """One pinned file as a manifest of one entry (its holes found on its descriptor)."""
    try:
        st = os.fstat(src.fd)
        extents = extents_of(src.fd, src.size)
    except OSError as exc:
        src.close()
        raise UsageError(f"{src.path}: cannot read: {exc.strerror}") from None
    name = os.fsencode(src.path.name).decode("utf-8", "replace")
    try:
        check_top_name(printable(os.fspath(src.path)), src.path.name)  # as for a tree's
    except UsageError:
        src.close()
        raise
    entry = Entry(
        Kind.FILE,
        name,
        src.size,
        st.st_mode & 0o777,
        src.mtime_ns,
        extents=extents,
        file_id=src.file_id,
    )
    return Sources([entry], [src.ref()], single=src, label=os.fspath(src.path))


def choose_block_size(sources: Sources, block_size: int, *, fixed: bool) -> int:
    """``block_size``, doubled (unless ``fixed``: given by the user) until the transfer needs at
    most ``MAX_BLOCKS`` blocks; UsageError if it cannot."""
    bs = block_size
    while sources.blocks(bs) > MAX_BLOCKS:
        if fixed or bs >= MAX_BLOCK_SIZE:
            raise UsageError(
                f"{sources.label} needs more than {MAX_BLOCKS} blocks of {bs} bytes;"
                " use a larger --block-size"
            )
        bs *= 2  # the default block size grows for huge transfers
    return bs
