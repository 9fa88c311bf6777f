"""The file effects of a receiving session: open its partial and state log, record progress,
finalize, end.

Theory of operation
-------------------
The session core (``recv_session``) decides; these functions do what it asks, on the files of
one name in the destination (``destination.Names``), with plain ``os`` calls and the checks of
``destination`` (no symlink followed, only files the receiver made are trusted).

``open_partial`` is admission steps 3-5 of docs/protocol.md §8.3: *resume* from the state log
and partial left by an earlier session of the same identity; else a *remembered completion*
(the file was completed moments ago and only the receipt got lost: nothing is opened); else
*start over* (old files unlinked, free space checked, the partial preallocated and reopened
as that very inode, a new state log). It returns an ``Opened``: the ledger of blocks held,
the state log to append to and the partial's descriptor, kept open until the session ends
so that what is renamed to the final name is the inode the blocks were written into.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .blocks import BlockLedger
from .destination import (
    Names,
    create_partial,
    disk_error,
    finish,
    free_bytes,
    open_ours,
    partial_still_there,
    unlink,
)
from .errors import RejectedError
from .state import Identity, StateLog, load
from .transfer import Transfer


class NullLog:
    """The state log of a transfer that is already complete: nothing to record."""

    def append(self, records: list[tuple[int, bytes]]) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Opened:
    """The files of an admitted session."""

    names: Names
    identity: Identity
    log: StateLog | NullLog
    #: The partial, open since admission (-1 for a remembered completion).
    part_fd: int
    ledger: BlockLedger
    #: A remembered completion: the final file is already there.
    complete: bool = False

    def close(self) -> None:
        """Close the state log and the partial's descriptor (the files stay)."""
        self.log.close()
        if self.part_fd >= 0:
            os.close(self.part_fd)
            self.part_fd = -1

    def inode(self) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the partial (None for none: a completed file)."""
        if self.part_fd < 0:
            return None
        st = os.fstat(self.part_fd)
        return st.st_dev, st.st_ino


def identity_of(md: Transfer, name: str) -> Identity:
    """A single-file transfer's resume identity (its one manifest entry)."""
    entry = md.manifest.single()
    assert entry is not None
    return Identity(name, entry.size, entry.mtime_ns, md.block_size, entry.file_id)


def open_partial(
    dest: Path,
    md: Transfer,
    names: Names,
    *,
    remembered: Callable[[Identity], BlockLedger | None],
    on_restart: Callable[[str], None],
) -> Opened:
    """Admission steps 3-5 (see above). ``remembered(identity)``: the ledger of a completion
    of this very transfer kept in memory, if any; ``on_restart(reason)`` is told why an old
    partial is not resumed. RejectedError (no space, a disk error) with nothing left behind."""
    ident = identity_of(md, names.name)
    space = md.manifest.space
    size = ident.size
    parsed = load(names.state)
    part_fd = -1
    resumable = False
    if parsed is not None and parsed.identity == ident and parsed.ours:
        # Only files this receiver made are resumed from: a regular file, one link, ours.
        got = open_ours(names.part)
        if got is not None and got[1].st_size == size:
            part_fd, resumable = got[0], True
        elif got is not None:
            os.close(got[0])
    if parsed is not None and not resumable:
        on_restart(
            "the source changed since the partial copy was made"
            if parsed.identity != ident
            else "the partial file is missing, has the wrong size or is not the receiver's own"
        )
    recent = None if resumable else _just_completed(names.final, ident, remembered)
    try:
        if recent is not None:
            return Opened(names, ident, NullLog(), -1, recent.copy(), complete=True)
        if resumable:
            assert parsed is not None
            log = StateLog.reopen(names.state, parsed)
            return Opened(names, ident, log, part_fd, BlockLedger.of(space, parsed.held_pairs()))
        unlink(names.state)
        unlink(names.part)  # a straggling writer keeps the old inode, never the new file
        free = free_bytes(dest)
        if md.size > free:  # the data: holes of a sparse file take no space
            raise RejectedError(
                f"not enough space for {ident.name}: {md.size} bytes needed, {free} free"
            )
        made = create_partial(names.part, size, allocate=md.size == size)
        got = open_ours(names.part)
        if got is not None and (got[1].st_dev, got[1].st_ino) == (made.st_dev, made.st_ino):
            part_fd = got[0]
        else:
            if got is not None:
                os.close(got[0])
            raise OSError(errno.ESTALE, "the new partial file was replaced at once")
        return Opened(
            names, ident, StateLog.create(names.state, ident), part_fd, BlockLedger(space)
        )
    except OSError as exc:
        if part_fd >= 0:
            os.close(part_fd)
        if not resumable:
            unlink(names.part)
            unlink(names.state)
        raise disk_error(exc, f"cannot prepare {names.part.name}") from None
    except BaseException:
        if part_fd >= 0:
            os.close(part_fd)
        raise


def _just_completed(
    final: Path, ident: Identity, remembered: Callable[[Identity], BlockLedger | None]
) -> BlockLedger | None:
    """The remembered completion of this very transfer, if the file is still as we left it."""
    recent = remembered(ident)
    if recent is None:
        return None
    try:
        st = os.stat(final, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if st.st_size != ident.size or st.st_mtime_ns != ident.mtime_ns:
        return None
    return recent


def finalize(opened: Opened, *, mode: int) -> None:
    """Give the partial its final name (nothing for a remembered completion), close and
    remove the state log. RejectedError: the partial is gone, or a disk error."""
    names = opened.names
    try:
        if not opened.complete:
            # By the descriptor kept since admission: the inode renamed is the one the blocks
            # were recorded for, or the transfer fails (PartialGone).
            finish(names, opened.part_fd, mode=mode, mtime_ns=opened.identity.mtime_ns)
        opened.close()
        unlink(names.state)
    except OSError as exc:
        raise disk_error(exc, f"cannot finish {names.name}") from None


def gone(opened: Opened) -> bool:
    """Whether the partial was deleted or replaced since admission."""
    return not opened.complete and not partial_still_there(opened.names.part, opened.part_fd)


def end(opened: Opened, how: str, initial: tuple[tuple[int, bytes], ...] = ()) -> None:
    """Close the files of a session that failed and leave them as ``how`` says
    (``recv_session.EndFiles``). Safe to call twice."""
    opened.close()
    names = opened.names
    if how == "gone":
        unlink(names.state)
    elif how == "discard":
        unlink(names.part)
        unlink(names.state)
    elif how == "revert":
        try:
            StateLog.rewrite(names.state, opened.identity, list(initial)).close()
        except OSError:
            unlink(names.state)  # no state at all is safe: the next run starts over
