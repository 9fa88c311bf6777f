"""A source file as the sender's coordinator pinned it (its own module: the sender's walk,
which may run in a process forked before the rest of stxpar is imported, makes one per file)."""

from __future__ import annotations

from typing import NamedTuple


class FileRef(NamedTuple):
    """A source file as the sender's coordinator pinned it: a worker must open this very file
    (``st_dev``, ``st_ino``) in this very state (size, mtime, ctime) or refuse (exit 5). A
    named tuple, not a message: the walk makes one per file and a worker one per file it
    reads (a frozen dataclass costs three times as much to make)."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
