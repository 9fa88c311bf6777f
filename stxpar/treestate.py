"""The resume log of a tree transfer: which blocks of which files are durable, which files are
in place. It lives in the tree's staging directory (``stxpar.treefiles``) as ``state``.

Layout::

    magic      b"STXTREE1\\n"                                 9 bytes
    u32        header length H
    header     msgpack [roots (array of str), block_size]     H bytes
    u32        CRC-32 of the header
    records    29 bytes each:
               u8 type | u32 n | u32 index | 16 bytes | u32 CRC-32 of the 25 bytes before it

    type 1 ENTRY  file number n is the FILE entry whose key (``Manifest.key``) is the 16 bytes;
                  numbers are given out in order 0, 1, 2, ... (index and nothing else: 0)
    type 2 BLOCK  block ``index`` of file n (counted within the file) is durable in its partial,
                  its digest is the 16 bytes (a block recorded again: the last digest wins)
    type 3 DONE   file n is complete and was renamed to its final path (index 0, 16 zero bytes)

Files are named by their key, not by their position in the manifest, and blocks by their
index within the file: a resend of a tree in which some files changed (other keys) keeps what
is held of every unchanged file.

The header and any rewrite go through a temporary file (``state.tmp``), fsynced and renamed
into place, so a log either has a whole header or does not exist. A record is appended only
after what it claims is durable (the block ``fdatasync``-ed, the file renamed and its
directory fsynced); a record torn by a crash, or one that does not fit (a bad CRC, an unknown
type, a number out of order, a block of a file never named), ends the log: it and everything
after it are ignored. ``parse`` is pure and total: a ``Parsed`` or StateFileError.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgpack

from .errors import StateFileError
from .fsutil import read_at_most
from .wire import BLOCK_DIGEST_LEN, MAX_BLOCKS

MAGIC = b"STXTREE1\n"
NAME = "state"
TMP_NAME = "state.tmp"
ENTRY, BLOCK, DONE = 1, 2, 3
_U32 = struct.Struct(">I")
_BODY = struct.Struct(f">BII{BLOCK_DIGEST_LEN}s")
_RECORD = struct.Struct(f">BII{BLOCK_DIGEST_LEN}sI")
RECORD_LEN = _RECORD.size
#: The largest header read: a million roots would not fit, but 255-byte names by the
#: thousand do (the manifest's own limits bound what a real tree can have).
MAX_HEADER = 1 << 24
MAX_BLOCK_SIZE = 1 << 32
_NO_DIGEST = bytes(BLOCK_DIGEST_LEN)


@dataclass(frozen=True)
class Header:
    roots: tuple[str, ...]
    block_size: int

    def encode(self) -> bytes:
        body = msgpack.packb([list(self.roots), self.block_size], use_bin_type=True)
        return MAGIC + _U32.pack(len(body)) + body + _U32.pack(zlib.crc32(body))


@dataclass
class FileState:
    """What the log says of one file (by key)."""

    blocks: dict[int, bytes] = field(default_factory=dict)
    done: bool = False


@dataclass
class Parsed:
    header: Header
    #: key -> state, in the order the log named them
    files: dict[bytes, FileState]
    #: bytes of the log that parsed cleanly
    valid_len: int


def encode_record(kind: int, n: int, index: int = 0, data: bytes = _NO_DIGEST) -> bytes:
    body = _BODY.pack(kind, n, index, data)
    return body + _U32.pack(zlib.crc32(body))


def parse_header(data: bytes) -> tuple[Header, int]:
    """The header of a log and where its records start; StateFileError if it is unusable."""
    start = len(MAGIC) + 4
    if not data.startswith(MAGIC) or len(data) < start:
        raise StateFileError("not an stx tree state file")
    (hlen,) = _U32.unpack_from(data, len(MAGIC))
    if hlen > MAX_HEADER or len(data) < start + hlen + 4:
        raise StateFileError("damaged tree state header")
    body = data[start : start + hlen]
    (crc,) = _U32.unpack_from(data, start + hlen)
    if zlib.crc32(body) != crc:
        raise StateFileError("damaged tree state header")
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException):
        raise StateFileError("damaged tree state header") from None
    if not (isinstance(fields, list) and len(fields) == 2):
        raise StateFileError("damaged tree state header")
    roots, bs = fields
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise StateFileError("damaged tree state header")
    if not isinstance(bs, int) or isinstance(bs, bool) or not 0 < bs <= MAX_BLOCK_SIZE:
        raise StateFileError("damaged tree state header")
    return Header(tuple(roots), bs), start + hlen + 4


def parse(data: bytes) -> Parsed:
    """Parse a whole log; StateFileError if the header is unusable. A bad tail is ignored."""
    header, pos = parse_header(data)
    files: dict[bytes, FileState] = {}
    by_n: list[FileState] = []
    while pos + RECORD_LEN <= len(data):
        kind, n, index, payload, crc = _RECORD.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + _BODY.size]) != crc:
            break
        if kind == ENTRY:
            if n != len(by_n) or index != 0 or payload in files:
                break
            state = FileState()
            files[payload] = state
            by_n.append(state)
        elif kind == BLOCK:
            if n >= len(by_n) or index >= MAX_BLOCKS:
                break
            by_n[n].blocks[index] = payload
        elif kind == DONE:
            if n >= len(by_n) or index != 0 or payload != _NO_DIGEST:
                break
            by_n[n].done = True
        else:
            break
        pos += RECORD_LEN
    return Parsed(header, files, pos)


def encode_files(files: Iterable[tuple[bytes, Sequence[tuple[int, bytes]], bool]]) -> bytes:
    """Records that name each ``(key, [(index, digest)...], done)`` as files 0, 1, ..."""
    out = []
    for n, (key, blocks, done) in enumerate(files):
        out.append(encode_record(ENTRY, n, 0, key))
        out.extend(encode_record(BLOCK, n, index, digest) for index, digest in blocks)
        if done:
            out.append(encode_record(DONE, n))
    return b"".join(out)


def read(dir_fd: int, limit: int) -> tuple[bytes, os.stat_result] | None:
    """At most ``limit`` bytes of the log in the directory open at ``dir_fd`` and its fstat,
    or None if there is none or it is not a regular file (a symlink is not followed, a FIFO
    does not block)."""
    try:
        fd = os.open(NAME, os.O_RDONLY | _SAFE_OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    try:
        st = os.fstat(fd)
        if not _is_regular(st):
            return None
        return read_at_most(fd, limit), st
    finally:
        os.close(fd)


class TreeStateLog:
    """The open log: ``append`` writes records and ``fdatasync``-s them."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def write(cls, dir_fd: int, header: Header, records: bytes = b"") -> TreeStateLog:
        """A new log with ``header`` and ``records`` in place of whatever was there
        (temporary file, fsync, rename, fsync of the directory)."""
        _unlink(TMP_NAME, dir_fd)  # whatever is there (a hard link, a FIFO) is never opened
        fd = os.open(
            TMP_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE_OPEN, 0o600, dir_fd=dir_fd
        )
        try:
            os.set_blocking(fd, True)
            _write_all(fd, header.encode() + records)
            os.fsync(fd)
            os.rename(TMP_NAME, NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except BaseException:
            os.close(fd)
            _unlink(TMP_NAME, dir_fd)
            raise
        return cls(fd)

    def append(self, records: bytes) -> None:
        if records:
            _write_all(self._fd, records)
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


#: Never through a symlink, never blocking on a FIFO, never inherited by a worker.
_SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
