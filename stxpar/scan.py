"""The sender's view of what it was asked to send: the PATHs, walked once, as manifest entries.

Theory of operation
-------------------
Each PATH the user names is resolved once (a symlink the user named is followed, as
``source.SourceFile.open`` does for one file); below it nothing is followed. Each directory is
opened with O_NOFOLLOW|O_DIRECTORY and listed through that descriptor, and every child is
looked at through it too (``dir_fd``): a regular file's lstat gives the entry and the
``FileRef`` a worker re-checks when it opens the file (O_NOFOLLOW, same identity and state),
and only a file that may have holes is opened here to find them; a symlink is read, never
followed. One directory descriptor is open at a time and no file stays open: the walk keeps no
descriptors.

The entries come out in manifest order: a depth-first pre-order walk, each directory before
its children, the children sorted by their UTF-8 bytes, the PATHs in the order given.
Whatever the receiver would refuse (names that are not UTF-8, control characters, names or
paths too long) and what cannot be sent (FIFOs, sockets, devices) is skipped with a warning
and listed in ``Scan.skipped``; what the user named and cannot be sent, and anything that
cannot be read, is a ``UsageError``: a tree is never sent with silent holes in it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import SourceChangedError, UsageError
from .fileref import FileRef
from .manifest import (
    MAX_COMPONENT_BYTES,
    MAX_EXTENTS,
    MAX_LINK_BYTES,
    MAX_PATH_BYTES,
    RESERVED_SUFFIXES,
    Entry,
    Kind,
)
from .source import REPLACED

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Linux's PATH_MAX, the NUL included: a worker opens each file by its absolute path.
_PATH_MAX = 4096
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

Warn = Callable[[str], None]


@dataclass
class Scan:
    """What a scan found: the entries in manifest order and where each FILE's bytes come from."""

    entries: list[Entry] = field(default_factory=list)
    #: Entry index -> source, for every FILE entry.
    sources: dict[int, FileRef] = field(default_factory=dict)
    #: (printable path, why) for everything skipped with a warning.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    #: Sum of the FILE entries' apparent sizes.
    bytes: int = 0
    #: Sum of the FILE entries' data (extents): what is sent.
    data_bytes: int = 0
    #: ``bytes - data_bytes``: holes, not sent.
    bytes_sparse: int = 0

    def check_unchanged(self) -> None:
        """SourceChangedError (exit 5), naming the first file (in entry order) that vanished,
        was replaced, or whose size, mtime or ctime changed since the scan. By name (lstat),
        no descriptors kept."""
        for index in sorted(self.sources):
            ref = self.sources[index]
            try:
                st = os.lstat(ref.path)
            except OSError:
                name = _printable(ref.path)
                raise SourceChangedError(f"{REPLACED}: {name} was removed or renamed") from None
            if (st.st_dev, st.st_ino) != (ref.dev, ref.ino) or not stat.S_ISREG(st.st_mode):
                name = _printable(ref.path)
                raise SourceChangedError(f"{REPLACED}: {name} names another file now")
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
                ref.size,
                ref.mtime_ns,
                ref.ctime_ns,
            ):
                raise SourceChangedError(
                    f"{_printable(ref.path)} changed during the transfer (size, modification or"
                    " change time);"
                    " send it again once it is stable"
                )


def _printable(path: str) -> str:
    """``path`` for a message: bytes that are not UTF-8 and control characters escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def check_top_name(shown: str, name: str) -> None:
    """UsageError unless ``name`` may be a top-level name at the receiver (``shown``: the PATH
    as the message shows it)."""
    why = bad_name(os.fsencode(name))
    if why is None and name.endswith(RESERVED_SUFFIXES):
        why = "names ending in .stx... are reserved"
    if why is not None:
        raise UsageError(f"{shown}: cannot send it: {why}")


def bad_name(encoded: bytes) -> str | None:
    """Why the receiver would refuse a path component (its bytes), or None."""
    try:
        text = encoded.decode("utf-8")
    except UnicodeDecodeError:
        return "its name is not UTF-8"
    if _CONTROL.search(text):
        return "its name has control characters"
    if len(encoded) > MAX_COMPONENT_BYTES:
        return f"its name is longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def _special(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISCHR(mode):
        return "a character device"
    return "not a regular file, directory or symlink"


def _file_id(real: str, st: os.stat_result) -> bytes:
    # The formula of source.SourceFile.open (surrogateescape only matters for a path that is
    # not UTF-8, which that one cannot encode at all).
    ident = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).digest()[:16]


def _merge(extents: list[tuple[int, int]], cap: int) -> list[tuple[int, int]]:
    """At most ``cap`` extents: the ones separated by the smallest holes merged (the holes'
    zeros are then sent; the result still covers every data byte)."""
    if len(extents) <= cap:
        return extents
    gaps = sorted(
        range(len(extents) - 1),
        key=lambda i: (extents[i + 1][0] - (extents[i][0] + extents[i][1]), i),
    )
    join = set(gaps[: len(extents) - cap])
    out: list[tuple[int, int]] = []
    start, end = extents[0][0], extents[0][0] + extents[0][1]
    for i in range(1, len(extents)):
        off, length = extents[i]
        if i - 1 in join:
            end = off + length
        else:
            out.append((start, end - start))
            start, end = off, off + length
    out.append((start, end - start))
    return out


def _extents(fd: int, size: int, blocks: int, cap: int = MAX_EXTENTS) -> tuple[int, ...]:
    if size <= 0:
        return ()
    if blocks * 512 >= size:  # all of it allocated: no holes
        return (0, size)
    found: list[tuple[int, int]] = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after off
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here
                return (0, size)
            raise
        if start >= size:
            break
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # shrunk under us: the scan's size stands
                raise
            end = size
        if end <= start:
            break
        found.append((start, end - start))
        off = end
    return tuple(x for pair in _merge(found, cap) for x in pair)


def extents_of(fd: int, size: int) -> tuple[int, ...]:
    """The data ranges of the open regular file ``fd`` within its first ``size`` bytes, flat:
    ``(offset, length, offset, length, ...)``, sorted, each length > 0. ``()`` for an empty or
    all-hole file, ``(0, size)`` where the file has no holes or the file system cannot say
    (no SEEK_DATA); at most ``manifest.MAX_EXTENTS`` pairs (the closest ones merged). Moves
    the file offset."""
    return _extents(fd, size, os.fstat(fd).st_blocks)


@dataclass
class _Root:
    given: str  # the PATH as given
    real: str
    name: str


class _Walker:
    def __init__(self, warn: Warn | None) -> None:
        self.scan = Scan()
        self.warn = warn

    def skip(self, display: str, why: str) -> None:
        shown = _printable(display)
        self.scan.skipped.append((shown, why))
        if self.warn is not None:
            self.warn(f"skipping {shown}: {why}")

    def add(self, entry: Entry, source: FileRef | None = None) -> None:
        s = self.scan
        if source is not None:
            s.sources[len(s.entries)] = source
            s.files += 1
            s.bytes += entry.size
            s.data_bytes += entry.data_bytes
        elif entry.kind == Kind.DIR:
            s.dirs += 1
        else:
            s.symlinks += 1
        s.entries.append(entry)

    def file(
        self, rel: str, real: str, st: os.stat_result, extents: tuple[int, ...]
    ) -> tuple[Entry, FileRef]:
        size, mtime = st.st_size, st.st_mtime_ns
        entry = Entry(
            Kind.FILE, rel, size, st.st_mode & 0o777, mtime, "", extents, _file_id(real, st)
        )
        return entry, FileRef(real, st.st_dev, st.st_ino, size, mtime, st.st_ctime_ns)

    def root(self, root: _Root) -> None:
        try:
            st = os.lstat(root.real)
        except OSError as exc:
            raise UsageError(f"{_printable(root.given)}: cannot read: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            self.tree(root, st)
            return
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                raise UsageError(f"{_printable(root.given)} changed while it was being opened")
            raise UsageError(f"{_printable(root.given)} is {_special(st.st_mode)}")
        try:
            fd = os.open(root.real, _FILE_FLAGS)
        except OSError as exc:
            raise _unreadable(root.given, exc) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{_printable(root.given)} changed while it was being opened")
            entry, ref = self.file(root.name, root.real, st, _extents(fd, st.st_size, st.st_blocks))
        except OSError as exc:
            raise _unreadable(root.given, exc) from None
        finally:
            os.close(fd)
        self.add(entry, ref)

    def tree(self, root: _Root, st: os.stat_result) -> None:
        """Walk the directory ``root`` (its entry first), depth first, without recursion: a
        path may be 2,000 directories deep."""
        top = self.listing(root.real, root.name, root.given, (st.st_dev, st.st_ino))
        assert top is not None  # a top-level directory that changed is a UsageError
        self.add(top[0])
        stack = [iter(top[1])]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            if isinstance(item, Entry):
                self.add(item)
            elif isinstance(item, tuple):
                self.add(*item)
            else:
                sub = self.listing(item.real, item.rel, item.display, item.ident)
                if sub is not None:
                    self.add(sub[0])
                    stack.append(iter(sub[1]))

    def listing(
        self, real: str, rel: str, display: str, expect: tuple[int, int]
    ) -> tuple[Entry, list[_Item]] | None:
        """The directory ``real`` opened (not followed), its entry and its children in
        order: entries made now, and subdirectories still to list. None when it is not the
        directory ``expect`` (dev, ino) any more (skipped with a warning; a UsageError for a
        top-level one)."""
        try:
            dfd = os.open(real, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                self.changed(rel, display)
                return None
            raise _unreadable(display, exc) from None
        try:
            st = os.fstat(dfd)
            if (st.st_dev, st.st_ino) != expect:
                self.changed(rel, display)
                return None
            entry = Entry(
                kind=Kind.DIR, path=rel, size=0, mode=st.st_mode & 0o777, mtime_ns=st.st_mtime_ns
            )
            with os.scandir(dfd) as it:
                children = sorted(((os.fsencode(e.name), e) for e in it), key=lambda c: c[0])
            rel_room = MAX_PATH_BYTES - len(rel.encode()) - 1
            real_room = _PATH_MAX - 1 - len(os.fsencode(real)) - 1
            room = (rel_room, real_room, min(rel_room, real_room, MAX_COMPONENT_BYTES))
            prefix = os.path.join(display, "")  # (a display path may end with "/" already)
            items = [self.child(dfd, real, rel, prefix, room, enc, e) for enc, e in children]
        except OSError as exc:
            raise _unreadable(display, exc) from None
        finally:
            os.close(dfd)
        return entry, [i for i in items if i is not None]

    def regular(
        self, dfd: int, name: str, rel: str, real: str, display: str, st: os.stat_result
    ) -> tuple[Entry, FileRef] | None:
        """A regular file of the directory ``dfd`` that its lstat ``st`` describes. Opened
        only when it may have holes (fewer blocks allocated than its size), to find them:
        ten thousand small files cost one ``fstatat`` each, not an open, an fstat and a close.
        What the lstat saw is what the workers must find (they open by name, with O_NOFOLLOW,
        and compare identity and state), so nothing here needs the descriptor to be safe;
        ``access`` keeps an unreadable file an error now rather than in the data phase."""
        if not st.st_size or st.st_blocks * 512 >= st.st_size:
            if not os.access(name, os.R_OK, dir_fd=dfd, follow_symlinks=False):
                raise _unreadable(display, OSError(errno.EACCES, os.strerror(errno.EACCES)))
            return self.file(rel, real, st, (0, st.st_size) if st.st_size else ())
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT):
                self.skip(display, "it changed while it was being scanned")
                return None
            raise _unreadable(display, exc) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.skip(display, "not a regular file any more")
                return None
            return self.file(rel, real, st, _extents(fd, st.st_size, st.st_blocks))
        except OSError as exc:
            raise _unreadable(display, exc) from None
        finally:
            os.close(fd)

    def changed(self, rel: str, display: str) -> None:
        if "/" not in rel:
            raise UsageError(f"{_printable(display)} changed while it was being opened")
        self.skip(display, "it changed while it was being scanned")

    def child(
        self,
        dfd: int,
        dreal: str,
        drel: str,
        dprefix: str,
        room: tuple[int, int, int],
        encoded: bytes,
        e: os.DirEntry[str],
    ) -> _Item | None:
        """One child of the directory open as ``dfd`` (shown as ``dprefix``, "/" included):
        its entry (and source), a _Dir to list later, or None (skipped); ``room`` is how many
        bytes its name may take in the relative path, in the absolute one, and in both and as
        a name."""
        name = e.name
        display = dprefix + name
        # Printable ASCII within every limit, the usual name, needs no closer look.
        if not (encoded.isascii() and name.isprintable() and len(encoded) <= room[2]):
            why = bad_name(encoded)
            if why is None and len(encoded) > room[0]:
                why = f"its path is longer than {MAX_PATH_BYTES} bytes"
            elif why is None and len(encoded) > room[1]:
                why = f"its absolute path is longer than {_PATH_MAX - 1} bytes (PATH_MAX)"
            if why is not None:
                self.skip(display, why)
                return None
        rel = f"{drel}/{name}"
        real = f"{dreal}/{name}"
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            self.skip(display, "it changed while it was being scanned")
            return None
        except OSError as exc:
            raise _unreadable(display, exc) from None
        if stat.S_ISREG(st.st_mode):
            return self.regular(dfd, name, rel, real, display, st)
        if stat.S_ISDIR(st.st_mode):
            return _Dir(real, rel, display, (st.st_dev, st.st_ino))
        if stat.S_ISLNK(st.st_mode):
            try:
                link = os.readlink(name, dir_fd=dfd)
            except OSError as exc:
                raise _unreadable(display, exc) from None
            try:
                text = os.fsencode(link).decode("utf-8")
            except UnicodeDecodeError:
                self.skip(display, "its link text is not UTF-8")
                return None
            if not text or "\0" in text or len(os.fsencode(link)) > MAX_LINK_BYTES:
                self.skip(display, "its link text cannot be sent")
                return None
            return Entry(
                kind=Kind.SYMLINK, path=rel, size=0, mode=0o777, mtime_ns=st.st_mtime_ns, link=text
            )
        self.skip(display, _special(st.st_mode))
        return None


@dataclass
class _Dir:
    """A subdirectory still to be listed."""

    real: str
    rel: str
    display: str
    ident: tuple[int, int]  # (dev, ino) it had when its parent was listed


_Item = Entry | tuple[Entry, FileRef] | _Dir


def _unreadable(display: str, exc: OSError) -> UsageError:
    return UsageError(f"{_printable(display)}: cannot read: {exc.strerror}")


def _roots(paths: Sequence[str | os.PathLike[str]]) -> list[_Root]:
    if not paths:
        raise UsageError("nothing to send: no PATH given")
    roots: list[_Root] = []
    for path in paths:
        given = os.fspath(path)
        shown = _printable(given)
        if not given:
            raise UsageError("an empty PATH")
        try:
            os.stat(given)  # a symlink the user named is followed, here and only here
        except FileNotFoundError:
            raise UsageError(f"{shown}: no such file or directory") from None
        except OSError as exc:
            raise UsageError(f"{shown}: cannot read: {exc.strerror}") from None
        real = os.path.realpath(given)
        name = os.path.basename(real)
        if not name:
            raise UsageError(f"{shown}: cannot send the root directory; name what is under it")
        check_top_name(shown, name)
        roots.append(_Root(given, real, name))
    names: dict[str, _Root] = {}
    for root in roots:
        if root.name in names:
            raise UsageError(
                f"{_printable(names[root.name].given)} and {_printable(root.given)}"
                f" would both arrive as {_printable(root.name)}"
            )
        names[root.name] = root
    # Sorted by components, a path's descendants follow it at once.
    ordered = sorted(roots, key=lambda r: r.real.split("/"))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.real.startswith(a.real + "/"):
            raise UsageError(f"{_printable(b.given)} is inside {_printable(a.given)}: name one")
    return roots


def scan(paths: Sequence[str | os.PathLike[str]], *, warn: Warn | None = None) -> Scan:
    """Walk the PATHs (files or directories) into manifest entries; see the module docstring.
    ``warn`` gets one line per thing skipped. UsageError for a PATH that cannot be sent and
    for anything that cannot be read."""
    walker = _Walker(warn)
    for root in _roots(paths):
        walker.root(root)
    s = walker.scan
    s.bytes_sparse = s.bytes - s.data_bytes
    return s
