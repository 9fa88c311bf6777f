"""The sender's source: the file a transfer was built from, pinned, and proved again by workers.

Theory of operation
-------------------
Whoever can rename entries in the source's directory can put another file, or a symlink to
one, under its name after the checks; a process that opened the name again would send that
file and the run would report success. So the coordinator resolves the name once
(``SourceFile.open``: a symlink the user named is followed now and never again), opens the
resolved path with O_NOFOLLOW and records what it opened: (st_dev, st_ino) say which file,
size, mtime and ctime what it held (``SourceFile.ref()``, a ``messages.FileRef``). Each worker
opens that path with O_NOFOLLOW and must find the same identity and state (``open_source``);
``SourceFile.check_unchanged`` compares the descriptor and the name again before each session
and before END. A file that changed or was replaced fails with ``SourceChangedError`` (exit 5)
before the receiver renames a copy into place.

This module is imported by the workers too: it keeps its imports small.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceChangedError, UsageError
from .fileref import FileRef

#: What is said when the file at the source's name is not the one the transfer was built from.
REPLACED = "the source file was replaced during the transfer"


def _changed(name: object) -> str:
    return (
        f"{name} changed during the transfer (size, modification or change time);"
        " send it again once it is stable"
    )


def _check_kind(p: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise UsageError(f"{p} is a directory (stx sends one file)")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{p} is not a regular file")


@dataclass
class SourceFile:
    """The file a transfer was built from, pinned by the descriptor the coordinator opened.

    ``path`` is the name as given (the receiver gets its last component), ``real`` the name
    resolved once; ``close`` releases the descriptor.
    """

    path: Path
    real: str
    fd: int
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    file_id: bytes

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SourceFile:
        p = Path(path)
        real = os.path.realpath(p)
        try:
            _check_kind(p, os.stat(real).st_mode)  # never open a device or a FIFO at all
            # O_NONBLOCK: should a FIFO be put there now, the open must not hang on it.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"{p}: no such file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink appeared after realpath() resolved it
                raise UsageError(f"{p} changed while it was being opened") from None
            raise UsageError(f"{p}: cannot read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            _check_kind(p, st.st_mode)  # what was opened is what counts
        except BaseException:
            os.close(fd)
            raise
        # ctime too: a rewrite that puts the old mtime back still changes ctime, so a resume
        # never mixes blocks of two versions of the file (docs/resume.md).
        ident = (
            f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        ).encode()
        return cls(
            path=p,
            real=real,
            fd=fd,
            dev=st.st_dev,
            ino=st.st_ino,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            file_id=hashlib.sha256(ident).digest()[:16],
        )

    def ref(self) -> FileRef:
        """What a worker needs to open this very file (``open_source``)."""
        return FileRef(
            path=self.real,
            dev=self.dev,
            ino=self.ino,
            size=self.size,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.ctime_ns,
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_unchanged(self) -> None:
        """SourceChangedError (exit 5) unless the opened file still has the size, mtime and
        ctime it had when the transfer was built, and its name (as given, and as resolved
        then) still names it."""
        # The name first: replacing it unlinks the file, which changes its ctime too, and
        # "replaced" is the better answer then.
        for name, follow in ((self.real, False), (os.fspath(self.path), True)):
            try:
                cur = os.stat(name, follow_symlinks=follow)
            except OSError:
                raise SourceChangedError(
                    f"{REPLACED}: {self.path} was removed or renamed"
                ) from None
            if (cur.st_dev, cur.st_ino) != (self.dev, self.ino):
                raise SourceChangedError(f"{REPLACED}: {self.path} names another file now")
        try:
            st = os.fstat(self.fd)
        except OSError as exc:
            raise SourceChangedError(
                f"{self.path}: cannot check the source: {exc.strerror}"
            ) from None
        _check_state(st, self, self.path)


_SOURCE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _check_state(st: os.stat_result, pinned: FileRef | SourceFile, name: object) -> None:
    """SourceChangedError (exit 5, naming ``name``) unless ``st`` has the size, mtime and
    ctime ``pinned`` recorded."""
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
        pinned.size,
        pinned.mtime_ns,
        pinned.ctime_ns,
    ):
        raise SourceChangedError(_changed(name))


def check_read(fd: int, ref: FileRef) -> None:
    """After a read through ``fd`` (a descriptor ``open_source`` gave): SourceChangedError
    (exit 5) unless the file's size, mtime and ctime are still the ones pinned when it was
    scanned. Any write since then changes its ctime, so a block is never sent from a file
    that changed before it was read, and a file's blocks, whichever worker read which, all
    come from the one version the manifest describes."""
    _check_state(os.fstat(fd), ref, ref.path)


def read_whole(ref: FileRef, into: memoryview) -> None:
    """Read the whole small file ``ref`` (``len(into)`` bytes, its size) into ``into``: opened
    as ``open_source`` does, read, and only then proved to be the pinned file in its pinned
    state (one ``fstat`` for both checks; what was read is dropped with the exception):
    SourceChangedError (exit 5) if it is not, or shrank."""
    path = ref.path
    fd = _open(path)
    try:
        try:
            got = os.preadv(fd, [into], 0)
        except OSError:
            _check_identity(os.fstat(fd), ref, path)  # a directory, a FIFO... swapped in
            raise
        st = os.fstat(fd)
        _check_identity(st, ref, path)
        _check_state(st, ref, path)
        if got != len(into):
            raise SourceChangedError("a source file shrank during the transfer")
    finally:
        os.close(fd)


def _open(path: str) -> int:
    """``path`` opened for reading, never through a symlink as its last component, never
    blocking on a FIFO; SourceChangedError (exit 5) if it cannot be."""
    try:
        return os.open(path, _SOURCE_FLAGS)
    except OSError as exc:
        raise SourceChangedError(f"{REPLACED} ({path}: {exc.strerror})") from None


def _check_identity(st: os.stat_result, ref: FileRef, path: str) -> None:
    if (st.st_dev, st.st_ino) != (ref.dev, ref.ino) or not stat.S_ISREG(st.st_mode):
        raise SourceChangedError(f"{REPLACED} ({path} names another file now)")


def open_source(ref: FileRef) -> int:
    """Open the source the coordinator resolved and pinned (in a worker), and prove it is that
    file: a descriptor, or SourceChangedError (exit 5) before a byte of it is read.

    The coordinator's checks were made on its own descriptor; this process opens the file
    again, by name, later. O_NOFOLLOW refuses a symlink as the last component (the coordinator
    already resolved the one the user may have named), and the identity and state of what was
    opened must be the coordinator's."""
    path = ref.path
    fd = _open(path)
    try:
        st = os.fstat(fd)
        _check_identity(st, ref, path)
        _check_state(st, ref, path)
    except BaseException:
        os.close(fd)
        raise
    return fd
