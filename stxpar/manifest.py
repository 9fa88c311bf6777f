"""The manifest of a transfer (``stx3``): its entries, their codec, and the receiver's checks.

Theory of operation
-------------------
A transfer moves a list of entries: regular files, directories and symlinks, each with a
relative "/"-separated path. The sender walks its PATHs depth first (parents before their
children, the children of a directory sorted by their UTF-8 bytes) and sends the entries after
the handshake: the transfer ``Header`` in METADATA, then the entries in MANIFEST frames of at
most ``MAX_CHUNK_ENTRIES`` entries and ``MAX_CHUNK_BYTES`` bytes (``chunks``), so that a
million-entry tree never needs one giant message.

The receiver feeds each MANIFEST payload to a ``Builder``, which decodes it with strict types
and checks every entry before anything is created: the path (UTF-8, relative, no empty, "." or
".." component, no control character, not a reserved name at the top), its place (its parent
is a directory that came earlier: so no duplicate and nothing below a file or a symlink), the
fields of its kind, and the receiver's limits (``--max-files``, ``--max-bytes``, the block
count). A bad manifest is a ``ProtocolError``, one over the receiver's limits a
``RejectedError``; either way nothing has been created yet.

Both sides then hold the same ``Manifest``: its ``digest`` (SHA-256 over the canonical msgpack
encoding of every entry) binds the whole manifest into every block's associated data (``id``),
``space`` numbers the blocks of every file's data extents, ``key`` is a file's staging identity,
and ``tree_digest`` is the whole-tree digest from the per-file digests.

Pure: no I/O here.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import msgpack

from .blocks import BlockLedger, BlockSpace
from .digest import BLOCK_DIGEST_LEN, file_digest, file_digest_prefix
from .errors import ProtocolError, RejectedError, UsageError
from .wire import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MAX_STREAMS,
    MIN_BLOCK_SIZE,
    blocks_for,
    printable,
)

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_LINK_BYTES = 4096
#: Extents (offset, length pairs) of one FILE entry.
MAX_EXTENTS = 1 << 16
MAX_CHUNK_ENTRIES = 4096
MAX_CHUNK_BYTES = 1 << 20
#: The receiver's defaults for ``--max-files`` and ``--max-bytes`` (64 TiB of data).
DEFAULT_MAX_FILES = 1_000_000
DEFAULT_MAX_BYTES = 1 << 46
#: Names the receiver uses beside its destinations: refused as top-level names.
RESERVED_SUFFIXES = (".stxpart", ".stxstate", ".stxlock", ".stxtree")
MAX_FILE_SIZE = 1 << 62
FILE_ID_LEN = 16
KEY_LEN = 16
MAX_HEADER_COUNT = 1 << 32

_MANIFEST_LABEL = b"stx3 manifest"
_ENTRY_LABEL = b"stx3 entry"
_TREE_LABEL = b"stx3 tree"
_U32 = struct.Struct(">I")
_I64 = (-(1 << 63), (1 << 63) - 1)
#: C0 controls, DEL and C1 controls.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_MAX_SHOWN = 200
#: Room in a chunk for its outer arrays and its index (msgpack: 1 + 9 + 5 bytes at most).
_CHUNK_OVERHEAD = 16


class Kind(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2


#: A kind's number -> the Kind (a dict lookup is the check and the conversion at once).
KIND_OF = {int(k): k for k in Kind}


class Entry(NamedTuple):
    """One entry of a manifest, as its sender describes it. (A named tuple: a sender's walk
    and a receiver's decoding each make one per entry, and a frozen dataclass costs three
    times as much to make.)"""

    kind: Kind
    #: Relative, "/"-separated ("D/sub/x.bin"); a top-level entry has no "/".
    path: str
    #: Apparent size of a FILE (0 for DIR and SYMLINK).
    size: int
    #: Permission bits, 0 .. 0o777.
    mode: int
    mtime_ns: int
    #: SYMLINK only: the link text (1 .. MAX_LINK_BYTES UTF-8 bytes, no NUL).
    link: str = ""
    #: FILE only: flat (offset, length, offset, length, ...) of the data ranges, sorted and
    #: disjoint, each length > 0, within ``size``; () for an empty or all-hole file.
    extents: tuple[int, ...] = ()
    #: FILE only: 16 bytes identifying the sender's file version.
    file_id: bytes = b""

    @property
    def data_bytes(self) -> int:
        return sum(self.extents[1::2])

    @property
    def parent(self) -> str:
        """The parent directory's path, "" at the top."""
        return self.path.rpartition("/")[0]

    def wire(self) -> list[Any]:
        """The entry as the msgpack array of a MANIFEST chunk."""
        return [
            int(self.kind),
            self.path,
            self.size,
            self.mode,
            self.mtime_ns,
            self.link,
            list(self.extents),
            self.file_id,
        ]

    def canonical(self) -> bytes:
        """The entry's canonical encoding (its msgpack array), hashed by digest and key. The
        named tuple itself packs as ``wire()`` does (a tuple is an array, a Kind an int)."""
        return msgpack.packb(self, use_bin_type=True)


def shown(path: str) -> str:
    """A peer's path made fit for a message: printable and short."""
    text = printable(path)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


# ---------------------------------------------------------------- codec


def _unpack(payload: bytes) -> Any:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError("malformed MANIFEST message")
    if len(payload) > MAX_CHUNK_BYTES:
        raise ProtocolError(
            f"bad manifest: a chunk of {len(payload)} bytes exceeds {MAX_CHUNK_BYTES}"
        )
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_PATH_BYTES * 4,
            max_bin_len=64,
            max_array_len=max(MAX_CHUNK_ENTRIES, 2 * MAX_EXTENTS) + 8,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, UnicodeDecodeError...
        raise ProtocolError("malformed MANIFEST message") from exc


def _is_int(value: Any) -> bool:
    """An int that is not a bool (msgpack gives exactly ``int``)."""
    return type(value) is int


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise ProtocolError(f"bad manifest: {what} out of range")
    return int(value)


def _entry(raw: Any) -> Entry:
    """One entry from its msgpack array: types only (the rules are the Builder's)."""
    if not isinstance(raw, list) or len(raw) != 8:
        raise ProtocolError("malformed MANIFEST message")
    kind, path, size, mode, mtime, link, extents, file_id = raw
    if not isinstance(path, str):
        raise ProtocolError("bad manifest: a path is not a string")
    k = KIND_OF.get(kind) if type(kind) is int else None  # (a bool is not an int here)
    if k is None:
        raise ProtocolError(f"bad manifest: unknown entry kind ({shown(path)})")
    if not (type(size) is int and type(mode) is int and type(mtime) is int):
        raise ProtocolError(f"bad manifest: size, mode or mtime is not an integer ({shown(path)})")
    if not isinstance(link, str):
        raise ProtocolError(f"bad manifest: link text is not a string ({shown(path)})")
    if type(extents) is not list or not _all_ints(extents):
        raise ProtocolError(f"bad manifest: extents are not a list of integers ({shown(path)})")
    if not isinstance(file_id, bytes):
        raise ProtocolError(f"bad manifest: file id is not bytes ({shown(path)})")
    return Entry(k, path, size, mode, mtime, link, tuple(extents), file_id)


def _all_ints(items: list[Any]) -> bool:
    """Every item exactly an ``int`` (no bool); a file's usual one extent without a set."""
    if len(items) == 2:
        return type(items[0]) is int and type(items[1]) is int
    return set(map(type, items)) <= {int}


def _array_header(n: int) -> bytes:
    """msgpack's header of an array of ``n`` items (the shortest form, as ``packb`` writes)."""
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + struct.pack(">H", n) if n < 1 << 16 else b"\xdd" + struct.pack(">I", n)


def _chunk_bytes(index: int, encoded: Sequence[bytes]) -> bytes:
    """``msgpack.packb([index, [entry, ...]])`` from the entries' encodings."""
    return b"".join((b"\x92", msgpack.packb(index), _array_header(len(encoded)), *encoded))


def encode_chunk(index: int, entries: Sequence[Entry]) -> bytes:
    """One MANIFEST payload: ``[index, [entry, ...]]``."""
    return _chunk_bytes(index, [e.canonical() for e in entries])


def decode_chunk(payload: bytes) -> tuple[int, tuple[Entry, ...]]:
    """A MANIFEST payload -> (index, entries); strict types, ProtocolError for anything else."""
    obj = _unpack(payload)
    if not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[1], list):
        raise ProtocolError("malformed MANIFEST message")
    index = _int(obj[0], "chunk index", 0, MAX_HEADER_COUNT - 1)
    if len(obj[1]) > MAX_CHUNK_ENTRIES:
        raise ProtocolError(f"bad manifest: a chunk of more than {MAX_CHUNK_ENTRIES} entries")
    return index, tuple(_entry(raw) for raw in obj[1])


def chunks(entries: Sequence[Entry], encoded: Sequence[bytes] | None = None) -> list[bytes]:
    """The MANIFEST payloads for ``entries`` (index 0, 1, ...), each within MAX_CHUNK_ENTRIES
    entries and MAX_CHUNK_BYTES bytes; ``encoded``: their canonical encodings, if made already
    (``Manifest.encodings``). UsageError for an entry too big for a chunk of its own (a file
    with so many extents that their encoding passes MAX_CHUNK_BYTES)."""
    out: list[bytes] = []
    batch: list[bytes] = []
    room = MAX_CHUNK_BYTES - _CHUNK_OVERHEAD
    used = 0
    for i, entry in enumerate(entries):
        try:
            data = entry.canonical() if encoded is None else encoded[i]
        except UnicodeEncodeError:
            raise UsageError(f"not a UTF-8 name: {shown(entry.path)}") from None
        if len(data) > room:
            raise UsageError(
                f"{shown(entry.path)}: its manifest entry ({len(data)} bytes, "
                f"{len(entry.extents) // 2} extents) does not fit a MANIFEST chunk"
            )
        if batch and (len(batch) == MAX_CHUNK_ENTRIES or used + len(data) > room):
            out.append(_chunk_bytes(len(out), batch))
            batch, used = [], 0
        batch.append(data)
        used += len(data)
    if batch:
        out.append(_chunk_bytes(len(out), batch))
    return out


# ---------------------------------------------------------------- header


def _hint(value: Any, what: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise ProtocolError(f"Metadata: {what}: out of range")
    return int(value)


@dataclass(frozen=True)
class Header:
    """What the sender is about to send (METADATA, sealed under the c2s control key)."""

    #: Entries in the manifest, and MANIFEST frames that carry them.
    entries: int
    chunks: int
    block_size: int
    streams: int
    rekey_records: int
    rekey_bytes: int
    #: Random per sender run: a reconnect of the same run supersedes its old session.
    run_id: bytes
    #: ``stx send --to SUBDIR``: where in the receiver's destination the transfer lands
    #: ("" for the destination itself); a relative path under the manifest's path rules.
    subdir: str = ""
    #: ``stx send --as NAME``: the top-level name is not the source's own (informational: a
    #: receiver with ``--no-subdirs`` refuses it).
    renamed: bool = False

    def encode(self) -> bytes:
        return msgpack.packb(
            [
                self.entries,
                self.chunks,
                self.block_size,
                self.streams,
                self.rekey_records,
                self.rekey_bytes,
                self.run_id,
                self.subdir,
                self.renamed,
            ],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, payload: bytes) -> Header:
        try:
            obj = msgpack.unpackb(
                payload,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=MAX_PATH_BYTES,
                max_bin_len=64,
                max_array_len=16,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError("malformed Metadata message") from exc
        if not isinstance(obj, list) or len(obj) != 9:
            raise ProtocolError("malformed Metadata message")
        entries, count, bs, streams, rr, rb, run, subdir, renamed = obj
        if not isinstance(run, bytes) or len(run) != 16:
            raise ProtocolError("Metadata: run id: expected 16 bytes")
        if not isinstance(subdir, str) or not isinstance(renamed, bool):
            raise ProtocolError("Metadata: subdir and renamed: expected a string and a boolean")
        if subdir:
            check_subdir(subdir)
        header = cls(
            _hint(entries, "entries", 1, MAX_HEADER_COUNT),
            _hint(count, "chunks", 1, MAX_HEADER_COUNT),
            _hint(bs, "block size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE),
            _hint(streams, "streams", 1, MAX_STREAMS),
            _hint(rr, "rekey records", 1, 1 << 24),
            _hint(rb, "rekey bytes", 1, 1 << 36),
            run,
            subdir,
            renamed,
        )
        if not header.chunks <= header.entries <= header.chunks * MAX_CHUNK_ENTRIES:
            raise ProtocolError("Metadata: entries and chunks do not agree")
        return header


# ---------------------------------------------------------------- the receiver's checks


def check_subdir(subdir: str) -> None:
    """ProtocolError unless ``subdir`` (``stx send --to``) is a relative path under the rules
    of a manifest path, no component of it a reserved name (``.stxpart``, ...)."""
    try:
        _Rules._path(subdir)
        if any(name.endswith(RESERVED_SUFFIXES) for name in subdir.split("/")):
            _bad("reserved name in a path", subdir)
    except ProtocolError as exc:
        raise ProtocolError(str(exc).replace("bad manifest:", "bad --to directory:", 1)) from None


class Limits(NamedTuple):
    """The receiver's limits on one transfer (``--max-files``, ``--max-bytes``)."""

    max_files: int = DEFAULT_MAX_FILES
    max_bytes: int = DEFAULT_MAX_BYTES


class _Rules:
    """Every rule an entry must pass, in manifest order; keeps the running totals."""

    def __init__(self, *, block_size: int, limits: Limits) -> None:
        self.block_size = block_size
        self.limits = limits
        self.seen: set[str] = set()
        self.dirs: set[str] = set()
        self.count = 0
        self.data_bytes = 0
        self.blocks = 0

    def add(self, e: Entry) -> None:
        path = e.path
        self._path(path)
        if path in self.seen:
            _bad("duplicate path", path)
        parent = path.rpartition("/")[0]
        if parent and parent not in self.dirs:
            what = (
                "below a file or a symlink" if parent in self.seen else "parent directory missing"
            )
            _bad(f"{what} (or out of order)", path)
        self._fields(e)
        self.count += 1
        if self.count > self.limits.max_files:
            raise RejectedError(
                f"the manifest has more than {self.limits.max_files} entries, the receiver's --max-files"
            )
        if e.kind == Kind.FILE:
            lengths = e.extents[1::2]
            self.data_bytes += sum(lengths)
            if self.data_bytes > self.limits.max_bytes:
                raise RejectedError(
                    f"the transfer's data ({self.data_bytes} bytes so far) exceeds the "
                    f"receiver's --max-bytes ({self.limits.max_bytes})"
                )
            bs = self.block_size
            if len(lengths) == 1:
                self.blocks += blocks_for(lengths[0], bs)
            else:
                self.blocks += sum([blocks_for(n, bs) for n in lengths])
            if self.blocks > MAX_BLOCKS:
                raise RejectedError(
                    f"the transfer has more than {MAX_BLOCKS} blocks of {bs} bytes "
                    f"(at {shown(path)}): use larger blocks"
                )
        self.seen.add(path)
        if e.kind == Kind.DIR:
            self.dirs.add(path)

    @staticmethod
    def _path(path: str) -> None:
        if not path:
            _bad("empty path", path)
        if path.isascii() and path.isprintable():  # the usual path: no control character,
            size = len(path)  # and its UTF-8 is one byte a character
            if size <= MAX_COMPONENT_BYTES:
                # Short too (neither it nor a component can be too long): only its components
                # and its name are left, three substring tests instead of a split and a loop.
                wrapped = f"/{path}/"
                if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
                    _bad("empty, '.' or '..' path component", path)
                if "/" not in path and path.endswith(RESERVED_SUFFIXES):
                    _bad("reserved top-level name", path)
                return
        else:
            if _CONTROL.search(path):
                _bad("control character in a path", path)
            try:
                size = len(path.encode())
            except UnicodeEncodeError:
                _bad("path is not UTF-8", path)
        if size > MAX_PATH_BYTES:
            _bad(f"path longer than {MAX_PATH_BYTES} bytes", path)
        names = path.split("/")
        for name in names:
            if name in ("", ".", ".."):
                _bad("empty, '.' or '..' path component", path)
            if len(name) > MAX_COMPONENT_BYTES // 4 and len(name.encode()) > MAX_COMPONENT_BYTES:
                _bad(f"path component longer than {MAX_COMPONENT_BYTES} bytes", path)
        if len(names) == 1 and path.endswith(RESERVED_SUFFIXES):
            _bad("reserved top-level name", path)

    @staticmethod
    def _fields(e: Entry) -> None:
        kind, path, size, mode, mtime, link, extents, file_id = e
        if not 0 <= mode <= 0o777:
            _bad("mode out of range", path)
        if not _I64[0] <= mtime <= _I64[1]:
            _bad("mtime out of range", path)
        if kind == Kind.FILE:
            if not 0 <= size <= MAX_FILE_SIZE:
                _bad("file size out of range", path)
            if link:
                _bad("link text on a file", path)
            if len(file_id) != FILE_ID_LEN:
                _bad(f"file id is not {FILE_ID_LEN} bytes", path)
            _extents(extents, size, path)
            return
        if size or extents or file_id:
            _bad(f"size, extents or file id on a {kind.name.lower()}", path)
        if kind == Kind.DIR:
            if link:
                _bad("link text on a directory", path)
            return
        if not link:
            _bad("empty link text", path)
        if "\x00" in link:
            _bad("NUL in link text", path)
        try:
            link_size = len(link.encode())
        except UnicodeEncodeError:
            _bad("link text is not UTF-8", path)
        if link_size > MAX_LINK_BYTES:
            _bad(f"link text longer than {MAX_LINK_BYTES} bytes", path)


def _extents(extents: tuple[int, ...], size: int, path: str) -> None:
    if len(extents) == 2:  # the usual file: one extent
        if extents[0] < 0 or extents[1] <= 0:
            _bad("extents not sorted, overlapping or empty", path)
        if extents[0] + extents[1] > size:
            _bad("extent past the end of the file", path)
        return
    if len(extents) % 2:
        _bad("odd number of extent fields", path)
    if len(extents) > 2 * MAX_EXTENTS:
        _bad(f"more than {MAX_EXTENTS} extents", path)
    end = 0
    for i in range(0, len(extents), 2):
        offset, length = extents[i], extents[i + 1]
        if offset < end or length <= 0:
            _bad("extents not sorted, overlapping or empty", path)
        end = offset + length
    if end > size:
        _bad("extent past the end of the file", path)


def _bad(what: str, path: str) -> NoReturn:
    raise ProtocolError(f"bad manifest: {what} ({shown(path)})")


def check(entries: Sequence[Entry], *, block_size: int, limits: Limits | None = None) -> None:
    """Apply every rule the receiver's Builder applies to ``entries`` (for a sender to find a
    name the receiver would refuse before it connects): ProtocolError or RejectedError."""
    unlimited = Limits(max_files=len(entries), max_bytes=MAX_FILE_SIZE * len(entries))
    rules = _Rules(block_size=block_size, limits=limits or unlimited)
    for entry in entries:
        rules.add(entry)


class Builder:
    """The receiver's streaming validator: the header, then each MANIFEST payload in order."""

    def __init__(self, header: Header, limits: Limits) -> None:
        if header.entries > limits.max_files:
            raise RejectedError(
                f"the manifest has {header.entries} entries, over the receiver's "
                f"--max-files ({limits.max_files})"
            )
        self.header = header
        self._rules = _Rules(block_size=header.block_size, limits=limits)
        self._entries: list[Entry] = []
        self._next = 0
        self._failed = False

    @property
    def done(self) -> bool:
        return self._next == self.header.chunks and len(self._entries) == self.header.entries

    def feed(self, payload: bytes) -> None:
        """One MANIFEST payload; ProtocolError or RejectedError if it breaks any rule (the
        Builder is then dead: every later call fails too)."""
        if self._failed:
            raise ProtocolError("bad manifest: already refused")
        self._failed = True
        if self._next == self.header.chunks:
            raise ProtocolError(
                f"bad manifest: more than the {self.header.chunks} chunks announced"
            )
        index, entries = decode_chunk(payload)
        if index != self._next:
            raise ProtocolError(f"bad manifest: chunk {index} where chunk {self._next} was due")
        if not entries:
            raise ProtocolError(f"bad manifest: chunk {index} has no entries")
        total = len(self._entries) + len(entries)
        if total > self.header.entries:
            raise ProtocolError(
                f"bad manifest: more than the {self.header.entries} entries announced"
            )
        last = index == self.header.chunks - 1
        if last and total < self.header.entries:
            raise ProtocolError(
                f"bad manifest: {total} entries in the {self.header.chunks} chunks, "
                f"{self.header.entries} announced"
            )
        for entry in entries:
            self._rules.add(entry)
        self._entries.extend(entries)
        self._next += 1
        self._failed = False

    def manifest(self) -> Manifest:
        """The checked manifest; ProtocolError before every chunk has arrived."""
        if not self.done:
            raise ProtocolError("bad manifest: incomplete")
        return Manifest(self._entries, block_size=self.header.block_size, keys=True)


# ---------------------------------------------------------------- the manifest


class Manifest:
    """A transfer's entries, their digest and the block space over their data.

    Built by the sender from its walk, by the receiver from a ``Builder``: the constructor
    trusts its entries (``check`` and the Builder apply the rules)."""

    def __init__(
        self,
        entries: Sequence[Entry],
        *,
        block_size: int,
        keys: bool = False,
        encodings: bool = False,
        space: BlockSpace | None = None,
    ) -> None:
        """``keys``: work out every entry's ``key`` now, from the encoding the digest hashes
        anyway (a receiver names every file's partial by it at admission). ``encodings``:
        keep those encodings in ``self.encodings`` (a sender's MANIFEST chunks are made of
        them: ``chunks``)."""
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.block_size = block_size
        self._keys: list[bytes] | None = [] if keys else None
        self.encodings: list[bytes] | None = [] if encodings else None
        kept = self.encodings
        h = hashlib.sha256(_MANIFEST_LABEL)
        h.update(_U32.pack(block_size))
        pack = msgpack.Packer(use_bin_type=True).pack
        files = dirs = symlinks = data = apparent = 0
        roots: list[str] = []
        sha256, label, out = hashlib.sha256, _ENTRY_LABEL, self._keys
        for e in self.entries:
            encoded = pack(e)  # its canonical encoding (``wire``: its fields in order)
            h.update(encoded)
            if kept is not None:
                kept.append(encoded)
            if out is not None:
                out.append(sha256(label + encoded).digest()[:KEY_LEN])
            if e.kind == Kind.FILE:
                files += 1
                data += e.data_bytes
                apparent += e.size
            elif e.kind == Kind.DIR:
                dirs += 1
            else:
                symlinks += 1
            if "/" not in e.path:
                roots.append(e.path)
        self.digest: bytes = h.digest()
        self.id: bytes = self.digest[:16]
        self.files, self.dirs, self.symlinks = files, dirs, symlinks
        self.data_bytes, self.apparent_bytes = data, apparent
        self.roots: tuple[str, ...] = tuple(roots)
        # ``space``: the same block space, made already (``sources.Sources.space``).
        self.space = space or BlockSpace.of_extents(
            (e.extents for e in self.entries), block_size=block_size, pack=True
        )

    def __len__(self) -> int:
        return len(self.entries)

    def single(self) -> Entry | None:
        """The entry when the manifest is exactly one top-level FILE, else None."""
        if len(self.entries) == 1:
            (e,) = self.entries
            if e.kind == Kind.FILE and "/" not in e.path:
                return e
        return None

    @functools.cached_property
    def send_order(self) -> tuple[int, ...]:
        """Every block once, the largest files' first (a sender queues them so: the tail of
        the transfer is then small files spread over every stream, not one big file on one
        stream). Worked out once per manifest (a sender may start it while it waits)."""
        entries, space = self.entries, self.space
        sizes = [sum(e.extents[1::2]) if e.extents else 0 for e in entries]
        order = sorted((i for i, n in enumerate(sizes) if n), key=lambda i: -sizes[i])
        out: list[int] = []
        taken = bytearray(space.total)  # a pack's members share their one block: it goes once
        for i in order:
            for b in space.entry_blocks(i):
                if not taken[b]:
                    taken[b] = 1
                    out.append(b)
        return tuple(out)

    def key(self, entry: int) -> bytes:
        """16 bytes naming entry ``entry`` (its canonical encoding): a FILE's staging identity."""
        keys = self._keys
        if keys is None:
            keys = self._keys = [b""] * len(self.entries)
        key = keys[entry]
        if not key:
            e = self.entries[entry]
            key = keys[entry] = hashlib.sha256(_ENTRY_LABEL + e.canonical()).digest()[:KEY_LEN]
        return key

    def file_digest(self, entry: int, ledger: BlockLedger) -> bytes:
        """FILE entry ``entry``'s digest (``digest.file_digest``) from its blocks in ``ledger``."""
        return self._file_digest(entry, memoryview(ledger.all_digests()))

    def _file_digest(self, entry: int, every: memoryview) -> bytes:
        """From ``every`` block's digest (the ledger's, in block order)."""
        blocks, e = self.space.entry_blocks(entry), self.entries[entry]
        size = e.extents[1] if len(e.extents) == 2 else sum(e.extents[1::2])
        digests = every[blocks.start * BLOCK_DIGEST_LEN : blocks.stop * BLOCK_DIGEST_LEN]
        return file_digest(block_digests=digests, block_size=self.block_size, size=size)

    def tree_digest(self, ledger: BlockLedger) -> bytes:
        """SHA-256("stx3 tree" || digest || the file digest of every FILE entry, in order)."""
        if ledger.total != self.space.total:
            raise ValueError("the ledger is not over this manifest's block space")
        every = ledger.all_digests()
        h = hashlib.sha256(_TREE_LABEL)
        h.update(self.digest)
        # ``_file_digest`` of each FILE, inlined (one hash call a file; a tree has many).
        sha256, prefix, blocks_of, n = (
            hashlib.sha256,
            file_digest_prefix,
            self.space.entry_blocks,
            BLOCK_DIGEST_LEN,
        )
        bs, FILE = self.block_size, Kind.FILE
        for i, e in enumerate(self.entries):
            if e.kind == FILE:
                blocks = blocks_of(i)
                x = e.extents
                size = x[1] if len(x) == 2 else sum(x[1::2])
                h.update(
                    sha256(prefix(bs, size) + every[blocks.start * n : blocks.stop * n]).digest()
                )
        return h.digest()
