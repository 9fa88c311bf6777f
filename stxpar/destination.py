"""The destination directory: safe names, the files of a transfer in it, their locks, finishing.

Theory of operation
-------------------
For a peer's file ``NAME`` the receiver uses these entries of the destination ``DEST``::

    NAME                 the finished file (replaced by a rename, only after a whole-file check)
    .NAME.stxpart        the partial file, preallocated, mode 0600 until it is finished
    .NAME.stxstate       the resume log (``stxpar.state``), and ``.NAME.stxstate.tmp`` while a
                         new log's header is being written
    .NAME.stxlock        an empty lock file, ``flock``-ed by the receiver that owns NAME

Who else can write into ``DEST`` matters (docs/threat-model.md, "a local user who can write into
the destination"). Such a user can plant any kind of entry at those names before or during a
transfer: a symlink (to a victim file, or to ``/dev/zero``), a FIFO (an ``open`` blocks), a hard
link to a victim file (``O_NOFOLLOW`` does not see it), a directory at the final name. Every
function here therefore:

* opens with ``O_NOFOLLOW | O_NONBLOCK`` and checks what it got with ``fstat`` (a regular file,
  one link, ours) before reading or writing it; reads are bounded;
* creates a file only after unlinking whatever had its name, with ``O_CREAT | O_EXCL |
  O_NOFOLLOW`` (the new inode is ours and has nothing else linked to it);
* names what it later renames by ``(st_dev, st_ino)`` as well as by path, and checks the path
  still leads to that inode before and after the rename.

The per-name lock serialises receivers (processes) that share one destination: a receiver holds
``flock(LOCK_EX)`` on ``.NAME.stxlock`` from admission until the transfer ends, then unlinks the
lock file while still holding it. A second receiver that finds the lock held refuses the sender
with a retryable error (``ConnectError``: the sender backs off and tries again). The classic
race of unlinked lock files (a waiter locks an inode that was just unlinked) is closed by
checking, once the lock is taken, that the path still names the locked inode.

A destination that other users can write is refused by default (``check_dest``): nothing here
can stop such a user from deleting or renaming files, and the checks above only keep the
receiver from being turned against files outside the destination.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConnectError, RejectedError, StxError, UsageError
from .fsutil import fsync_dir
from .state import Partial, find_partials
from .wire import printable

PART_SUFFIX = ".stxpart"
STATE_SUFFIX = ".stxstate"
LOCK_SUFFIX = ".stxlock"
#: Flags for every open of a file in the destination: never through a symlink, never blocking
#: on a FIFO, never inherited by a worker.
SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def safe_name(name: str) -> str:
    """The peer's file name reduced to a safe base name, or RejectedError."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not base or base in (".", "..") or base.startswith("."):
        raise RejectedError(f"refusing unsafe file name {name[:80]!r}")
    # No control or format characters at all (C0, DEL, C1, bidi overrides...): the name ends up
    # in log lines and terminals.
    if not base.isprintable() or len(base.encode()) > 255:
        raise RejectedError(f"refusing unsafe file name {name[:80]!r}")
    return base


@dataclass(frozen=True)
class Names:
    """The entries one transfer of ``name`` uses in ``dest``."""

    name: str
    final: Path
    part: Path
    state: Path
    lock: Path

    @classmethod
    def of(cls, dest: Path, name: str) -> Names:
        return cls(
            name=name,
            final=dest / name,
            part=dest / f".{name}{PART_SUFFIX}",
            state=dest / f".{name}{STATE_SUFFIX}",
            lock=dest / f".{name}{LOCK_SUFFIX}",
        )


# ---------------------------------------------------------------- the directory itself


def shared_reason(dest: Path) -> str | None:
    """Why other users can write into ``dest`` (and so plant files there), or None.

    Other-writable (sticky or not: ``/tmp`` counts), group-writable by a group that has other
    members than us (a user-private group, the usual owner of directories made under umask 002,
    has none), or owned by another user than the one the receiver runs as (the owner can always
    change the mode back)."""
    st = os.stat(dest)
    mode = stat.S_IMODE(st.st_mode)
    sticky = ", sticky" if mode & stat.S_ISVTX else ""
    if mode & stat.S_IWOTH:
        return f"other users can write into it (mode {mode:04o}{sticky})"
    if mode & stat.S_IWGRP and not _group_is_only_us(st.st_gid):
        return f"its group (gid {st.st_gid}) can write into it (mode {mode:04o}{sticky})"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this receiver's uid {os.geteuid()}"
    return None


def _group_is_only_us(gid: int) -> bool:
    """Whether nobody but this receiver's user belongs to group ``gid`` (as a listed member or
    by its primary group), as far as the user database says; False when it cannot be told."""
    try:
        import grp
        import pwd

        me = os.geteuid()
        my_name = pwd.getpwuid(me).pw_name
        if any(member != my_name for member in grp.getgrgid(gid).gr_mem):
            return False
        return all(p.pw_uid == me for p in pwd.getpwall() if p.pw_gid == gid)
    except (ImportError, KeyError, OSError):
        return False


def check_dest(dest: Path, *, allow_shared: bool) -> str | None:
    """UsageError unless ``dest`` is a writable directory that only we can write into; with
    ``allow_shared``, a shared one is accepted and the warning to show is returned."""
    if not dest.exists():
        raise UsageError(f"destination {dest} does not exist")
    if not dest.is_dir():
        raise UsageError(f"destination {dest} is not a directory")
    if not os.access(dest, os.W_OK | os.X_OK):
        raise UsageError(f"destination {dest} is not writable")
    reason = shared_reason(dest)
    if reason is None:
        return None
    if not allow_shared:
        raise UsageError(
            f"destination {dest} is shared: {reason}; another user could plant or swap files"
            " there (use a private directory, or --allow-shared-dest to accept the risk)"
        )
    return (
        f"destination {dest} is shared ({reason}): another user can delete, replace or read"
        " what arrives there"
    )


# ---------------------------------------------------------------- files


def is_ours(st: os.stat_result) -> bool:
    """A regular file with one link, owned by us: one we created (or may trust as such)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def create_exclusive(path: Path, *, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    """A new, empty file at ``path`` that nothing else links to; its descriptor.

    Whatever had the name (a planted symlink, hard link, FIFO) is unlinked first; a plant
    that reappears in between makes ``O_EXCL`` fail (EEXIST) rather than being written."""
    unlink(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | SAFE_OPEN, mode)


def open_ours(path: Path, flags: int = os.O_RDONLY) -> tuple[int, os.stat_result] | None:
    """Open a file the receiver made earlier, or None if what is there is not such a file
    (missing, a symlink, a FIFO or device, a hard link, another user's)."""
    try:
        fd = os.open(path, flags | SAFE_OPEN)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not is_ours(st):
        os.close(fd)
        return None
    return fd, st


def create_partial(path: Path, size: int, *, allocate: bool = True) -> os.stat_result:
    """Create the partial file at its full size, its blocks allocated (``posix_fallocate``):
    no fragmentation, and a disk that cannot hold it says so now. Returns its ``fstat`` (the
    caller reopens it and checks it is this very inode).

    Not on tmpfs, where the file is only sized: preallocating there allocates every page up
    front, serially, before the first block may arrive (0.2 s per 2 GiB on the 2-core test
    machine), for nothing a RAM file system needs. The free-space check before this call still
    refuses a file that cannot fit; a tmpfs that fills up later fails a write cleanly. Nor for
    a sparse file (``allocate`` False): its holes stay holes.
    """
    fd = create_exclusive(path)
    try:
        if size and (not allocate or is_tmpfs(fd)):
            os.ftruncate(fd, size)
        elif size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                os.ftruncate(fd, size)  # a filesystem without fallocate
        return os.fstat(fd)
    except BaseException:
        os.close(fd)
        fd = -1
        unlink(path)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def make_subdir(dest: Path, subdir: str) -> Path:
    """``dest/subdir`` (``stx send --to``), its missing directories made (mode 0777 & ~umask,
    as ``mkdir -p``), walked one component at a time from ``dest`` without following a
    symlink: a symlink, a file or anything but a directory on the way is a RejectedError and
    nothing is made past it. ``subdir`` was checked already (``manifest.check_subdir``)."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise disk_error(exc, "cannot open the destination") from None
    try:
        walked: list[str] = []
        for name in subdir.split("/"):
            walked.append(name)
            try:
                os.mkdir(name, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise disk_error(exc, f"cannot make {printable('/'.join(walked))}") from None
            try:
                sub = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise RejectedError(
                        f"cannot land in {printable(subdir)}: {printable('/'.join(walked))}"
                        " is not a directory (a symlink or a file is in the way)"
                    ) from None
                raise disk_error(exc, f"cannot open {printable('/'.join(walked))}") from None
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)
    return dest / subdir


def check_final(final: Path) -> None:
    """RejectedError unless the final name is free or holds something a rename may replace
    (a regular file or a symlink: the rename replaces the link, never its target)."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RejectedError(f"cannot check {final.name}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return
    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise RejectedError(f"{final.name} already exists in the destination and is {kind}")


def finish(names: Names, fd: int, *, mode: int, mtime_ns: int) -> None:
    """Give the partial file open at ``fd`` its final name, then its mode and mtime.

    OSError from the file system; RejectedError if the partial path no longer leads to the
    inode at ``fd`` (deleted, or replaced by someone else) before or after the rename: the
    sender is never told "received" for a file that is not what it sent. The mode changes only
    once the rename succeeded, on the renamed inode itself."""
    os.fsync(fd)
    mine = inode(os.fstat(fd))
    try:
        there = inode(os.lstat(names.part))
    except FileNotFoundError:
        there = None
    if there != mine:
        raise PartialGone(f"the partial file of {names.name} was removed or replaced meanwhile")
    check_final(names.final)
    os.replace(names.part, names.final)
    try:
        landed = inode(os.lstat(names.final))
    except FileNotFoundError:
        landed = None
    if landed != mine:
        raise PartialGone(f"{names.name} was replaced in the destination while it was renamed")
    os.fchmod(fd, mode)  # the partial was private until now
    os.utime(fd, ns=(time.time_ns(), mtime_ns))  # keep the source's mtime
    os.fsync(fd)
    fsync_dir(names.final.parent)


class PartialGone(RejectedError):
    """The partial file is not (or no longer) the inode the receiver wrote into."""


def partial_still_there(part: Path, fd: int) -> bool:
    """Whether ``part`` still names the inode open at ``fd``."""
    if fd < 0:
        return False
    try:
        return inode(os.lstat(part)) == inode(os.fstat(fd))
    except OSError:
        return False


def size_of(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except OSError:
        return -1


def disk_error(exc: OSError, what: str) -> StxError:
    """The error an ``OSError`` on the destination stands for: out of descriptors is a
    retryable "receiver busy" (ConnectError: the sender backs off and comes back); everything
    else is a refusal, worded for a full disk where it is one."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return ConnectError(f"receiver busy: {what}: out of file descriptors; try again shortly")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RejectedError(f"{what}: the receiver's disk is full ({exc.strerror})")
    return RejectedError(f"{what}: {exc.strerror}")


_TMPFS_MAGIC = 0x01021994


def is_tmpfs(fd: int) -> bool:
    """Whether ``fd`` lives on tmpfs (Linux ``fstatfs``; False wherever that cannot be told)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on 64-bit Linux)
        if libc.fstatfs(fd, buf) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return ctypes.c_long.from_buffer(buf).value == _TMPFS_MAGIC  # f_type is the first field


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def unlink(path: Path) -> None:
    """Remove the entry ``path`` (never what a symlink there points to); quiet if it cannot."""
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------- the per-name lock


class NameLock:
    """``flock(LOCK_EX)`` on ``.NAME.stxlock``, held by one receiver from admission to the end
    of the transfer. ``acquire`` raises ConnectError (retryable) while another receiver holds
    it; ``release`` unlinks the lock file (while still holding it) and closes it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def try_acquire(cls, path: Path) -> NameLock | None:
        """The lock, or None while someone else holds it; OSError if it cannot be made."""
        for _ in range(8):
            fd = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    # No flock on this file system (some network ones): within one receiver
                    # names are still exclusive; across receivers they are not (documented).
                    return cls(path, _open_lock_file(path))
                raise
            try:
                same = inode(os.lstat(path)) == inode(os.fstat(fd))
            except OSError:
                same = False
            if same:
                return cls(path, fd)
            os.close(fd)  # locked an inode its holder unlinked meanwhile: take the new one
        raise OSError(errno.EAGAIN, "the lock file keeps changing")

    @classmethod
    def acquire(cls, dest: Path, name: str) -> NameLock:
        path = Names.of(dest, name).lock
        try:
            lock = cls.try_acquire(path)
        except OSError as exc:
            raise disk_error(exc, f"cannot lock {name} in the destination") from None
        if lock is None:
            raise ConnectError(
                f"{name} is being received into this destination by another receiver;"
                " try again later"
            )
        return lock

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            if inode(os.lstat(self.path)) == inode(os.fstat(self._fd)):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1


def _open_lock_file(path: Path) -> int:
    """Open (creating if need be) the lock file; a plant there (symlink, FIFO, hard link,
    another user's file) is removed and replaced by a file of our own. The lock file is never
    written, so even a plant that survives could not be harmed."""
    for _ in range(8):
        try:
            return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | SAFE_OPEN, 0o600)
        except FileExistsError:
            pass
        got = open_ours(path)
        if got is not None:
            return got[0]
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise OSError(errno.EISDIR, "a directory has the lock file's name")
        except FileNotFoundError:
            continue
        unlink(path)
    raise OSError(errno.EAGAIN, "the lock file keeps changing")


# ---------------------------------------------------------------- partials left behind


def list_partials(dest: str | os.PathLike[str]) -> list[Partial]:
    """Partial transfers in ``dest`` (what a resume would continue)."""
    path = Path(dest)
    if not path.is_dir():
        raise UsageError(f"destination {path} is not a directory")
    return find_partials(path, part_suffix=PART_SUFFIX, state_suffix=STATE_SUFFIX, now=time.time())


def purge_partials(dest: str | os.PathLike[str], *, older_than_s: float) -> list[Partial]:
    """Remove partial transfers untouched for ``older_than_s`` seconds; return them.

    A name a receiver is working on right now (its lock is held) is left alone, however old its
    files look; the lock files of receivers that died are removed with their partials. Entries
    are unlinked, never followed; a directory at one of these names is left in place."""
    path = Path(dest)
    removed = []
    for partial in list_partials(path):
        if partial.age_s < older_than_s:
            continue
        try:
            lock = NameLock.try_acquire(Names.of(path, partial.name).lock)
        except OSError:
            continue
        if lock is None:
            continue  # in use by a live receiver
        try:
            for f in partial.files:
                try:
                    if not stat.S_ISDIR(os.lstat(f).st_mode):
                        os.unlink(f)
                except OSError:
                    pass
        finally:
            lock.release()
        removed.append(partial)
    for entry in path.iterdir():
        # Lock files alone: left by a receiver that was killed (nobody holds them).
        n = entry.name
        if n.startswith(".") and n.endswith(LOCK_SUFFIX) and len(n) > len(LOCK_SUFFIX) + 1:
            try:
                age = time.time() - os.lstat(entry).st_mtime
            except OSError:
                continue
            if age < older_than_s:
                continue
            try:
                stale = NameLock.try_acquire(entry)
            except OSError:
                continue
            if stale is not None:
                stale.release()
    return removed
