"""Hostile manifests (stx3, issue 13) against a live receiver: each one is refused with a
sealed ERROR that says what is wrong, and NOTHING is created in the destination.

Who can do this: the manifest travels only in sealed METADATA and MANIFEST frames, so writing
one takes the key: a buggy or hostile authenticated sender. The attacker builds the frames
itself (``attacker.Session.send_sealed``), never through the product's sender, and for the
non-UTF-8 cases crafts the msgpack by hand.

Every test takes a listing of the destination (hidden files included, with each entry's
type, size, mode, mtime and link text) and of a sentinel directory outside it (``outside``,
holding the victim file) before the attack, and compares both after it; then a legitimate
sender must still get a file through (``Arena.unharmed``).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
from attacker import Arena, Session, expect_refused, handshake_session

from stxpar import keyschedule as ks
from stxpar.manifest import Entry, Header, Kind, encode_chunk
from stxpar.wire import MAX_BLOCK_SIZE, FrameType

T = FrameType
BLOCK = 4096
MTIME = 1_700_000_000_000_000_000
#: what a refused manifest costs the receiver at most (its workers are never involved)
pytestmark = pytest.mark.timeout(60)

#: planted in the destination before every attack: the listing must not change at all
PLANTED = {"keep.bin": b"planted before the attack\n", ".hidden": b"hidden\n"}


# ---------------------------------------------------------------- entries and frames


def file_entry(path: str, size: int = 100, *, extents: tuple[int, ...] | None = None) -> Entry:
    return Entry(
        Kind.FILE,
        path,
        size,
        0o644,
        MTIME,
        extents=((0, size) if size else ()) if extents is None else extents,
        file_id=os.urandom(16),
    )


def dir_entry(path: str) -> Entry:
    return Entry(Kind.DIR, path, 0, 0o755, MTIME)


def link_entry(path: str, link: str) -> Entry:
    return Entry(Kind.SYMLINK, path, 0, 0o777, MTIME, link=link)


def header(entries: int, chunks: int = 1, *, block_size: int = BLOCK) -> Header:
    return Header(
        entries=entries,
        chunks=chunks,
        block_size=block_size,
        streams=2,
        rekey_records=ks.MAX_RECORDS_PER_KEY,
        rekey_bytes=ks.MAX_BYTES_PER_KEY,
        run_id=os.urandom(16),
    )


def raw_file(path: Any) -> list[Any]:
    """A FILE entry's msgpack array with any ``path`` object (bytes become msgpack bin)."""
    return [int(Kind.FILE), path, 100, 0o644, MTIME, "", [0, 100], os.urandom(16)]


def raw_chunk(index: int, raws: Sequence[list[Any]]) -> bytes:
    return msgpack.packb([index, list(raws)], use_bin_type=True)


# ---------------------------------------------------------------- the defender's view


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root`` (hidden ones too, symlinks not followed): its type, size,
    permission bits, mtime and link text (a symlink) or content (a small file)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            what: Any = None
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    what = f.read(1 << 16)
            out[os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode),
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                stat.S_IMODE(st.st_mode),
                st.st_mtime_ns,
                what,
            )
    return out


class Watch:
    """The destination (with ``PLANTED`` in it) and the sentinel directory, before."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        for name, data in PLANTED.items():
            (arena.dest / name).write_bytes(data)
        self.dest = snapshot(arena.dest)
        self.outside = snapshot(arena.outside)
        assert set(PLANTED) <= set(self.dest)

    def unchanged(self) -> None:
        """Once the receiver has settled: not one entry created, changed or removed."""
        arena = self.arena
        arena.settle()
        after = snapshot(arena.dest)
        assert after == self.dest, (
            f"the destination changed: new {sorted(set(after) - set(self.dest))}, "
            f"gone {sorted(set(self.dest) - set(after))}"
        )
        assert snapshot(arena.outside) == self.outside, "the sentinel directory changed"
        arena.assert_outside_untouched()

    def done(self) -> None:
        """Unchanged; then the plants removed and a legitimate sender still served."""
        self.unchanged()
        self.arena.clean()
        self.arena.unharmed()


def attack(arena: Arena, head: Header, payloads: Sequence[bytes]) -> Session:
    """Handshake with the key, then METADATA (``head``) and each MANIFEST payload, sealed. The
    receiver may hang up half-way (it refused an early chunk): the rest is then not sent."""
    s = handshake_session(arena.addr, arena.psk)
    try:
        s.send_sealed(T.METADATA, head.encode())
        for payload in payloads:
            s.send_sealed(T.MANIFEST, payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # read the ERROR below
    return s


def refused(s: Session, code: int, *parts: str) -> str:
    """The receiver answered with exactly one ERROR, sealed under the session, of ``code``,
    whose message holds every one of ``parts``, and closed; no other frame (no METADATA_ACK)."""
    handshake = (T.SERVER_HELLO, T.SERVER_AUTH, T.KEY_CONFIRMATION)
    others = [f for f in expect_refused(s.peer, code) if f[0] not in handshake]
    assert others == [], f"frames before the ERROR: {[f[0].name for f in others]}"
    assert s.peer.sealed_errors == 1, "the ERROR was not sealed under the session"
    message = s.peer.errors[0].message
    for part in parts:
        assert part in message, f"ERROR message {message!r} lacks {part!r}"
    s.close()
    return message


def send_refused(
    arena: Arena, entries: Sequence[Entry], code: int, *parts: str, block_size: int = BLOCK
) -> str:
    """One chunk of ``entries``; refused with ``code`` and ``parts``; nothing created."""
    watch = Watch(arena)
    s = attack(arena, header(len(entries), block_size=block_size), [encode_chunk(0, entries)])
    message = refused(s, code, *parts)
    watch.done()
    return message


# ---------------------------------------------------------------- bad paths

BAD_PATHS = [
    # (id, entries, what the message says)
    ("absolute", [file_entry("/etc/passwd")], "empty, '.' or '..' path component"),
    ("absolute-top", [file_entry("/x")], "empty, '.' or '..' path component"),
    ("dotdot", [file_entry("..")], "empty, '.' or '..' path component"),
    ("dotdot-up", [file_entry("../escaped")], "empty, '.' or '..' path component"),
    (
        "dotdot-inside",
        [dir_entry("d"), file_entry("d/../../escaped")],
        "empty, '.' or '..' path component",
    ),
    ("dot", [file_entry(".")], "empty, '.' or '..' path component"),
    ("dot-inside", [dir_entry("d"), file_entry("d/./x")], "empty, '.' or '..' path component"),
    ("empty-path", [file_entry("")], "empty path"),
    ("empty-component", [dir_entry("d"), file_entry("d//x")], "empty, '.' or '..' path component"),
    ("trailing-slash", [dir_entry("d/")], "empty, '.' or '..' path component"),
    ("nul", [file_entry("a\0b")], "control character in a path"),
    ("nul-inside", [dir_entry("d"), file_entry("d/x\0y")], "control character in a path"),
    ("newline", [file_entry("a\nb")], "control character in a path"),
    ("escape", [file_entry("\x1b[31mred")], "control character in a path"),
    ("del", [file_entry("del\x7f")], "control character in a path"),
    ("c1", [file_entry("c1\x85x")], "control character in a path"),
    ("dup-file", [file_entry("x"), file_entry("x")], "duplicate path"),
    ("dup-dir", [dir_entry("d"), dir_entry("d")], "duplicate path"),
    ("dup-kinds", [dir_entry("d"), file_entry("d")], "duplicate path"),
    ("dup-inside", [dir_entry("d"), file_entry("d/x"), file_entry("d/x")], "duplicate path"),
    ("below-symlink", [link_entry("l", "t"), file_entry("l/x")], "below a file or a symlink"),
    ("below-file", [file_entry("f"), file_entry("f/x")], "below a file or a symlink"),
    ("below-file-dir", [file_entry("f"), dir_entry("f/d")], "below a file or a symlink"),
    ("child-first", [file_entry("d/x"), dir_entry("d")], "parent directory missing"),
    ("no-parent", [dir_entry("d"), file_entry("e/x")], "parent directory missing"),
    ("stxpart", [file_entry("x.stxpart")], "reserved top-level name"),
    ("stxstate", [file_entry(".x.stxstate")], "reserved top-level name"),
    ("stxlock-dir", [dir_entry("d.stxlock")], "reserved top-level name"),
    ("stxtree", [dir_entry("t.stxtree"), file_entry("t.stxtree/x")], "reserved top-level name"),
    ("long-component", [file_entry("x" * 256)], "path component longer than 255 bytes"),
]


@pytest.mark.parametrize(
    ("entries", "what"), [(e, w) for _, e, w in BAD_PATHS], ids=[i for i, _, _ in BAD_PATHS]
)
def test_bad_path_is_refused_before_anything_is_created(
    arena: Arena, entries: list[Entry], what: str
) -> None:
    message = send_refused(arena, entries, 1, "bad manifest: ", what)
    assert "\0" not in message and "\n" not in message and "\x1b" not in message


def test_reserved_suffix_below_the_top_is_an_ordinary_name(arena: Arena) -> None:
    """Control for ``stxpart``: only top-level names are reserved; the same manifest with a
    file of that name one level down is admitted (METADATA_ACK), and nothing else changes."""
    entries = [dir_entry("d"), file_entry("d/x.stxpart", 0)]
    s = attack(arena, header(len(entries)), [encode_chunk(0, entries)])
    assert s.recv_sealed(T.METADATA_ACK) is not None, s.peer.errors
    s.close()
    arena.settle()
    arena.clean()
    arena.unharmed()


# ---------------------------------------------------------------- not UTF-8 (hand-made msgpack)


def test_path_str_with_invalid_utf8_is_refused(arena: Arena) -> None:
    """A msgpack str whose bytes are not UTF-8 (0xff, a lone surrogate's encoding)."""
    for bad in (b"\xff\xfe", b"ok\xed\xa0\x80", b"d/\xc0\xaf"):
        chunk = raw_chunk(0, [raw_file("Z" * len(bad))])
        crafted = chunk.replace(
            bytes([0xA0 | len(bad)]) + b"Z" * len(bad), bytes([0xA0 | len(bad)]) + bad, 1
        )
        assert crafted != chunk
        watch = Watch(arena)
        s = attack(arena, header(1), [crafted])
        refused(s, 1, "malformed MANIFEST message")
        watch.done()


def test_path_as_bin_is_refused(arena: Arena) -> None:
    """bin where the path must be a str (so bytes that need not be UTF-8 at all)."""
    watch = Watch(arena)
    s = attack(arena, header(1), [raw_chunk(0, [raw_file(b"\xffname")])])
    refused(s, 1, "bad manifest: a path is not a string")
    watch.done()


def test_link_text_as_bin_is_refused(arena: Arena) -> None:
    raw = [int(Kind.SYMLINK), "l", 0, 0o777, MTIME, b"/outside", [], b""]
    watch = Watch(arena)
    s = attack(arena, header(1), [raw_chunk(0, [raw])])
    refused(s, 1, "bad manifest: link text is not a string")
    watch.done()


# ---------------------------------------------------------------- the receiver's limits


def test_more_entries_than_max_files(make_arena: Any) -> None:
    arena: Arena = make_arena(workers=2, max_files=3)
    entries = [dir_entry("d")] + [file_entry(f"d/f{i}", 10) for i in range(3)]
    # refused at METADATA already (the header announces 4 entries): no MANIFEST is sent
    watch = Watch(arena)
    s = attack(arena, header(len(entries)), [])
    refused(s, 6, "--max-files", "(3)")
    watch.unchanged()
    # a header that lies (3 entries announced, 4 sent) is refused at the chunk
    s = attack(arena, header(3), [encode_chunk(0, entries)])
    refused(s, 1, "bad manifest: more than the 3 entries announced")
    watch.done()


def test_more_bytes_than_max_bytes(make_arena: Any) -> None:
    arena: Arena = make_arena(workers=2, max_bytes=100_000)
    # one file over the limit, then two files that are over it only together
    send_refused(arena, [file_entry("big", 100_001)], 6, "--max-bytes", "(100000)")
    entries = [dir_entry("d"), file_entry("d/a", 60_000), file_entry("d/b", 60_000)]
    send_refused(arena, entries, 6, "--max-bytes", "(100000)")
    # holes are not data: a sparse file of a huge apparent size passes the limit ...
    sparse = [dir_entry("s"), file_entry("s/x", 1 << 40, extents=(0, 4096))]
    s = attack(arena, header(2), [encode_chunk(0, sparse)])
    assert s.recv_sealed(T.METADATA_ACK) is not None, s.peer.errors
    s.close()
    arena.settle()
    arena.clean()
    arena.unharmed()


@pytest.mark.parametrize("shape", ["file", "tree"])
def test_more_bytes_than_the_free_space(make_arena: Any, shape: str) -> None:
    """``--max-bytes`` large: the free-space check refuses a manifest of 2**47 bytes of data
    (64 MiB blocks, within the block limit) before anything is created."""
    arena: Arena = make_arena(workers=2, max_bytes=1 << 62)
    size = 1 << 47
    assert os.statvfs(arena.dest).f_bavail * os.statvfs(arena.dest).f_frsize < size
    if shape == "file":
        entries = [file_entry("huge.bin", size)]
    else:
        entries = [dir_entry("d"), file_entry("d/huge.bin", size), file_entry("d/small", 10)]
    send_refused(arena, entries, 6, "not enough space", block_size=MAX_BLOCK_SIZE)


# ---------------------------------------------------------------- chunks out of order


def _entries(n: int) -> list[Entry]:
    return [dir_entry("d")] + [file_entry(f"d/f{i}", 10) for i in range(n - 1)]


def test_chunk_index_out_of_order(arena: Arena) -> None:
    e = _entries(4)
    watch = Watch(arena)
    s = attack(arena, header(4, 2), [encode_chunk(1, e[2:]), encode_chunk(0, e[:2])])
    refused(s, 1, "bad manifest: chunk 1 where chunk 0 was due")
    watch.unchanged()
    s = attack(arena, header(4, 2), [encode_chunk(0, e[:2]), encode_chunk(0, e[2:])])
    refused(s, 1, "bad manifest: chunk 0 where chunk 1 was due")
    watch.unchanged()
    s = attack(arena, header(4, 3), [encode_chunk(0, e[:1]), encode_chunk(2, e[1:])])
    refused(s, 1, "bad manifest: chunk 2 where chunk 1 was due")
    watch.done()


def test_chunk_past_the_announced_count(arena: Arena) -> None:
    """One chunk announced, a second one sent: the first (the last announced) falls short of
    the announced entries and is refused; a chunk that brings entries past the announced
    count too (a second chunk after the announced entries, or one too long); and a chunk
    without entries."""
    e = _entries(4)
    watch = Watch(arena)
    s = attack(arena, header(4, 1), [encode_chunk(0, e[:2]), encode_chunk(1, e[2:])])
    refused(s, 1, "bad manifest: 2 entries in the 1 chunks, 4 announced")
    watch.unchanged()
    s = attack(arena, header(2, 2), [encode_chunk(0, e[:1]), encode_chunk(1, e[1:])])
    refused(s, 1, "bad manifest: more than the 2 entries announced")
    watch.unchanged()
    s = attack(arena, header(2, 2), [encode_chunk(0, e[:2]), encode_chunk(1, e[2:3])])
    refused(s, 1, "bad manifest: more than the 2 entries announced")
    watch.unchanged()
    s = attack(arena, header(2, 2), [encode_chunk(0, e[:3])])
    refused(s, 1, "bad manifest: more than the 2 entries announced")
    watch.unchanged()
    s = attack(arena, header(1, 1), [encode_chunk(0, [])])
    refused(s, 1, "bad manifest: chunk 0 has no entries")
    watch.done()


def test_manifest_chunk_after_the_manifest_was_admitted(arena: Arena) -> None:
    """A chunk past the announced count after a complete manifest: the receiver has admitted
    the transfer and refuses the extra MANIFEST frame with a sealed ERROR."""
    e = [file_entry("one.bin", 10)]
    s = attack(arena, header(1, 1), [encode_chunk(0, e)])
    assert s.recv_sealed(T.METADATA_ACK) is not None, s.peer.errors
    s.send_sealed(T.MANIFEST, encode_chunk(1, [file_entry("two.bin", 10)]))
    expect_refused(s.peer, 1)
    assert s.peer.sealed_errors == 1
    assert "MANIFEST" in s.peer.errors[0].message, s.peer.errors
    s.close()
    arena.settle()
    assert not (arena.dest / "two.bin").exists()
    arena.assert_outside_untouched()
    arena.clean()
    arena.unharmed()


# ---------------------------------------------------------------- through symlinks


def test_symlink_then_a_file_through_it(arena: Arena) -> None:
    """SYMLINK ``d -> <outside>`` then FILE ``d/x``: refused as a whole, before anything."""
    target = os.fspath(arena.outside)
    send_refused(
        arena, [link_entry("d", target), file_entry("d/x")], 1, "below a file or a symlink"
    )
    send_refused(
        arena,
        [dir_entry("top"), link_entry("top/d", target), dir_entry("top/d/sub")],
        1,
        "below a file or a symlink",
    )
    assert not (arena.outside / "x").exists()


@pytest.mark.parametrize("depth", ["top", "nested"])
def test_directory_planted_as_a_symlink_to_outside(arena: Arena, depth: str) -> None:
    """A local attacker planted ``d`` in the destination as a symlink to a directory outside
    it; the manifest has DIR ``d`` (and a file below): refused, nothing written outside."""
    if depth == "top":
        (arena.dest / "d").symlink_to(arena.outside, target_is_directory=True)
        entries = [dir_entry("d"), file_entry("d/x"), dir_entry("d/sub"), file_entry("d/victim")]
    else:
        (arena.dest / "p").mkdir()
        (arena.dest / "p" / "d").symlink_to(arena.outside, target_is_directory=True)
        entries = [dir_entry("p"), dir_entry("p/d"), file_entry("p/d/x"), file_entry("p/d/victim")]
    watch = Watch(arena)
    s = attack(arena, header(len(entries)), [encode_chunk(0, entries)])
    refused(s, 6, "not a directory", "refusing to write through it")
    watch.done()


# ---------------------------------------------------------------- --to SUBDIR (issue 15)

BAD_SUBDIRS = ["../x", "/etc", "a/../../b", "a//b", ".", "x\x00y", "\x1b[31m", "a/b.stxlock/c"]


@pytest.mark.parametrize("subdir", BAD_SUBDIRS, ids=repr)
def test_hostile_subdir_is_refused_before_anything_is_created(arena: Arena, subdir: str) -> None:
    watch = Watch(arena)
    head = dataclasses.replace(header(1), subdir=subdir)
    s = attack(arena, head, [encode_chunk(0, [file_entry("x")])])
    message = refused(s, 1, "bad --to directory")
    assert "\0" not in message and "\x1b" not in message
    watch.done()


@pytest.mark.parametrize("where", ["top", "deep"])
def test_subdir_through_a_planted_symlink_is_refused(arena: Arena, where: str) -> None:
    if where == "top":
        os.symlink(arena.outside, arena.dest / "evil")
        subdir = "evil/y"
    else:
        (arena.dest / "a").mkdir()
        os.symlink(arena.outside, arena.dest / "a" / "b")
        subdir = "a/b/c"
    watch = Watch(arena)
    head = dataclasses.replace(header(1), subdir=subdir)
    s = attack(arena, head, [encode_chunk(0, [file_entry("x")])])
    refused(s, 6, "is not a directory")  # RejectedError
    watch.unchanged()
    for p in (arena.dest / "evil", arena.dest / "a" / "b"):
        if p.is_symlink():
            p.unlink()
    if (arena.dest / "a").exists():
        (arena.dest / "a").rmdir()
    watch.arena.clean()
    watch.arena.unharmed()
