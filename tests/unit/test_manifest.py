"""The manifest (stx3): codec, chunking, the receiver's Builder rules, digests and the block space."""

from __future__ import annotations

import hashlib
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import pytest

from stxpar import manifest as mf
from stxpar.blocks import PACK_MAX_FILES, BlockLedger, BlockSpace
from stxpar.digest import file_digest
from stxpar.errors import ProtocolError, RejectedError, UsageError
from stxpar.manifest import (
    MAX_CHUNK_BYTES,
    MAX_CHUNK_ENTRIES,
    Builder,
    Entry,
    Header,
    Kind,
    Limits,
    Manifest,
    chunks,
    decode_chunk,
    encode_chunk,
)
from stxpar.wire import MAX_BLOCKS, MIN_BLOCK_SIZE

pytestmark = pytest.mark.timeout(60)

BS = 1 << 16
FID = bytes(range(16))
RUN = b"r" * 16
DEFAULTS = Limits()


def F(path: str, size: int = 10, extents: tuple[int, ...] | None = None, **kw: Any) -> Entry:
    if extents is None:
        extents = (0, size) if size else ()
    fields: dict[str, Any] = dict(mode=0o644, mtime_ns=1_700_000_000_123_456_789, file_id=FID)
    fields.update(kw)
    return Entry(Kind.FILE, path, size, extents=extents, **fields)


def D(path: str, **kw: Any) -> Entry:
    fields: dict[str, Any] = dict(size=0, mode=0o755, mtime_ns=1_600_000_000_000_000_000)
    fields.update(kw)
    return Entry(kind=Kind.DIR, path=path, **fields)


def L(path: str, link: str = "../target", **kw: Any) -> Entry:
    fields: dict[str, Any] = dict(size=0, mode=0o777, mtime_ns=-5, link=link)
    fields.update(kw)
    return Entry(kind=Kind.SYMLINK, path=path, **fields)


TREE = (
    D("D"),
    D("D/empty", mode=0o700),
    F("D/a.bin", 100_000),
    L("D/link", "a.bin"),
    F("D/sparse", 10 * BS, (BS, 10, 5 * BS, BS + 1)),
    D("D/sub"),
    F("D/sub/zero", 0),
    F("top.txt", 3),
)


def header(entries: int, n_chunks: int, *, block_size: int = BS) -> Header:
    return Header(entries, n_chunks, block_size, 4, 1000, 1 << 30, RUN)


def build(
    entries: tuple[Entry, ...] | list[Entry],
    *,
    limits: Limits = DEFAULTS,
    block_size: int = BS,
) -> Manifest:
    payloads = chunks(entries)
    builder = Builder(header(len(entries), len(payloads), block_size=block_size), limits)
    for payload in payloads:
        assert not builder.done
        builder.feed(payload)
    assert builder.done
    return builder.manifest()


def refused(
    entries: list[Entry] | tuple[Entry, ...],
    *,
    limits: Limits = DEFAULTS,
    block_size: int = BS,
) -> ProtocolError | RejectedError:
    with pytest.raises((ProtocolError, RejectedError)) as info:
        build(entries, limits=limits, block_size=block_size)
    assert isinstance(info.value, ProtocolError | RejectedError)
    return info.value


def raw_chunk(index: Any, raw_entries: Any) -> bytes:
    return msgpack.packb([index, raw_entries], use_bin_type=True)


# ---------------------------------------------------------------- codec and chunking


def test_a_tree_round_trips() -> None:
    m = build(TREE)
    assert m.entries == TREE
    assert m.digest == Manifest(TREE, block_size=BS).digest
    index, entries = decode_chunk(encode_chunk(7, TREE))
    assert (index, entries) == (7, TREE)
    assert all(type(e.kind) is Kind for e in entries)


def test_keys_worked_out_up_front_are_each_entrys_own() -> None:
    """A receiver's manifest (``keys=True``, from the Builder) names each entry by the same
    key as the one worked out on demand, the hash of its canonical encoding."""
    eager = build(TREE)
    lazy = Manifest(TREE, block_size=BS)
    assert eager._keys is not None and len(eager._keys) == len(TREE)
    for i, e in enumerate(TREE):
        want = hashlib.sha256(b"stx3 entry" + e.canonical()).digest()[:16]
        assert eager.key(i) == lazy.key(i) == want
    assert len(set(eager._keys)) == len(TREE)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4095, 4096])
def test_encode_chunk_is_msgpack_of_the_wire_arrays(n: int) -> None:
    entries = [F(f"f{i}", i) for i in range(n)]
    want = msgpack.packb([n, [e.wire() for e in entries]], use_bin_type=True)
    assert encode_chunk(n, entries) == want
    assert encode_chunk(2**32 - 1, entries[:1]) == msgpack.packb(
        [2**32 - 1, [e.wire() for e in entries[:1]]], use_bin_type=True
    )


def test_canonical_encoding_is_the_wire_array() -> None:
    e = F("x", 5, (1, 2), link="")
    assert e.canonical() == msgpack.packb(
        [0, "x", 5, 0o644, e.mtime_ns, "", [1, 2], FID], use_bin_type=True
    )
    assert e.data_bytes == 2 and e.parent == ""
    assert F("a/b/c").parent == "a/b"


def test_100000_entries_split_within_both_limits_and_reassemble() -> None:
    entries: list[Entry] = [D("D")]
    for i in range(100):
        entries.append(D(f"D/d{i:03}"))
        entries.extend(F(f"D/d{i:03}/file-{j:04}.bin", 16384) for j in range(999))
    payloads = chunks(entries)
    assert len(payloads) >= len(entries) // MAX_CHUNK_ENTRIES
    count = 0
    for i, payload in enumerate(payloads):
        index, got = decode_chunk(payload)
        assert index == i and 0 < len(got) <= MAX_CHUNK_ENTRIES
        assert len(payload) <= MAX_CHUNK_BYTES
        count += len(got)
    assert count == len(entries)
    start = time.perf_counter()
    sender = Manifest(entries, block_size=BS)
    assert time.perf_counter() - start < 1.0
    receiver = build(entries)
    assert receiver.digest == sender.digest and receiver.entries == tuple(entries)
    assert (receiver.files, receiver.dirs, receiver.symlinks) == (99_900, 101, 0)


def test_big_entries_split_by_bytes() -> None:
    # 1000 extents at offsets past 4 GiB: ~14 KB an entry, so the byte limit splits them
    ext = tuple(x for i in range(1000) for x in ((1 << 33) + 2 * i * BS, BS))
    entries = [F(f"f{i:03}", (1 << 34), ext) for i in range(300)]
    payloads = chunks(entries)
    assert len(payloads) == 5  # 4.2 MB
    assert all(len(p) <= MAX_CHUNK_BYTES for p in payloads)
    assert build(entries).digest == Manifest(entries, block_size=BS).digest


def test_an_entry_too_big_for_any_chunk_is_a_usage_error() -> None:
    # MAX_EXTENTS pairs of 9-byte integers: 1.18 MB
    ext = tuple(x for i in range(mf.MAX_EXTENTS) for x in ((1 << 40) + i * (1 << 33), 1 << 32))
    with pytest.raises(UsageError, match="does not fit a MANIFEST chunk"):
        chunks([F("huge", 1 << 50, ext)])


def test_a_name_that_is_not_utf8_is_a_usage_error_for_the_sender() -> None:
    with pytest.raises(UsageError, match="not a UTF-8 name"):
        chunks([F("bad\udcff")])


# ---------------------------------------------------------------- Builder: entry rules

CASES: list[tuple[str, list[Entry], str]] = [
    ("empty path", [F("")], "empty path"),
    ("absolute", [F("/etc")], "empty, '.' or '..' path component"),
    ("trailing slash", [D("a"), F("a/")], "empty, '.' or '..' path component"),
    ("double slash", [D("a"), F("a//b")], "empty, '.' or '..' path component"),
    ("dot", [F(".")], "empty, '.' or '..' path component"),
    ("dotdot", [F("..")], "empty, '.' or '..' path component"),
    ("dotdot inside", [D("a"), F("a/../b")], "empty, '.' or '..' path component"),
    ("dot inside", [D("a"), F("a/./b")], "empty, '.' or '..' path component"),
    ("NUL", [F("a\x00b")], "control character"),
    ("newline", [F("a\nb")], "control character"),
    ("escape", [F("\x1b[31mred")], "control character"),
    ("DEL", [F("a\x7f")], "control character"),
    ("C1", [F("a\x85b")], "control character"),
    ("C1 csi", [F("a\x9bb")], "control character"),
    ("long path", [F("p" * 4097)], "path longer than 4096 bytes"),
    ("long component", [F("é" * 128)], "path component longer than 255 bytes"),
    ("reserved stxpart", [F("x.stxpart")], "reserved top-level name"),
    ("reserved stxstate", [D(".x.stxstate")], "reserved top-level name"),
    ("reserved stxlock", [L("y.stxlock")], "reserved top-level name"),
    ("reserved stxtree", [D("z.stxtree")], "reserved top-level name"),
    ("duplicate dir", [D("a"), D("a")], "duplicate path"),
    ("duplicate file", [D("a"), F("a/x"), F("a/x")], "duplicate path"),
    ("file then dir", [F("a"), D("a")], "duplicate path"),
    ("no parent", [F("a/b")], "parent directory missing"),
    ("parent after child", [F("a/b"), D("a")], "parent directory missing"),
    ("below a file", [F("a"), F("a/b")], "below a file or a symlink"),
    ("below a symlink", [L("a", "/etc"), F("a/passwd")], "below a file or a symlink"),
    ("dir below a symlink", [L("a", "/"), D("a/tmp")], "below a file or a symlink"),
    ("mode setuid", [F("a", mode=0o4755)], "mode out of range"),
    ("mode negative", [D("a", mode=-1)], "mode out of range"),
    ("mtime too big", [F("a", mtime_ns=1 << 63)], "mtime out of range"),
    ("dir with size", [D("a", size=1)], "size, extents or file id on a dir"),
    ("dir with extents", [D("a", extents=(0, 1))], "size, extents or file id on a dir"),
    ("dir with file id", [D("a", file_id=FID)], "size, extents or file id on a dir"),
    ("dir with link", [D("a", link="x")], "link text on a directory"),
    ("symlink with size", [L("a", size=3)], "size, extents or file id on a symlink"),
    ("symlink with file id", [L("a", file_id=FID)], "size, extents or file id on a symlink"),
    ("symlink without text", [L("a", "")], "empty link text"),
    ("symlink with NUL", [L("a", "x\x00y")], "NUL in link text"),
    ("symlink too long", [L("a", "t" * 4097)], "link text longer than 4096 bytes"),
    ("file with link", [F("a", link="x")], "link text on a file"),
    ("file id short", [F("a", file_id=b"x" * 15)], "file id is not 16 bytes"),
    ("file id empty", [F("a", file_id=b"")], "file id is not 16 bytes"),
    ("file negative size", [F("a", -1, ())], "file size out of range"),
    ("file huge", [F("a", (1 << 62) + 1, ())], "file size out of range"),
    ("odd extents", [F("a", 10, (0,))], "odd number of extent fields"),
    ("zero-length extent", [F("a", 10, (0, 0))], "extents not sorted, overlapping or empty"),
    ("negative extent", [F("a", 10, (0, -1))], "extents not sorted, overlapping or empty"),
    ("negative offset", [F("a", 10, (-1, 2))], "extents not sorted, overlapping or empty"),
    ("overlap", [F("a", 10, (0, 5, 4, 2))], "extents not sorted, overlapping or empty"),
    ("unsorted", [F("a", 10, (6, 2, 0, 2))], "extents not sorted, overlapping or empty"),
    ("past the end", [F("a", 10, (5, 6))], "extent past the end of the file"),
    (
        "too many extents",
        [
            F(
                "a",
                2 * (mf.MAX_EXTENTS + 1),
                tuple(x for i in range(mf.MAX_EXTENTS + 1) for x in (2 * i, 1)),
            )
        ],
        f"more than {mf.MAX_EXTENTS} extents",
    ),
]


@pytest.mark.parametrize(("entries", "what"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_bad_entry_is_refused_naming_it(entries: list[Entry], what: str) -> None:
    exc = refused(entries)
    assert type(exc) is ProtocolError
    text = str(exc)
    assert text.startswith("bad manifest: ") and what in text
    assert mf.shown(entries[-1].path) in text
    assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in text), repr(text)
    # the sender's check() applies the same rules
    with pytest.raises(ProtocolError, match="^bad manifest: "):
        mf.check(entries, block_size=BS)


def test_the_good_neighbours_of_the_bad_cases_pass() -> None:
    ok = [
        D("a"),
        F("a/x.stxpart"),  # reserved only at the top
        F("a/..b"),
        F("a/.hidden"),
        F("a/-leading dash and spaces "),
        F("a/" + "é" * 127),  # 254 bytes
        F("a/日本語のファイル名"),
        F("a/emoji \U0001f600"),
        D("a/deep"),
        L("a/l", "t" * 4096),
        L("a/abs", "/etc/passwd"),
        L("a/dangling", "nowhere/at/all"),
        F("a/sparse-all-hole", 1 << 40, ()),
        F("a/max", 1 << 62, ()),
        F("a/mode0", 0, mode=0),
        F("a/oldest", 0, mtime_ns=-(1 << 63)),
        F("a/adjacent", 10, (0, 5, 5, 5)),
        D("a/mode777", mode=0o777),
    ]
    m = build(ok)
    mf.check(ok, block_size=BS)
    assert m.files == 12 and m.symlinks == 3 and m.dirs == 3
    deep = [D("r")]
    for _ in range(16):
        deep.append(D(deep[-1].path + "/" + "d" * 250))
    deep.append(F(deep[-1].path + "/" + "f" * (4096 - len(deep[-1].path) - 1)))
    assert len(deep[-1].path.encode()) == 4096
    build(deep)


def test_a_raw_control_character_never_reaches_the_message() -> None:
    exc = refused([F("evil\x1b]0;title\x07\n" + "x" * 500)])
    text = str(exc)
    assert "\x1b" not in text and "\n" not in text and "\x07" not in text
    assert len(text) < 300 and text.endswith("...)")


# ---------------------------------------------------------------- Builder: limits


def test_max_files_from_the_header() -> None:
    with pytest.raises(RejectedError, match="--max-files"):
        Builder(header(11, 1), Limits(max_files=10))
    Builder(header(10, 1), Limits(max_files=10))


def test_max_files_counted_too() -> None:
    rules = mf._Rules(block_size=BS, limits=Limits(max_files=2))
    rules.add(D("a"))
    rules.add(D("b"))
    with pytest.raises(RejectedError, match="--max-files"):
        rules.add(D("c"))


def test_max_bytes_counts_data_not_holes() -> None:
    entries = [F("a", 600, (0, 100)), F("b", 100, (0, 100))]
    build(entries, limits=Limits(max_bytes=200))
    exc = refused([*entries, F("c", 1)], limits=Limits(max_bytes=200))
    assert type(exc) is RejectedError
    assert "exceeds the receiver's --max-bytes (200)" in str(exc)


def test_too_many_blocks_is_refused() -> None:
    bs = MIN_BLOCK_SIZE
    size = (MAX_BLOCKS + 1) * bs
    exc = refused([F("big", size)], block_size=bs)
    assert type(exc) is RejectedError and "blocks" in str(exc)
    build([F("fits", MAX_BLOCKS * bs)], block_size=bs)
    # extents each count their own last short block
    half = MAX_BLOCKS // 2
    ext = (0, half * bs, (half + 1) * bs, half * bs + 1)
    exc = refused([F("split", (2 * half + 2) * bs, ext)], block_size=bs)
    assert type(exc) is RejectedError


def test_builder_keeps_no_memory_for_what_was_only_announced() -> None:
    tracemalloc.start()
    try:
        builder = Builder(header(2**32, 2**20), Limits(max_files=2**32))
        builder.feed(encode_chunk(0, [D("a")]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert not builder.done


# ---------------------------------------------------------------- Builder: chunk order


def test_chunks_must_come_in_order() -> None:
    entries = [F(f"f{i}") for i in range(3)]
    builder = Builder(header(3, 3), Limits())
    builder.feed(encode_chunk(0, entries[:1]))
    with pytest.raises(ProtocolError, match="chunk 2 where chunk 1 was due"):
        builder.feed(encode_chunk(2, entries[2:]))
    with pytest.raises(ProtocolError, match="already refused"):
        builder.feed(encode_chunk(1, entries[1:2]))


def test_a_repeated_chunk_is_refused() -> None:
    builder = Builder(header(2, 2), Limits())
    builder.feed(encode_chunk(0, [F("a")]))
    with pytest.raises(ProtocolError, match="chunk 0 where chunk 1 was due"):
        builder.feed(encode_chunk(0, [F("b")]))


def test_an_empty_chunk_is_refused() -> None:
    builder = Builder(header(1, 1), Limits())
    with pytest.raises(ProtocolError, match="chunk 0 has no entries"):
        builder.feed(encode_chunk(0, []))


def test_more_entries_than_announced() -> None:
    builder = Builder(header(2, 1), Limits())
    with pytest.raises(ProtocolError, match="more than the 2 entries announced"):
        builder.feed(encode_chunk(0, [F("a"), F("b"), F("c")]))


def test_fewer_entries_than_announced() -> None:
    builder = Builder(header(3, 2), Limits())
    builder.feed(encode_chunk(0, [F("a")]))
    with pytest.raises(ProtocolError, match="2 entries in the 2 chunks, 3 announced"):
        builder.feed(encode_chunk(1, [F("b")]))


def test_a_chunk_after_the_last() -> None:
    builder = Builder(header(1, 1), Limits())
    builder.feed(encode_chunk(0, [F("a")]))
    assert builder.done
    with pytest.raises(ProtocolError, match="more than the 1 chunks announced"):
        builder.feed(encode_chunk(1, [F("b")]))


def test_manifest_before_done() -> None:
    builder = Builder(header(2, 2), Limits())
    builder.feed(encode_chunk(0, [F("a")]))
    with pytest.raises(ProtocolError, match="incomplete"):
        builder.manifest()


def test_an_oversized_chunk_is_refused_before_unpacking() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_chunk(b"\x92" + b"\x00" * MAX_CHUNK_BYTES)


def test_more_than_max_chunk_entries_in_one_chunk() -> None:
    payload = msgpack.packb([0, [D(f"d{i}").wire() for i in range(MAX_CHUNK_ENTRIES + 1)]])
    with pytest.raises(ProtocolError, match="more than 4096 entries"):
        decode_chunk(payload)


GOOD = F("a").wire()
TYPES: list[tuple[str, Any]] = [
    ("not msgpack", b"\xc1"),
    ("trailing bytes", raw_chunk(0, [GOOD]) + b"\x00"),
    ("not an array", msgpack.packb({"a": 1})),
    ("short outer", msgpack.packb([0])),
    ("entries not a list", raw_chunk(0, "x")),
    ("index bool", raw_chunk(True, [GOOD])),
    ("index negative", raw_chunk(-1, [GOOD])),
    ("index str", raw_chunk("0", [GOOD])),
    ("entry not a list", raw_chunk(0, [5])),
    ("entry too short", raw_chunk(0, [GOOD[:7]])),
    ("entry too long", raw_chunk(0, [[*GOOD, 0]])),
    ("kind bool", raw_chunk(0, [[False, *GOOD[1:]]])),
    ("kind unknown", raw_chunk(0, [[3, *GOOD[1:]]])),
    ("kind float", raw_chunk(0, [[0.0, *GOOD[1:]]])),
    ("path bytes", raw_chunk(0, [[0, b"a", *GOOD[2:]]])),
    ("path not UTF-8", b"\x92\x00\x91\x98\x00\xa2\xff\xfe" + msgpack.packb(GOOD[2:])[1:]),
    ("size bool", raw_chunk(0, [[0, "a", True, *GOOD[3:]]])),
    ("size float", raw_chunk(0, [[0, "a", 10.0, *GOOD[3:]]])),
    ("mode str", raw_chunk(0, [[*GOOD[:3], "644", *GOOD[4:]]])),
    ("mtime none", raw_chunk(0, [[*GOOD[:4], None, *GOOD[5:]]])),
    ("link bytes", raw_chunk(0, [[*GOOD[:5], b"", *GOOD[6:]]])),
    ("extents not list", raw_chunk(0, [[*GOOD[:6], 5, GOOD[7]]])),
    ("extent bool", raw_chunk(0, [[*GOOD[:6], [0, True], GOOD[7]]])),
    ("extent str", raw_chunk(0, [[*GOOD[:6], [0, "1"], GOOD[7]]])),
    ("file id str", raw_chunk(0, [[*GOOD[:7], "x" * 16]])),
    ("file id too long", raw_chunk(0, [[*GOOD[:7], b"x" * 65]])),
    ("a map", raw_chunk(0, [{"kind": 0}])),
    ("an ext", msgpack.packb([0, [msgpack.ExtType(1, b"x")]])),
]


@pytest.mark.parametrize("payload", [t[1] for t in TYPES], ids=[t[0] for t in TYPES])
def test_strict_types(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_chunk(payload)
    assert str(info.value) == "malformed MANIFEST message" or str(info.value).startswith(
        "bad manifest: "
    )
    with pytest.raises(ProtocolError):
        Builder(header(1, 1), Limits()).feed(payload)


def test_a_good_raw_chunk_decodes() -> None:
    assert decode_chunk(raw_chunk(0, [GOOD])) == (0, (F("a"),))


# ---------------------------------------------------------------- Header


def test_header_round_trips() -> None:
    h = Header(5, 2, BS, 8, 1000, 1 << 30, RUN)
    assert Header.decode(h.encode()) == h
    assert msgpack.unpackb(h.encode()) == [5, 2, BS, 8, 1000, 1 << 30, RUN, "", False]
    to = Header(5, 2, BS, 8, 1000, 1 << 30, RUN, subdir="in/coming", renamed=True)
    assert Header.decode(to.encode()) == to


HEADERS: list[tuple[str, list[Any]]] = [
    ("entries 0", [0, 1, BS, 1, 1, 1, RUN, "", False]),
    ("entries huge", [2**32 + 1, 1, BS, 1, 1, 1, RUN, "", False]),
    ("chunks 0", [1, 0, BS, 1, 1, 1, RUN, "", False]),
    ("chunks over entries", [2, 3, BS, 1, 1, 1, RUN, "", False]),
    ("entries over chunks x 4096", [4097, 1, BS, 1, 1, 1, RUN, "", False]),
    ("block size small", [1, 1, MIN_BLOCK_SIZE - 1, 1, 1, 1, RUN, "", False]),
    ("block size big", [1, 1, (64 << 20) + 1, 1, 1, 1, RUN, "", False]),
    ("streams 0", [1, 1, BS, 0, 1, 1, RUN, "", False]),
    ("streams many", [1, 1, BS, 4097, 1, 1, RUN, "", False]),
    ("rekey records 0", [1, 1, BS, 1, 0, 1, RUN, "", False]),
    ("rekey bytes 0", [1, 1, BS, 1, 1, 0, RUN, "", False]),
    ("rekey bytes big", [1, 1, BS, 1, 1, (1 << 36) + 1, RUN, "", False]),
    ("run id short", [1, 1, BS, 1, 1, 1, b"x" * 15, "", False]),
    ("run id str", [1, 1, BS, 1, 1, 1, "x" * 16, "", False]),
    ("bool entries", [True, 1, BS, 1, 1, 1, RUN, "", False]),
    ("seven fields (stx3 before --to)", [1, 1, BS, 1, 1, 1, RUN]),
    ("ten fields", [1, 1, BS, 1, 1, 1, RUN, "", False, 0]),
    ("subdir bytes", [1, 1, BS, 1, 1, 1, RUN, b"x", False]),
    ("renamed int", [1, 1, BS, 1, 1, 1, RUN, "", 1]),
    ("subdir up", [1, 1, BS, 1, 1, 1, RUN, "../x", False]),
    ("subdir absolute", [1, 1, BS, 1, 1, 1, RUN, "/etc", False]),
    ("subdir reserved", [1, 1, BS, 1, 1, 1, RUN, "a/b.stxpart", False]),
    ("subdir control", [1, 1, BS, 1, 1, 1, RUN, "a\nb", False]),
    ("subdir too long", [1, 1, BS, 1, 1, 1, RUN, "a/" * 2049, False]),
]


@pytest.mark.parametrize("fields", [h[1] for h in HEADERS], ids=[h[0] for h in HEADERS])
def test_header_refuses_bad_fields(fields: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        Header.decode(msgpack.packb(fields, use_bin_type=True))


def test_header_refuses_garbage() -> None:
    for payload in (b"", b"\xc1", b"\x97" + b"\x00" * 6, msgpack.packb({"a": 1})):
        with pytest.raises(ProtocolError):
            Header.decode(payload)


# ---------------------------------------------------------------- digest, key, counts, single


def test_digest_is_the_specified_hash() -> None:
    h = hashlib.sha256(b"stx3 manifest" + struct.pack(">I", BS))
    for e in TREE:
        h.update(msgpack.packb(e.wire(), use_bin_type=True))
    m = Manifest(TREE, block_size=BS)
    assert m.digest == h.digest() and m.id == m.digest[:16]


def test_digest_and_key_are_stable() -> None:
    """Pinned: a change here is a protocol change (docs/protocol.md and the known answers)."""
    m = Manifest(TREE, block_size=BS)
    assert m.digest.hex() == "877c1df1682b4e69a74c68b8dbdf266be8a07df06178bb47e2bffe4131190a9a"
    assert m.key(2).hex() == "8c34fee962b9fd7b506c33664820499b"
    assert m.key(2) == hashlib.sha256(b"stx3 entry" + TREE[2].canonical()).digest()[:16]
    assert len({m.key(i) for i in range(len(TREE))}) == len(TREE)


@pytest.mark.parametrize(
    "change",
    [
        {"path": "D/a.bim"},
        {"size": 100_001},
        {"mode": 0o640},
        {"mtime_ns": 1},
        {"extents": (0, 99_999)},
        {"file_id": bytes(16)},
    ],
)
def test_every_field_changes_digest_and_key(change: dict[str, Any]) -> None:
    m = Manifest(TREE, block_size=BS)
    other = list(TREE)
    other[2] = TREE[2]._replace(**change)
    m2 = Manifest(other, block_size=BS)
    assert m2.digest != m.digest and m2.key(2) != m.key(2)
    assert m2.key(0) == m.key(0)


def test_block_size_changes_the_digest_not_the_key() -> None:
    a, b = Manifest(TREE, block_size=BS), Manifest(TREE, block_size=2 * BS)
    assert a.digest != b.digest and a.key(2) == b.key(2)


def test_counts_roots_and_sizes() -> None:
    m = Manifest(TREE, block_size=BS)
    assert (m.files, m.dirs, m.symlinks, len(m)) == (4, 3, 1, 8)
    assert m.roots == ("D", "top.txt")
    assert m.apparent_bytes == 100_000 + 10 * BS + 0 + 3
    assert m.data_bytes == 100_000 + 10 + BS + 1 + 3


def test_single() -> None:
    f = F("only.bin", 5)
    assert Manifest([f], block_size=BS).single() == f
    assert Manifest([F("empty", 0)], block_size=BS).single() == F("empty", 0)
    assert Manifest([D("d")], block_size=BS).single() is None
    assert Manifest([L("l")], block_size=BS).single() is None
    assert Manifest([D("d"), F("d/f")], block_size=BS).single() is None
    assert Manifest([F("a"), F("b")], block_size=BS).single() is None
    assert Manifest(TREE, block_size=BS).single() is None


def where(space: BlockSpace, block: int) -> tuple[int, int, int]:
    ref = space.locate(block)
    return ref.entry, ref.offset, ref.length


def test_space_covers_only_file_data_in_entry_order() -> None:
    m = Manifest(TREE, block_size=BS)
    space = m.space
    for i, e in enumerate(TREE):
        if e.kind != Kind.FILE:
            assert len(space.entry_blocks(i)) == 0
    # D/a.bin: 100000 bytes in blocks of 65536
    assert [where(space, b) for b in space.entry_blocks(2)] == [(2, 0, BS), (2, BS, 100_000 - BS)]
    # D/sparse: (BS, 10) and (5 BS, BS + 1): blocks never span extents, offsets are the file's
    sparse = [where(space, b) for b in space.entry_blocks(4)]
    assert sparse == [(4, BS, 10), (4, 5 * BS, BS), (4, 6 * BS, 1)]
    assert len(space.entry_blocks(6)) == 0  # the empty file
    assert space.total == 2 + 3 + 1


def _ledger(m: Manifest, salt: bytes = b"") -> BlockLedger:
    ledger = BlockLedger(m.space)
    for b in range(m.space.total):
        ledger.record(b, hashlib.sha256(salt + b.to_bytes(4, "big")).digest()[:16])
    return ledger


def test_tree_digest_is_the_specified_hash() -> None:
    m = Manifest(TREE, block_size=BS)
    ledger = _ledger(m)
    h = hashlib.sha256(b"stx3 tree" + m.digest)
    for i, e in enumerate(TREE):
        if e.kind == Kind.FILE:
            digests = b"".join(ledger.digest(b) for b in m.space.entry_blocks(i))
            one = file_digest(block_digests=digests, block_size=BS, size=e.data_bytes)
            assert m.file_digest(i, ledger) == one
            h.update(one)
    assert m.tree_digest(ledger) == h.digest()


def test_tree_digest_depends_on_every_block_and_on_the_manifest() -> None:
    m = Manifest(TREE, block_size=BS)
    ledger = _ledger(m)
    base = m.tree_digest(ledger)
    seen = {base}
    for b in range(m.space.total):
        other = ledger.copy()
        other.record(b, b"\xee" * 16)
        seen.add(m.tree_digest(other))
    assert len(seen) == m.space.total + 1
    # the same blocks under a manifest that differs only in a directory's mtime
    changed = list(TREE)
    changed[1] = TREE[1]._replace(mtime_ns=0)
    m2 = Manifest(changed, block_size=BS)
    assert m2.tree_digest(_ledger(m2)) != base
    # an empty file still counts: adding one changes the digest
    m3 = Manifest([*TREE, F("z", 0)], block_size=BS)
    assert m3.space.total == m.space.total
    assert m3.tree_digest(_ledger(m3)) != base


def test_tree_digest_wants_a_ledger_of_its_space() -> None:
    m = Manifest(TREE, block_size=BS)
    other = Manifest([F("x", 1)], block_size=BS)
    with pytest.raises(ValueError):
        m.tree_digest(BlockLedger(other.space))


def test_manifest_of_200000_entries_is_not_slow() -> None:
    entries = [D("d")] + [F(f"d/{i}", 100) for i in range(200_000)]
    start = time.perf_counter()
    m = Manifest(entries, block_size=BS)
    assert time.perf_counter() - start < 2.0
    # 100-byte files, packed: as many a block as fit, at most PACK_MAX_FILES
    assert m.space.total == -(-200_000 // min(PACK_MAX_FILES, BS // 100))
