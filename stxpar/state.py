"""The receiver's resume state: an append-only, crash-consistent log beside the partial file.

Layout of ``.NAME.stxstate``::

    magic      b"STXSTATE2\\n"                       10 bytes
    u32        header length H
    header     msgpack [name, size, mtime_ns, block_size, file_id]   H bytes
    u32        CRC-32 of the header
    records    u32 seq | 16-byte block digest | u32 CRC-32(seq || digest)   24 bytes each

The header is written to a temporary file, fsynced and renamed into place, so a state file
either has a whole header or does not exist. A record is appended only after the block's bytes
were ``fdatasync``-ed into the partial file, so the log never claims a block that is not on
disk; a record torn by a crash fails its CRC and it and everything after it are ignored (and
cut off when the log is reopened). Parsing is pure (``parse``), so it can be fuzzed.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .errors import StateFileError
from .fsutil import fsync_dir, read_at_most
from .wire import BLOCK_DIGEST_LEN, MAX_BLOCKS, MAX_NAME_BYTES, blocks_for, held_bytes

MAGIC = b"STXSTATE2\n"  # 2: 16-byte XXH3-128 block digests (1 had 32-byte BLAKE3)
_U32 = struct.Struct(">I")
_RECORD = struct.Struct(f">I{BLOCK_DIGEST_LEN}sI")
RECORD_LEN = _RECORD.size
MAX_HEADER = MAX_NAME_BYTES + 256


@dataclass(frozen=True)
class Identity:
    """What makes two runs "the same transfer" (a changed source starts over)."""

    name: str
    size: int
    mtime_ns: int
    block_size: int
    file_id: bytes

    @property
    def total_blocks(self) -> int:
        return blocks_for(self.size, self.block_size)

    def encode(self) -> bytes:
        return msgpack.packb(
            [self.name, self.size, self.mtime_ns, self.block_size, self.file_id], use_bin_type=True
        )


@dataclass
class Parsed:
    identity: Identity
    have: bytearray  # one byte per block: 1 = durable
    digests: bytearray  # BLOCK_DIGEST_LEN bytes per block
    valid_len: int  # bytes of the file that parsed cleanly (where the next record goes)
    #: (st_dev, st_ino) of the file it was loaded from (``load``), so that ``StateLog.reopen``
    #: appends to that very file and not to whatever was swapped in at its name meanwhile.
    inode: tuple[int, int] | None = None
    #: The file was a regular file with one link, owned by us: one this receiver wrote, not a
    #: plant of another local user (only such a log is resumed from).
    ours: bool = False

    @property
    def count(self) -> int:
        return sum(self.have)

    def held_pairs(self) -> list[tuple[int, bytes]]:
        """The blocks recorded, as (index, digest)."""
        return [
            (i, bytes(self.digests[i * BLOCK_DIGEST_LEN : (i + 1) * BLOCK_DIGEST_LEN]))
            for i, v in enumerate(self.have)
            if v
        ]


def encode_header(identity: Identity) -> bytes:
    body = identity.encode()
    return MAGIC + _U32.pack(len(body)) + body + _U32.pack(zlib.crc32(body))


def encode_record(seq: int, digest: bytes) -> bytes:
    head = _U32.pack(seq) + digest
    return head + _U32.pack(zlib.crc32(head))


def parse(data: bytes) -> Parsed:
    """Parse a whole state file; StateFileError if the header is unusable. Torn tails are fine."""
    ident, pos = parse_header(data)
    total = ident.total_blocks
    have = bytearray(total)
    digests = bytearray(total * BLOCK_DIGEST_LEN)
    while pos + RECORD_LEN <= len(data):
        seq, digest, rcrc = _RECORD.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + 4 + BLOCK_DIGEST_LEN]) != rcrc or seq >= total:
            break
        have[seq] = 1
        digests[seq * BLOCK_DIGEST_LEN : (seq + 1) * BLOCK_DIGEST_LEN] = digest
        pos += RECORD_LEN
    return Parsed(ident, have, digests, pos)


def parse_header(data: bytes) -> tuple[Identity, int]:
    """The identity in a state file's header and where its records start; StateFileError if the
    header is unusable."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise StateFileError("not an stx state file")
    (hlen,) = _U32.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + 4
    if hlen > MAX_HEADER or len(data) < start + hlen + 4:
        raise StateFileError("damaged state header")
    body = data[start : start + hlen]
    (crc,) = _U32.unpack_from(data, start + hlen)
    if zlib.crc32(body) != crc:
        raise StateFileError("damaged state header")
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException):
        raise StateFileError("damaged state header") from None
    if not (isinstance(fields, list) and len(fields) == 5):
        raise StateFileError("damaged state header")
    name, size, mtime, bs, fid = fields
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (size, mtime, bs))
    if not (isinstance(name, str) and ints_ok and isinstance(fid, bytes)):
        raise StateFileError("damaged state header")
    if len(fid) != 16 or bs <= 0 or size < 0:
        raise StateFileError("damaged state header")
    ident = Identity(name, size, mtime, bs, fid)
    if ident.total_blocks > MAX_BLOCKS:
        raise StateFileError("damaged state header")
    return ident, start + hlen + 4


#: Bytes of a state file read before its header is known (the largest header that parses).
HEAD_LEN = len(MAGIC) + 4 + MAX_HEADER + 4


def max_log_len(identity: Identity, header_end: int) -> int:
    """The most bytes of a log worth reading: its header and two records per block (a block
    resent after a reconnect is recorded again). Records past this are ignored (and cut off on
    reopen): the log then claims fewer blocks, never more."""
    return header_end + 2 * max(identity.total_blocks, 1) * RECORD_LEN


class StateLog:
    """An open state log for one transfer; ``append`` after the data is durable."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, path: Path, identity: Identity) -> StateLog:
        tmp = path.with_name(path.name + ".tmp")
        # Whatever has the temporary name (a hard link planted there, a FIFO) is unlinked,
        # never opened: the new inode is ours alone.
        _unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE_OPEN, 0o600)
        try:
            header = encode_header(identity)
            if os.write(fd, header) != len(header):
                raise OSError(errno.EIO, "short write of the state header")
            os.fsync(fd)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.lseek(fd, 0, os.SEEK_END)
        return cls(path, fd)

    @classmethod
    def rewrite(cls, path: Path, identity: Identity, records: list[tuple[int, bytes]]) -> StateLog:
        """Replace the log by one that holds exactly ``records``. The new header replaces the
        old file atomically and the records follow: a crash in between leaves a log that
        claims fewer blocks, never more."""
        log = cls.create(path, identity)
        if records:
            log.append(records)
        return log

    @classmethod
    def reopen(cls, path: Path, parsed: Parsed) -> StateLog:
        """Append to the log ``parsed`` came from (``load``); OSError if ``path`` is no longer
        that file, or not one of ours."""
        fd = os.open(path, os.O_WRONLY | _SAFE_OPEN)
        try:
            st = os.fstat(fd)
            if not _is_ours(st) or (st.st_dev, st.st_ino) != parsed.inode:
                raise OSError(errno.ESTALE, "the state log was replaced")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, parsed.valid_len)  # drop a torn tail before appending after it
        os.lseek(fd, parsed.valid_len, os.SEEK_SET)
        return cls(path, fd)

    def append(self, records: list[tuple[int, bytes]]) -> None:
        data = b"".join(encode_record(seq, digest) for seq, digest in records)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def load(path: Path) -> Parsed | None:
    """The parsed state at ``path``, or None when it is missing or unusable.

    Safe against what another local user may plant at the name: a symlink is not followed
    (``/dev/zero`` would be read forever), a FIFO does not block the ``open``, anything but a
    regular file is unusable, and no more is read than a valid log of its header can hold."""
    try:
        fd = os.open(path, os.O_RDONLY | _SAFE_OPEN)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        head = read_at_most(fd, HEAD_LEN)
        ident, end = parse_header(head)
        limit = max_log_len(ident, end)
        data = head + read_at_most(fd, limit - len(head)) if len(head) < limit else head[:limit]
        parsed = parse(data)
    except (OSError, StateFileError):
        return None
    finally:
        os.close(fd)
    parsed.inode = (st.st_dev, st.st_ino)
    parsed.ours = _is_ours(st)
    return parsed


#: Never through a symlink, never blocking on a FIFO, never inherited by a worker.
_SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _is_ours(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass(frozen=True)
class Partial:
    """A partial transfer left in a destination directory."""

    name: str
    size: int
    have_bytes: int
    blocks_have: int
    blocks_total: int
    age_s: float
    files: tuple[Path, ...]
    #: a directory tree's staging directory (its size is not known: ``size`` is 0)
    tree: bool = False


def find_partials(dest: Path, *, part_suffix: str, state_suffix: str, now: float) -> list[Partial]:
    """Every ``.NAME.stxpart`` / ``.NAME.stxstate`` pair (or orphan) in ``dest``.

    Nothing is followed or opened but the state logs (through ``load``: bounded, never
    blocking); an entry that vanishes while being looked at is left out."""
    names: dict[str, list[Path]] = {}
    for entry in dest.iterdir():
        for suffix in (part_suffix, state_suffix, state_suffix + ".tmp"):
            n = entry.name
            if n.startswith(".") and n.endswith(suffix) and len(n) > len(suffix) + 1:
                names.setdefault(n[1 : -len(suffix)], []).append(entry)
                break
    found = []
    for name, files in sorted(names.items()):
        parsed = load(dest / f".{name}{state_suffix}")
        stamps = []
        for f in files:
            try:
                stamps.append(f.lstat().st_mtime)
            except OSError:
                pass
        newest = max(stamps, default=now)
        if parsed is None:
            size = have_bytes = have = total = 0
        else:
            ident = parsed.identity
            size, total, have = ident.size, ident.total_blocks, parsed.count
            have_bytes = held_bytes(parsed.have, size=ident.size, block_size=ident.block_size)
        found.append(Partial(name, size, have_bytes, have, total, now - newest, tuple(files)))
    return found
