"""The sender's scan of its PATHs: entries, order, sources, skips and refusals, on real files."""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

import pytest

from stxpar.errors import SourceChangedError, UsageError
from stxpar.manifest import Entry, Kind
from stxpar.scan import Scan, _merge, extents_of, scan
from stxpar.source import SourceFile

pytestmark = pytest.mark.timeout(60)

OLD = 1_000_000_000 * 10**9  # 2001-09-09


def _write(path: Path, data: bytes = b"", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _by_path(s: Scan) -> dict[str, Entry]:
    return {e.path: e for e in s.entries}


def _check_order(entries: list[Entry]) -> None:
    """Every parent a DIR before its children; nothing twice; children sorted by UTF-8 bytes
    (top-level names keep the order the PATHs were given in)."""
    seen: dict[str, Kind] = {}
    last_child: dict[str, bytes] = {}
    for e in entries:
        assert e.path not in seen
        parent, _, name = e.path.rpartition("/")
        if parent:
            assert seen.get(parent) == Kind.DIR, e.path
            assert last_child.get(parent, b"") < name.encode(), e.path
            last_child[parent] = name.encode()
        seen[e.path] = e.kind


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    d = tmp_path / "src" / "D"
    _write(d / "a.txt", b"hello", 0o600)
    _write(d / "b" / "c.bin", os.urandom(5000), 0o640)
    _write(d / "b" / "exe", b"#!/bin/sh\n", 0o755)
    _write(d / "zero", b"")
    (d / "empty").mkdir()
    (d / "private").mkdir(mode=0o700)
    _write(d / "odd" / "with space", b"1")
    _write(d / "odd" / "-leading", b"2")
    _write(d / "odd" / "日本語ファイル", b"3")
    _write(d / "odd" / "ελληνικά", b"4")
    (d / "odd" / "rel").symlink_to("../a.txt")
    (d / "odd" / "dangling").symlink_to("nowhere/at/all")
    (d / "odd" / "abs").symlink_to("/etc/passwd")
    (d / "dirlink").symlink_to("b")
    os.utime(d / "a.txt", ns=(OLD, OLD))
    os.utime(d / "empty", ns=(OLD, OLD))
    return d


def test_tree_entries(tree: Path) -> None:
    warnings: list[str] = []
    s = scan([tree], warn=warnings.append)
    assert warnings == [] and s.skipped == []
    got = _by_path(s)
    assert [e.path for e in s.entries] == [
        "D",
        "D/a.txt",
        "D/b",
        "D/b/c.bin",
        "D/b/exe",
        "D/dirlink",
        "D/empty",
        "D/odd",
        "D/odd/-leading",
        "D/odd/abs",
        "D/odd/dangling",
        "D/odd/rel",
        "D/odd/with space",
        "D/odd/ελληνικά",
        "D/odd/日本語ファイル",
        "D/private",
        "D/zero",
    ]
    _check_order(s.entries)
    a = got["D/a.txt"]
    assert (a.kind, a.size, a.mode, a.mtime_ns, a.extents) == (Kind.FILE, 5, 0o600, OLD, (0, 5))
    assert got["D/b/c.bin"].mode == 0o640 and got["D/b/exe"].mode == 0o755
    assert got["D/zero"].extents == () and got["D/zero"].size == 0
    assert got["D/empty"].kind == Kind.DIR and got["D/empty"].mtime_ns == OLD
    assert got["D/private"].mode == 0o700 and got["D"].mode == tree.stat().st_mode & 0o777
    for name, text in (("rel", "../a.txt"), ("dangling", "nowhere/at/all"), ("abs", "/etc/passwd")):
        e = got[f"D/odd/{name}"]
        assert (e.kind, e.link, e.mode, e.size, e.file_id) == (Kind.SYMLINK, text, 0o777, 0, b"")
        assert e.mtime_ns == os.lstat(tree / "odd" / name).st_mtime_ns
    # A symlink to a directory is one entry, nothing below it.
    assert got["D/dirlink"].link == "b"
    assert not any(p.startswith("D/dirlink/") for p in got)
    assert (s.files, s.dirs, s.symlinks) == (8, 5, 4)
    assert s.bytes == s.data_bytes == 5 + 5000 + 10 + 4 * 1 and s.bytes_sparse == 0


def test_sources_and_file_ids(tree: Path) -> None:
    s = scan([tree])
    files = [i for i, e in enumerate(s.entries) if e.kind == Kind.FILE]
    assert sorted(s.sources) == files
    for i in files:
        e, ref = s.entries[i], s.sources[i]
        st = os.lstat(ref.path)
        assert ref.path == os.path.realpath(ref.path) and os.path.isabs(ref.path)
        assert ref.path.endswith(e.path)
        assert (ref.dev, ref.ino, ref.size, ref.mtime_ns, ref.ctime_ns) == (
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        assert len(e.file_id) == 16
    # The same formula as a single file's source.
    src = SourceFile.open(tree / "a.txt")
    try:
        assert _by_path(s)["D/a.txt"].file_id == src.file_id
    finally:
        src.close()


def test_top_level_names_and_single_file(tmp_path: Path, tree: Path) -> None:
    f = _write(tmp_path / "one.bin", b"x" * 100)
    (tmp_path / "link-to-one").symlink_to(f)
    (tmp_path / "link-to-D").symlink_to(tree)
    for given in (str(tree) + "/", f"{tree}/.", str(tmp_path / "link-to-D")):
        assert scan([given]).entries[0].path == "D"
    os.chdir(tree.parent)
    assert scan(["./D"]).entries[0].path == "D"
    s = scan([tmp_path / "link-to-one"])  # a symlink the user named is followed
    assert [(e.path, e.kind, e.size) for e in s.entries] == [("one.bin", Kind.FILE, 100)]
    assert s.sources[0].path == str(f.resolve())
    s = scan([f, tree])
    assert s.entries[0].path == "one.bin" and s.entries[1].path == "D"  # order as given
    assert len(scan([tree, f]).entries) == len(s.entries)


def test_sparse_file(tmp_path: Path) -> None:
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        os.truncate(f.fileno(), 64 << 20)
        for off in (1 << 20, 32 << 20):
            f.seek(off)
            f.write(b"\x55" * 4096)
    s = scan([p])
    e = s.entries[0]
    assert e.size == 64 << 20
    ext = e.extents
    pairs = list(zip(ext[::2], ext[1::2], strict=True))
    assert all(length > 0 for _, length in pairs)
    assert all(a + la <= b for (a, la), (b, _) in zip(pairs, pairs[1:], strict=False))
    for off in (1 << 20, 32 << 20):
        assert any(a <= off and off + 4096 <= a + la for a, la in pairs), (off, pairs)
    if os.stat(p).st_blocks * 512 >= e.size:
        pytest.skip("this file system keeps no holes")
    assert e.data_bytes < 1 << 20
    assert s.data_bytes == e.data_bytes and s.bytes == 64 << 20
    assert s.bytes_sparse == s.bytes - s.data_bytes > 60 << 20


def test_extents_of(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a" * 10000)
    with open(p, "rb") as f:
        assert extents_of(f.fileno(), 10000) == (0, 10000)
        assert extents_of(f.fileno(), 0) == ()
    hole = tmp_path / "hole"
    with open(hole, "wb") as f:
        os.truncate(f.fileno(), 1 << 20)
    with open(hole, "rb") as f:
        assert extents_of(f.fileno(), 1 << 20) in ((), (0, 1 << 20))


def test_merge_keeps_the_cap_and_covers_the_data() -> None:
    ext = [(0, 1), (3, 1), (10, 1), (11 + 1, 2), (100, 5)]
    assert _merge(ext, 5) == ext
    assert _merge(ext, 4) == [(0, 1), (3, 1), (10, 4), (100, 5)]  # the 1-byte hole
    assert _merge(ext, 2) == [(0, 14), (100, 5)]
    assert _merge(ext, 1) == [(0, 105)]
    many = [(i * 10 + (i % 3), 2) for i in range(1000)]
    merged = _merge(many, 100)
    assert len(merged) == 100
    data = {b for off, n in many for b in range(off, off + n)}
    assert data <= {b for off, n in merged for b in range(off, off + n)}


def test_skips_fifo_socket_and_bad_names(tmp_path: Path) -> None:
    d = tmp_path / "D"
    _write(d / "ok", b"ok")
    os.mkfifo(d / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(d / "sock"))
    except OSError:  # a path too long for AF_UNIX: no socket then
        pass
    bad = os.fsencode(str(d)) + b"/bad-\xff-name"
    with open(bad, "wb") as f:
        f.write(b"not sent")
    os.mkdir(os.fsencode(str(d)) + b"/bad-dir-\xfe")
    with open(os.fsencode(str(d)) + b"/bad-dir-\xfe/inside", "wb") as f:
        f.write(b"not sent either")
    _write(d / "ctl\x01name", b"x")
    _write(d / "nested" / "fifo-parent" / "keep", b"k")
    os.mkfifo(d / "nested" / "fifo-parent" / "pipe")
    warnings: list[str] = []
    try:
        s = scan([d], warn=warnings.append)
    finally:
        sock.close()
    assert [e.path for e in s.entries] == [
        "D",
        "D/nested",
        "D/nested/fifo-parent",
        "D/nested/fifo-parent/keep",
        "D/ok",
    ]
    why = {path.rsplit("/", 1)[-1]: reason for path, reason in s.skipped}
    assert why["fifo"] == "a FIFO" and why["pipe"] == "a FIFO"
    assert why.get("sock", "a socket") == "a socket"
    assert why["bad-\\xff-name"] == "its name is not UTF-8"
    assert why["bad-dir-\\xfe"] == "its name is not UTF-8"
    assert why["ctl\\x01name"] == "its name has control characters"
    assert len(warnings) == len(s.skipped) == len(why)
    assert f"skipping {d}/fifo: a FIFO" in warnings
    assert all(w.isprintable() for w in warnings)
    assert (s.files, s.dirs, s.symlinks) == (2, 3, 0)


def test_non_utf8_symlink_text_is_skipped(tmp_path: Path) -> None:
    d = tmp_path / "D"
    d.mkdir()
    os.symlink(b"target-\xff", os.fsencode(str(d / "l")))
    s = scan([d])
    assert [e.path for e in s.entries] == ["D"]
    assert s.skipped == [(f"{d}/l", "its link text is not UTF-8")]


def test_long_paths_are_skipped(tmp_path: Path) -> None:
    d = tmp_path / "D"
    d.mkdir()
    # Components of 200 bytes, made through descriptors: past 4096 bytes at depth 21.
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(22):
            os.mkdir("n" * 200, dir_fd=fd)
            fd, old = os.open("n" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(old)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    warnings: list[str] = []
    s = scan([d], warn=warnings.append)
    longest = max(len(e.path.encode()) for e in s.entries)
    assert longest <= 4096 and longest + len(str(tmp_path)) < 4096
    # The absolute path (a worker opens it) is always the longer one: it passes 4095 bytes
    # (PATH_MAX) no later than the relative one passes 4096.
    [(_, why)] = s.skipped
    assert why.startswith("its ") and "path is longer than" in why
    assert s.files == 0 and len(warnings) == 1
    _check_order(s.entries)


def test_refusals(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(UsageError, match="no such file or directory"):
        scan([tmp_path / "missing"])
    (tmp_path / "dangling").symlink_to("missing")
    with pytest.raises(UsageError, match="no such file or directory"):
        scan([tmp_path / "dangling"])
    with pytest.raises(UsageError, match="root"):
        scan(["/"])
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError, match="a FIFO"):
        scan([tmp_path / "fifo"])
    other = tmp_path / "elsewhere" / "D"
    other.mkdir(parents=True)
    with pytest.raises(UsageError, match="both arrive as D"):
        scan([tree, other])
    with pytest.raises(UsageError, match="both arrive as D"):
        scan([tree, str(tree) + "/"])
    with pytest.raises(UsageError, match="inside"):
        scan([tree, tree / "b"])
    with pytest.raises(UsageError, match="inside"):
        scan([tree / "b" / "c.bin", tree])
    (tmp_path / "src" / "D-x").mkdir()
    assert scan([tree, tmp_path / "src" / "D-x"]).entries[-1].path == "D-x"  # beside, not inside
    with pytest.raises(UsageError, match="nothing to send"):
        scan([])
    _write(tmp_path / "x.stxpart", b"")
    with pytest.raises(UsageError, match="reserved"):
        scan([tmp_path / "x.stxpart"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_and_directory(tmp_path: Path) -> None:
    d = tmp_path / "D"
    secret = _write(d / "secret", b"s", 0o000)
    with pytest.raises(UsageError, match="secret: cannot read"):
        scan([d])
    secret.chmod(0o600)
    (d / "closed").mkdir(mode=0o000)
    try:
        with pytest.raises(UsageError, match="closed: cannot read"):
            scan([d])
    finally:
        (d / "closed").chmod(0o700)


def test_unreadable_as_root_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusals where root would read anything: open() and access() made to say
    EACCES."""
    d = tmp_path / "D"
    _write(d / "secret", b"s")
    (d / "closed").mkdir()
    real_open = os.open
    denied = {"secret"}

    def fake_open(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if os.path.basename(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    real_access = os.access

    def fake_access(path: str, mode: int, **kw: object) -> bool:
        # a file without holes is not opened by the walk: access() is asked instead
        if os.path.basename(path) in denied:
            return False
        return real_access(path, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "access", fake_access)
    with pytest.raises(UsageError, match="D/secret: cannot read: Permission denied"):
        scan([d])
    denied = {"closed"}
    with pytest.raises(UsageError, match="D/closed: cannot read: Permission denied"):
        scan([d])


def test_check_unchanged(tmp_path: Path) -> None:
    d = tmp_path / "D"
    for name in ("a", "b", "c"):
        _write(d / name, name.encode() * 10)
    s = scan([d])
    s.check_unchanged()
    os.utime(d / "b", ns=(OLD, OLD))  # touched
    with pytest.raises(SourceChangedError, match="/D/b changed"):
        s.check_unchanged()
    s = scan([d])
    _write(d / "new", b"b" * 10)
    os.replace(d / "new", d / "c")  # replaced
    with pytest.raises(SourceChangedError, match="/D/c names another file"):
        s.check_unchanged()
    s = scan([d])
    (d / "a").unlink()  # deleted
    with pytest.raises(SourceChangedError, match="/D/a was removed"):
        s.check_unchanged()
    assert SourceChangedError("").exit_code == 5


def test_no_descriptors_kept(tree: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    scan([tree])
    assert set(os.listdir("/proc/self/fd")) <= before


def test_scan_speed_10000_small_files(tmp_path: Path) -> None:
    """10,000 files of 16 KiB in 100 directories (the issue's tree): printed, never asserted."""
    root = tmp_path / "T"
    data = b"\x5a" * 16384
    for i in range(100):
        sub = root / f"d{i:03}"
        sub.mkdir(parents=True)
        for j in range(100):
            (sub / f"f{j:03}").write_bytes(data)
    scan([root])  # warm the caches
    t0 = time.perf_counter()
    s = scan([root])
    elapsed = time.perf_counter() - t0
    assert (s.files, s.dirs, s.bytes) == (10_000, 101, 10_000 * 16384)
    print(f"\nscan of 10,000 files of 16 KiB in 100 directories: {elapsed:.3f} s")
