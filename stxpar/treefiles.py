"""The file effects of a receiving session for a tree: every manifest that is not one top-level
file (``Manifest.single() is None``). The shapes mirror ``stxpar.partials``.

Theory of operation
-------------------
A tree ``D`` arrives as ``DEST/D/...``. While it moves, the receiver keeps its own *staging
directory* ``DEST/.stx-<16 hex>.stxtree`` (mode 0700, named after the roots, so a resend of
the same PATHs finds it again) holding:

    state            the resume log (``stxpar.treestate``)
    <key hex>        one partial per FILE entry, named by ``Manifest.key``: the receiver's workers
                     create it and ``pwrite`` its blocks at their offsets in the file

(The session's layout file, which tells the workers where each block goes, lives in the
receiver's private directory, not here: ``control`` writes it.)

A file gets its final name the moment its last block is recorded (``log.append``): the partial
is cut to the file's size (a trailing hole stays a hole), given its mode and mtime, fsynced and
renamed into place, replacing a regular file or symlink there as a whole, never a directory.
Files with no blocks, symlinks and the directories' modes and mtimes (deepest first, so that
a directory's mtime comes after its contents and a read-only directory is made so last) are
done by ``finalize``, which then removes the staging directory.

Nothing in the tree is reached through a path string: every directory is opened from ``DEST``
one component at a time with ``O_NOFOLLOW | O_DIRECTORY`` and everything in it is named
relative to that descriptor, so a symlink planted anywhere in the tree (by the sender's own
manifest, which cannot have one above a file, or by a local user) is never followed. A file
in staging is trusted only if it is a regular file with one link owned by us.

``open_tree`` creates nothing before the whole manifest was checked against the destination
(a non-directory where a directory goes, a directory where a file goes: refused) and the free
space; then it reuses or makes the staging directory, keeps what the log says is held of each
file whose key is unchanged (and whose partial, or final file for one in place, is still
there), unlinks every other partial, rewrites the log compactly and makes the directories.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from . import treestate
from .blocks import BlockLedger, BlockSpace
from .destination import NameLock, Names, disk_error, free_bytes, is_ours
from .errors import RejectedError, StateFileError
from .manifest import Entry, Kind, Manifest
from .partials import NullLog
from .state import Partial
from .treestate import BLOCK, DONE, ENTRY, TreeStateLog, encode_record

LAYOUT = "layout"
#: Parent directories kept open for renames (least recently used closed first).
MAX_OPEN_DIRS = 256
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_A_DIR = (errno.ENOTDIR, errno.ELOOP)


STAGING_SUFFIX = ".stxtree"


def staging_name(roots: Sequence[str]) -> str:
    """The staging directory of a tree with these top-level names."""
    joined = b"\0".join(sorted(r.encode() for r in roots))
    return ".stx-" + hashlib.sha256(joined).hexdigest()[:16] + STAGING_SUFFIX


def partial_name(key: bytes) -> str:
    """The name in staging of the partial of the FILE entry with this key."""
    return key.hex()


def _split(path: str) -> tuple[str, str]:
    parent, _, base = path.rpartition("/")
    return parent, base


def _show(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "..."


class _Dirs:
    """Directories of the tree opened from ``DEST`` component by component, never through a
    symlink; a bounded cache of their descriptors. ``get`` raises OSError (ENOENT: missing,
    ENOTDIR or ELOOP: not a directory, or a symlink)."""

    def __init__(self, dest_fd: int, limit: int = MAX_OPEN_DIRS) -> None:
        self._dest_fd = dest_fd
        self._limit = limit
        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, path: str) -> int:
        if path == "":
            return self._dest_fd
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        parent, base = _split(path)
        fd = os.open(base, _DIR_OPEN, dir_fd=self.get(parent))
        self._fds[path] = fd
        while len(self._fds) > self._limit:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])


class TreeLog:
    """The log the session appends to (``partials``' ``StateLog`` shape): records the blocks
    the workers made durable, then puts every file that became complete in place."""

    def __init__(self, opened: TreeOpened) -> None:
        self._opened = opened

    def append(self, records: list[tuple[int, bytes]]) -> None:
        self._opened._append(records)

    def close(self) -> None:
        self._opened._close_log()


class TreeOpened:
    """The files of an admitted tree session."""

    def __init__(
        self,
        dest: Path,
        manifest: Manifest,
        ledger: BlockLedger,
        *,
        complete: bool,
        dest_fd: int = -1,
        staging_fd: int = -1,
        dirs: _Dirs | None = None,
        present: frozenset[str] = frozenset(),
    ) -> None:
        self.manifest = manifest
        self.identity: bytes = manifest.digest
        #: What was durably held at admission (the session records into it; this module
        #: keeps its own counts).
        self.ledger = ledger
        #: A remembered completion: the tree is already in place, nothing to do.
        self.complete = complete
        self.dest = dest
        self.staging = dest / staging_name(manifest.roots)
        self.log: TreeLog | NullLog = NullLog() if complete else TreeLog(self)
        self.files_done = 0
        self._dest_fd = dest_fd
        self._staging_fd = staging_fd
        self._dirs = dirs
        #: the FILE and SYMLINK paths that something had at admission (checked again before
        #: a rename replaces it)
        self._present = present
        self._state: TreeStateLog | None = None
        self._inode: tuple[int, int] | None = None
        if staging_fd >= 0:
            st = os.fstat(staging_fd)
            self._inode = (st.st_dev, st.st_ino)
        space = manifest.space
        self._files = [i for i, e in enumerate(manifest.entries) if e.kind == Kind.FILE]
        self._have = bytearray(space.total)
        self._remaining = {i: len(space.entry_blocks(i)) for i in self._files}
        self._done: set[int] = set()
        #: file number in the log of each entry the log names
        self._number: dict[int, int] = {}
        self._finished = False
        self._ended = False

    # ------------------------------------------------------------ what the session calls

    def close(self) -> None:
        """Close every descriptor (the files stay)."""
        self._close_log()
        if self._dirs is not None:
            self._dirs.close()
            self._dirs = None
        for attr in ("_staging_fd", "_dest_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def inode(self) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the staging directory (None for a completed tree)."""
        return None if self.complete else self._inode

    # ------------------------------------------------------------ internals

    def _close_log(self) -> None:
        if self._state is not None:
            self._state.close()
            self._state = None

    def _dirs_open(self) -> _Dirs:
        if self._dirs is None:
            raise OSError(errno.EBADF, "the tree's files are closed")
        return self._dirs

    def _hold(self, pairs: list[tuple[int, bytes]]) -> None:
        """Admission: blocks kept from the log."""
        space = self.manifest.space
        for b, _ in pairs:
            if not self._have[b]:
                self._have[b] = 1
                for entry in space.block_entries(b):
                    self._remaining[entry] -= 1

    def _records_for(self, entry: int, out: list[bytes]) -> int:
        n = self._number.get(entry)
        if n is None:
            n = self._number[entry] = len(self._number)
            out.append(encode_record(ENTRY, n, 0, self.manifest.key(entry)))
        return n

    def _append(self, records: list[tuple[int, bytes]]) -> None:
        if self._state is None:
            raise OSError(errno.EBADF, "the tree's state log is closed")
        space = self.manifest.space
        out: list[bytes] = []
        newly: list[int] = []
        for b, digest in records:
            entries = space.block_entries(b)
            for entry in entries:  # a pack's block is logged for each of its files
                n = self._records_for(entry, out)
                out.append(encode_record(BLOCK, n, b - space.entry_blocks(entry).start, digest))
            if not self._have[b]:
                self._have[b] = 1
                for entry in entries:
                    self._remaining[entry] -= 1
                    if self._remaining[entry] == 0 and entry not in self._done:
                        newly.append(entry)
        self._state.append(b"".join(out))
        if newly:
            self._place(newly, self._finish_partial)

    def _place(self, entries: list[int], how: Callable[[int], str]) -> None:
        """Put files in place (``how`` returns the parent), make their directories durable,
        then log them as done."""
        assert self._state is not None
        parents = {how(i) for i in entries}
        self._fsync_dirs(parents)
        out: list[bytes] = []
        for i in entries:
            out.append(encode_record(DONE, self._records_for(i, out)))
            self._done.add(i)
        self.files_done += len(entries)
        self._state.append(b"".join(out))

    def _fsync_dirs(self, paths: set[str]) -> None:
        dirs = self._dirs_open()
        for path in sorted(paths):
            os.fsync(dirs.get(path))

    def _finish_partial(self, i: int) -> str:
        """The complete partial of FILE ``i``: cut, mode, mtime, fsync, renamed into place. A
        pack member's worker has usually done all but the rename (``workers/receiver``): its
        partial is then only checked (ours, with the entry's size, mtime and mode) and
        renamed."""
        e = self.manifest.entries[i]
        name = partial_name(self.manifest.key(i))
        if self.manifest.space.packed(i):
            try:
                st = os.stat(name, dir_fd=self._staging_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and _finished(st, e):
                return self._rename_in(name, e, (st.st_dev, st.st_ino))
        try:
            fd = os.open(name, os.O_RDWR | _SAFE_OPEN, dir_fd=self._staging_fd)
        except FileNotFoundError:
            raise OSError(
                errno.ESTALE, f"the partial file of {_show(e.path)} was removed meanwhile"
            ) from None
        try:
            return self._land(fd, name, e)
        finally:
            os.close(fd)

    def _make_empty(self, i: int) -> str:
        """FILE ``i`` with no blocks (empty, or all holes), made in staging and put in place."""
        e = self.manifest.entries[i]
        name = partial_name(self.manifest.key(i))
        _unlink(name, self._staging_fd)
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE_OPEN,
            0o600,
            dir_fd=self._staging_fd,
        )
        try:
            return self._land(fd, name, e)
        finally:
            os.close(fd)

    def _land(self, fd: int, name: str, e: Entry) -> str:
        st = os.fstat(fd)
        if not is_ours(st):
            raise OSError(
                errno.ESTALE, f"the partial file of {_show(e.path)} is not the receiver's own"
            )
        os.ftruncate(fd, e.size)  # a trailing hole stays a hole
        os.fchmod(fd, e.mode)  # private until now: the staging directory is 0700
        # The mtime before the rename (which does not change it): one fsync makes both durable.
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        os.fsync(fd)
        return self._rename_in(name, e, (st.st_dev, st.st_ino))

    def _rename_in(self, name: str, e: Entry, inode: tuple[int, int]) -> str:
        parent, base = _split(e.path)
        pfd = self._dirs_open().get(parent)
        if e.path in self._present:
            _check_replaceable(pfd, base, e.path)
        try:
            os.rename(name, base, src_dir_fd=self._staging_fd, dst_dir_fd=pfd)
        except OSError:
            # Nothing had the name at admission, and a rename never replaces a directory: say
            # what is in the way now.
            _check_replaceable(pfd, base, e.path)
            raise
        landed = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        if (landed.st_dev, landed.st_ino) != inode:
            raise OSError(errno.ESTALE, f"{_show(e.path)} was replaced while it was renamed")
        return parent

    def _make_symlink(self, i: int) -> str:
        e = self.manifest.entries[i]
        tmp = f"{i}.link"
        _unlink(tmp, self._staging_fd)
        os.symlink(e.link, tmp, dir_fd=self._staging_fd)
        st = os.stat(tmp, dir_fd=self._staging_fd, follow_symlinks=False)
        parent = self._rename_in(tmp, e, (st.st_dev, st.st_ino))
        os.utime(
            _split(e.path)[1],
            ns=(e.mtime_ns, e.mtime_ns),
            dir_fd=self._dirs_open().get(parent),
            follow_symlinks=False,
        )
        return parent

    def _finish(self) -> None:
        """``finalize`` for a tree that is not a remembered completion (OSError, RejectedError)."""
        entries = self.manifest.entries
        missing = [i for i in self._files if i not in self._done and self._remaining[i]]
        if missing:
            e = entries[missing[0]]
            raise RejectedError(
                f"cannot finish the tree: {_show(e.path)} is incomplete"
                f" ({self._remaining[missing[0]]} blocks missing)"
            )
        pending = [i for i in self._files if i not in self._done]
        empty = [i for i in pending if not len(self.manifest.space.entry_blocks(i))]
        full = [i for i in pending if len(self.manifest.space.entry_blocks(i))]
        if full:
            self._place(full, self._finish_partial)
        if empty:
            self._place(empty, self._make_empty)
        links = [i for i, e in enumerate(entries) if e.kind == Kind.SYMLINK]
        self._fsync_dirs({self._make_symlink(i) for i in links})
        dirs = self._dirs_open()
        tree_dirs = [i for i, e in enumerate(entries) if e.kind == Kind.DIR]
        # Deepest first: a directory's mtime after its contents', a read-only one made so last.
        tree_dirs.sort(key=lambda i: entries[i].path.count("/"), reverse=True)
        for i in tree_dirs:
            e = entries[i]
            fd = dirs.get(e.path)
            os.fchmod(fd, e.mode)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            os.fsync(fd)
        os.fsync(self._dest_fd)
        self._close_log()
        _unlink(treestate.NAME, self._staging_fd)
        shutil.rmtree(self.staging.name, dir_fd=self._dest_fd)
        os.fsync(self._dest_fd)


def _finished(st: os.stat_result, e: Entry) -> bool:
    """Whether the partial that ``st`` describes is ours and has FILE ``e``'s size, mtime and
    mode (a worker finished it before its fsync)."""
    return (
        is_ours(st)
        and st.st_size == e.size
        and st.st_mtime_ns == e.mtime_ns
        and stat.S_IMODE(st.st_mode) == e.mode
    )


def _check_replaceable(pfd: int, base: str, path: str) -> None:
    """OSError unless ``base`` in ``pfd`` is free or may be replaced by a rename (a regular
    file or a symlink, never what it points to)."""
    try:
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise OSError(
            errno.EISDIR,
            f"{_show(path)} is a directory in the destination; refusing to replace it",
        )
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OSError(
            errno.EEXIST,
            f"{_show(path)} exists in the destination and is not a regular file or symlink",
        )


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


# ---------------------------------------------------------------- admission


def open_tree(
    dest: Path,
    manifest: Manifest,
    *,
    remembered: Callable[[bytes], BlockLedger | None],
    on_restart: Callable[[str], None],
) -> TreeOpened:
    """Admission of a tree (see the module docstring). ``remembered(manifest.digest)``: the
    ledger of a completion of this very tree kept in memory, if any; ``on_restart(reason)`` is
    told why a log left by an earlier session is not resumed from. RejectedError (a path in
    the way, no space, a disk error; ConnectError when out of descriptors)."""
    try:
        dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise disk_error(exc, "cannot open the destination") from None
    dirs = _Dirs(dest_fd)
    staging_fd = -1
    made_staging = False
    name = staging_name(manifest.roots)
    opened: TreeOpened | None = None
    try:
        try:
            present = _precheck(dirs, manifest)
            staging_fd = _open_staging(dest_fd, name)
        except OSError as exc:
            raise disk_error(exc, "cannot check the destination") from None
        # Read only: what the log (if any) says is held and still there.
        held, done = _survey(dirs, staging_fd, manifest, on_restart)
        # A completion remembered, but a staging directory there: a later run of the same tree
        # was cut off (its files may all be in place, its directories' modes and times not yet):
        # resume it, and let its finalize put them right.
        recent = remembered(manifest.digest) if staging_fd < 0 else None
        if recent is not None and all(
            _in_place(dirs, manifest.entries[i])
            for i, e in enumerate(manifest.entries)
            if e.kind == Kind.FILE
        ):
            if staging_fd >= 0:
                os.close(staging_fd)
            dirs.close()
            os.close(dest_fd)
            return TreeOpened(dest, manifest, recent.copy(), complete=True)
        ledger = BlockLedger.of(manifest.space, (p for pairs in held.values() for p in pairs))
        need = manifest.data_bytes - ledger.bytes
        try:
            free = free_bytes(dest)
        except OSError as exc:
            raise disk_error(exc, "cannot check the destination's free space") from None
        if need > free:
            raise RejectedError(f"not enough space for the tree: {need} bytes needed, {free} free")
        try:
            if staging_fd < 0:
                try:
                    os.mkdir(name, 0o700, dir_fd=dest_fd)
                    made_staging = True
                except FileExistsError:
                    pass
                staging_fd = _open_staging(dest_fd, name)
            opened = TreeOpened(
                dest,
                manifest,
                ledger,
                complete=False,
                dest_fd=dest_fd,
                staging_fd=staging_fd,
                dirs=dirs,
                present=present,
            )
            for pairs in held.values():
                opened._hold(pairs)
            opened._done |= done
            opened.files_done = len(done)
            _sweep(
                staging_fd,
                lambda: (
                    {partial_name(manifest.key(i)) for i in opened._files}
                    - {partial_name(manifest.key(i)) for i in done}
                ),
            )
            out: list[bytes] = []
            for i in sorted(held.keys() | done):
                n = opened._records_for(i, out)
                out.extend(
                    encode_record(BLOCK, n, b - manifest.space.entry_blocks(i).start, d)
                    for b, d in held.get(i, ())
                )
                if i in done:
                    out.append(encode_record(DONE, n))
            header = treestate.Header(tuple(manifest.roots), manifest.block_size)
            opened._state = TreeStateLog.write(staging_fd, header, b"".join(out))
            _make_dirs(dirs, manifest)
        except OSError as exc:
            raise disk_error(exc, "cannot prepare the tree in the destination") from None
        return opened
    except BaseException:
        if made_staging:
            shutil.rmtree(name, dir_fd=dest_fd, ignore_errors=True)
        if opened is not None:
            opened.close()  # the log, the directories, staging, DEST
        else:
            dirs.close()
            if staging_fd >= 0:
                os.close(staging_fd)
            os.close(dest_fd)
        raise


def _precheck(dirs: _Dirs, manifest: Manifest) -> frozenset[str]:
    """RejectedError if any entry cannot be written as it is: a non-directory (a symlink
    included) where a directory goes, a directory (or device, FIFO...) where a file or a
    symlink goes. Nothing is created; OSError for other failures. The paths of the FILE and
    SYMLINK entries that something has now (a file or a symlink, to be replaced)."""
    missing: set[str] = set()
    present: set[str] = set()
    for e in manifest.entries:
        parent, base = _split(e.path)
        if parent in missing:
            if e.kind == Kind.DIR:
                missing.add(e.path)
            continue
        try:
            pfd = dirs.get(parent)
        except OSError as exc:
            if exc.errno in _NOT_A_DIR:
                raise RejectedError(
                    f"{_show(parent)} exists in the destination and is not a directory;"
                    " refusing to write through it"
                ) from None
            raise
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            if e.kind == Kind.DIR:
                missing.add(e.path)
            continue
        if e.kind == Kind.DIR:
            if not stat.S_ISDIR(st.st_mode):
                raise RejectedError(
                    f"{_show(e.path)} exists in the destination and is not a directory;"
                    " refusing to write through it"
                )
        elif stat.S_ISDIR(st.st_mode):
            raise RejectedError(
                f"{_show(e.path)} exists in the destination and is a directory;"
                " refusing to replace it"
            )
        elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise RejectedError(
                f"{_show(e.path)} exists in the destination and is not a regular file"
                " or symlink; refusing to replace it"
            )
        else:
            present.add(e.path)
    return frozenset(present)


def _open_staging(dest_fd: int, name: str) -> int:
    """The staging directory if it exists (-1 if not); RejectedError if what has its name is
    not a directory of ours."""
    try:
        fd = os.open(name, _DIR_OPEN, dir_fd=dest_fd)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        if exc.errno in _NOT_A_DIR:
            raise RejectedError(
                f"{name} in the destination is not a directory; refusing to use it"
            ) from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise RejectedError(
            f"{name} in the destination is owned by uid {st.st_uid}, not by this receiver;"
            " refusing to use it"
        )
    return fd


def _survey(
    dirs: _Dirs, staging_fd: int, manifest: Manifest, on_restart: Callable[[str], None]
) -> tuple[dict[int, list[tuple[int, bytes]]], set[int]]:
    """What of the log left in staging is still good: per FILE entry, the blocks held
    ``(global block, digest)``; and the entries in place. Reads only."""
    held: dict[int, list[tuple[int, bytes]]] = {}
    done: set[int] = set()
    if staging_fd < 0:
        return held, done
    space = manifest.space
    files = sum(1 for e in manifest.entries if e.kind == Kind.FILE)
    limit = treestate.MAX_HEADER + treestate.RECORD_LEN * (3 * space.total + 3 * files + 64)
    try:
        got = treestate.read(staging_fd, limit)
    except OSError:
        got = None
    if got is None:
        return held, done
    data, st = got
    if not is_ours(st):
        on_restart("the tree's resume log is not the receiver's own")
        return held, done
    try:
        parsed = treestate.parse(data)
    except StateFileError as exc:
        on_restart(f"the tree's resume log is unusable ({exc})")
        return held, done
    if parsed.header.block_size != manifest.block_size:
        on_restart("the block size changed since the partial copy was made")
        return held, done
    if sorted(parsed.header.roots) != sorted(manifest.roots):
        on_restart("the resume log is for other top-level names")
        return held, done
    for i, e in enumerate(manifest.entries):
        if e.kind != Kind.FILE:
            continue
        fs = parsed.files.get(manifest.key(i))
        if fs is None:
            continue
        blocks = space.entry_blocks(i)
        pairs = [(blocks.start + k, d) for k, d in sorted(fs.blocks.items()) if k < len(blocks)]
        if fs.done:
            if len(pairs) == len(blocks) and _in_place(dirs, e):
                done.add(i)
                if pairs:
                    held[i] = pairs
            # else: the finished file was removed or changed since: it starts over
        elif pairs and _partial_ours(staging_fd, partial_name(manifest.key(i))):
            held[i] = pairs
        elif pairs and len(pairs) == len(blocks) and _in_place(dirs, e):
            # Every block logged, no partial, and the file at its final path with its size
            # and mtime (set before the rename): renamed into place just before a crash that
            # came before its DONE record. It is done; the new log says so.
            done.add(i)
            held[i] = pairs
    _whole_packs(space, held, done)
    return held, done


def _whole_packs(
    space: BlockSpace, held: dict[int, list[tuple[int, bytes]]], done: set[int]
) -> None:
    """A pack's block counts as held only when the log holds it, with one digest, for every
    file in it (a torn append, or a tree that changed since so that other files share the
    block now): otherwise its files start over, in place or not."""
    seen: set[int] = set()
    for i in list(held):
        pairs = held.get(i)
        if not pairs or len(pairs) != 1:
            continue
        b, digest = pairs[0]
        ref = space.locate(b)
        if ref.count == 1 or b in seen:
            continue
        seen.add(b)
        members = range(ref.entry, ref.entry + ref.count)
        if all(held.get(m) == [(b, digest)] for m in members):
            continue
        for m in members:
            held.pop(m, None)
            done.discard(m)


def _in_place(dirs: _Dirs, e: Entry) -> bool:
    """Whether FILE ``e`` is at its final path: a regular file of its size and mtime."""
    parent, base = _split(e.path)
    try:
        st = os.stat(base, dir_fd=dirs.get(parent), follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns


def _partial_ours(staging_fd: int, name: str) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | _SAFE_OPEN, dir_fd=staging_fd)
    except OSError:
        return False
    try:
        return is_ours(os.fstat(fd))
    finally:
        os.close(fd)


def _sweep(staging_fd: int, wanted_names: Callable[[], set[str]]) -> None:
    """Unlink what staging holds besides the log, the layout and the partials in
    ``wanted_names()`` that are ours (a changed file's old partial, temporary names, anything
    planted). The names are worked out only if staging holds anything else (a new staging
    directory holds nothing: ten thousand names saved)."""
    wanted: set[str] | None = None
    for name in os.listdir(staging_fd):
        if name == treestate.NAME or name.startswith(LAYOUT):
            continue  # the log, and the session's layout file (and its temporary names)
        if wanted is None:
            wanted = wanted_names()
        try:
            st = os.stat(name, dir_fd=staging_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            continue  # nothing of ours; removed with the staging directory
        if name in wanted and is_ours(st):
            continue
        _unlink(name, staging_fd)


def _make_dirs(dirs: _Dirs, manifest: Manifest) -> None:
    """Every DIR entry, parents first: made 0700 (the mode is applied by ``finalize``), an
    existing one given u+rwx for now. OSError (ENOTDIR, ELOOP: something was swapped in)."""
    made_in: set[str] = set()
    for e in manifest.entries:
        if e.kind != Kind.DIR:
            continue
        parent, base = _split(e.path)
        try:
            os.mkdir(base, 0o700, dir_fd=dirs.get(parent))
            made_in.add(parent)
        except FileExistsError:
            pass
        fd = dirs.get(e.path)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o700 != 0o700:
            os.fchmod(fd, mode | 0o700)
    for path in sorted(made_in):
        os.fsync(dirs.get(path))


# ---------------------------------------------------------------- the end


def finalize(opened: TreeOpened, *, mode: int) -> None:
    """Put everything not yet in place (files with no blocks, symlinks, directories' modes and
    mtimes), remove the log and the staging directory, close. ``mode`` is unused (entries
    carry their own). RejectedError if something is in the way, a file is incomplete, or a
    disk error."""
    del mode
    if opened.complete or opened._finished:
        opened.close()
        return
    try:
        opened._finish()
    except OSError as exc:
        raise disk_error(exc, "cannot finish the tree") from None
    opened._finished = True
    opened.close()


def gone(opened: TreeOpened) -> bool:
    """Whether the staging directory was removed or replaced since admission."""
    if opened.complete or opened._finished:
        return False
    try:
        if opened._dest_fd >= 0:
            st = os.stat(opened.staging.name, dir_fd=opened._dest_fd, follow_symlinks=False)
        else:
            with _DestFd(opened.dest) as dest_fd:
                st = os.stat(opened.staging.name, dir_fd=dest_fd, follow_symlinks=False)
    except OSError:
        return True
    return (st.st_dev, st.st_ino) != opened._inode


def end(opened: TreeOpened, how: str, initial: tuple[tuple[int, bytes], ...] = ()) -> None:
    """Close the files of a session that failed and leave them as ``how`` says
    (``recv_session.EndFiles``): keep (for a resume), discard (the staging directory goes;
    files already in place stay), revert (the log holds exactly ``initial``), gone (the log
    goes). Safe to call twice."""
    opened.close()
    if opened.complete or opened._finished or how == "keep":
        return
    name = opened.staging.name
    try:
        with _DestFd(opened.dest) as dest_fd:
            if how == "discard":
                if _same_dir(dest_fd, name, opened._inode):
                    shutil.rmtree(name, dir_fd=dest_fd, ignore_errors=True)
                return
            try:
                staging_fd = _open_staging(dest_fd, name)
            except (OSError, RejectedError):
                return
            if staging_fd < 0:
                return
            try:
                st = os.fstat(staging_fd)
                same = (st.st_dev, st.st_ino) == opened._inode
                if how == "revert" and same:
                    try:
                        _revert(opened, staging_fd, initial)
                        return
                    except OSError:
                        pass
                _unlink(treestate.NAME, staging_fd)
            finally:
                os.close(staging_fd)
    except OSError:
        pass


def _revert(opened: TreeOpened, staging_fd: int, initial: tuple[tuple[int, bytes], ...]) -> None:
    manifest = opened.manifest
    space = manifest.space
    per: dict[int, list[tuple[int, bytes]]] = {}
    for b, d in initial:
        for entry in space.block_entries(b):
            per.setdefault(entry, []).append((b - space.entry_blocks(entry).start, d))
    files = []
    for i in sorted(per.keys() | {i for i in opened._done if not len(space.entry_blocks(i))}):
        blocks = per.get(i, [])
        done = i in opened._done and len({k for k, _ in blocks}) == len(space.entry_blocks(i))
        files.append((manifest.key(i), blocks, done))
    header = treestate.Header(tuple(manifest.roots), manifest.block_size)
    TreeStateLog.write(staging_fd, header, treestate.encode_files(files)).close()


def _same_dir(dest_fd: int, name: str, inode: tuple[int, int] | None) -> bool:
    try:
        st = os.stat(name, dir_fd=dest_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == inode


class _DestFd:
    def __init__(self, dest: Path) -> None:
        self._dest = dest
        self._fd = -1

    def __enter__(self) -> int:
        self._fd = os.open(self._dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._fd

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


# ---------------------------------------------------------------- trees left behind

#: The most of a staging directory's log read to list it (a million files' records fit).
LIST_LOG_LIMIT = 256 << 20


def find_trees(dest: Path, *, now: float) -> list[Partial]:
    """The staging directories of tree transfers left in ``dest`` (``stx recv
    --list-partial``): their top-level names (from the log), the bytes and blocks held, how
    long untouched. Only real directories of this user are looked at; nothing is followed."""
    found = []
    for entry in sorted(dest.iterdir()):
        n = entry.name
        if not (n.startswith(".stx-") and n.endswith(STAGING_SUFFIX)):
            continue
        try:
            st = os.lstat(entry)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            dfd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        held = blocks = 0
        newest = st.st_mtime
        roots: tuple[str, ...] = ()
        try:
            with os.scandir(dfd) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        est = e.stat(follow_symlinks=False)
                        newest = max(newest, est.st_mtime)
                        if stat.S_ISREG(est.st_mode) and e.name != treestate.NAME:
                            held += est.st_blocks * 512
            with contextlib.suppress(OSError, StateFileError):
                got = treestate.read(dfd, LIST_LOG_LIMIT)
                if got is not None:
                    parsed = treestate.parse(got[0])
                    roots = parsed.header.roots
                    blocks = sum(len(f.blocks) for f in parsed.files.values())
        except OSError:
            continue
        finally:
            os.close(dfd)
        name = ", ".join(_show(r) for r in roots) if roots else n
        found.append(Partial(name, 0, held, blocks, 0, now - newest, (entry,), tree=True))
    return found


def purge_trees(dest: Path, *, older_than_s: float, now: float) -> list[Partial]:
    """Remove the staging directories untouched for ``older_than_s`` seconds whose top-level
    names no receiver holds now (``stx recv --purge-partial``); return them. Files already
    put in place and directories already made stay."""
    removed = []
    for partial in find_trees(dest, now=now):
        if partial.age_s < older_than_s:
            continue
        roots = _roots_of(partial.files[0])
        locks: list[NameLock] = []
        try:
            for root in sorted(set(roots)):
                lock = NameLock.try_acquire(Names.of(dest, root).lock)
                if lock is None:
                    break  # a live receiver works on it
                locks.append(lock)
            else:
                if remove_staging(dest, partial):
                    removed.append(partial)
        except OSError:
            pass
        finally:
            for lock in locks:
                lock.release()
    return removed


def _roots_of(path: Path) -> tuple[str, ...]:
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ()
    try:
        got = treestate.read(dfd, LIST_LOG_LIMIT)
        return treestate.parse(got[0]).header.roots if got is not None else ()
    except (OSError, StateFileError):
        return ()
    finally:
        os.close(dfd)


def remove_staging(dest: Path, partial: Partial) -> bool:
    """Remove a tree's staging directory left behind (the caller holds its names' locks):
    its files are unlinked, never followed, then the directory itself. False if it is not
    a directory of this user any more."""
    (path,) = partial.files
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return False
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        with os.scandir(dfd) as it:
            names = [e.name for e in it if not e.is_dir(follow_symlinks=False)]
        for name in names:
            _unlink(name, dfd)
    finally:
        os.close(dfd)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True
