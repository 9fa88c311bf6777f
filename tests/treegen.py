"""The test tree of issue 13 (stx3), and the comparisons the tree tests make.

``make_tree(root)`` builds, under a new directory ``root``, every kind of entry a tree
transfer must get right: nested and empty directories, 0-byte files, unicode and odd names,
files with modes 0600/0640/0755, a 0700 directory, old mtimes (with sub-second parts) on
files and directories, relative, dangling and absolute symlinks (the absolute one points
outside the tree, at a sentinel file beside ``root``), a sparse file and a FIFO. It returns
the facts a test needs about it (see ``make_tree``).

``compare_trees(src, dst)`` lists every difference between two trees without following a
symlink; ``diff_r(src, dst)`` runs ``diff -r --no-dereference`` for a second opinion.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20

#: 2001-09-09 01:46:40 UTC (1e9 s), with a sub-second part that is not a whole millisecond.
OLD_NS = 1_000_000_000_123_456_000
#: Another old time, for directories: 2003-02-01 (with its own sub-second part).
OLD_DIR_NS = 1_044_057_600_654_321_000

SPARSE_SIZE = 64 * MiB
#: (offset, length) of the data regions of the sparse file; it starts and ends with a hole.
SPARSE_DATA = ((4 * MiB, 4 * KiB), (40 * MiB, 4 * KiB))

FIFO = "pipes/named.fifo"
SPARSE = "sparse/holes.img"
ABS_LINK = "links/abs-to-sentinel"

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char device",
    stat.S_IFBLK: "block device",
}


def _data(name: str, size: int) -> bytes:
    """Deterministic bytes that differ from file to file (so a swap of two files shows)."""
    out = bytearray()
    counter = 0
    seed = name.encode()
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


def make_tree(root: Path, *, big_size: int = 3 * MiB + 17) -> dict[str, Any]:
    """Build the test tree in the new directory ``root`` (its parent must exist).

    A sentinel file is written beside it, at ``root.parent / (root.name + ".sentinel")``,
    outside the tree: the absolute symlink points at it, and a test checks it was not touched
    (its bytes and mtime are in the facts).

    Returns a dict:

    * ``root``: ``root``;
    * ``fifo``: relative path (str) of the FIFO, which a copy must NOT contain;
    * ``skip``: ``{fifo}``, for ``compare_trees(..., skip=...)``;
    * ``sparse``: relative path of the sparse file, ``sparse_size`` its apparent size,
      ``sparse_data`` its data regions ((offset, length), ...); the rest is holes;
    * ``sentinel``: absolute path of the sentinel, ``sentinel_bytes`` and
      ``sentinel_mtime_ns`` what it held when made;
    * ``symlinks``: {relative path: link text}; ``abs_link``: the absolute one's path;
    * ``files``, ``dirs``: sorted relative paths of the regular files and the directories
      (``dirs`` without the root itself), ``empty_dirs``, ``empty_files``;
    * ``modes``: {relative path: mode & 0o777} of the entries given a mode on purpose;
    * ``bytes``: total apparent size of the regular files.
    """
    root = Path(root)
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    sentinel = root.parent / (root.name + ".sentinel")
    sentinel.write_bytes(b"sentinel: nothing may write here\n")
    os.utime(sentinel, ns=(OLD_NS, OLD_NS))

    dirs = [
        "a",
        "a/b",
        "a/b/c",
        "a/b/c/d",
        "a/b/empty-inner",
        "empty",
        "private",
        "данные",
        "数据",
        "数据/子目录",
        "dir with spaces",
        "-dash-dir",
        "links",
        "pipes",
        "sparse",
        "modes",
    ]
    for d in dirs:
        (root / d).mkdir(mode=0o755)
        os.chmod(root / d, 0o755)

    files: dict[str, int] = {
        "top.txt": 100,
        "zero.bin": 0,
        "a/one.txt": 1,
        "a/zero": 0,
        "a/b/block-edge.bin": 64 * KiB,
        "a/b/c/d/deep.txt": 4097,
        "big.bin": big_size,
        "данные/файл.txt": 777,
        "数据/文件.dat": 2048,
        "数据/子目录/深.bin": 33 * KiB,
        "ملف.txt": 123,
        "dir with spaces/file with spaces.txt": 55,
        "-dash-dir/-leading-dash": 42,
        "-leading-dash.txt": 43,
        "odd 'quote\" #hash %pct [br] {cb} ;semi.txt": 9,
        "emoji-🙂.txt": 16,
        "private/secret.txt": 256,
        "modes/rw-------": 10,
        "modes/rw-r-----": 11,
        "modes/rwxr-xr-x": 12,
    }
    for rel, size in files.items():
        p = root / rel
        p.write_bytes(_data(rel, size))
        os.chmod(p, 0o644)
    modes = {
        "modes/rw-------": 0o600,
        "modes/rw-r-----": 0o640,
        "modes/rwxr-xr-x": 0o755,
        "private/secret.txt": 0o600,
        "top.txt": 0o640,
    }
    for rel, mode in modes.items():
        os.chmod(root / rel, mode)

    sparse = root / SPARSE
    fd = os.open(sparse, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, SPARSE_SIZE)
        for off, length in SPARSE_DATA:
            os.pwrite(fd, _data(f"sparse@{off}", length), off)
    finally:
        os.close(fd)
    os.chmod(sparse, 0o644)
    files[SPARSE] = SPARSE_SIZE

    symlinks = {
        "links/rel-file": "../a/b/c/d/deep.txt",
        "links/rel-dir": "../a",
        "links/dangling": "does/not/exist",
        ABS_LINK: str(sentinel.resolve()),
        "数据/link to данные": "../данные/файл.txt",
    }
    for rel, text in symlinks.items():
        os.symlink(text, root / rel)

    os.mkfifo(root / FIFO, 0o644)

    # Old times on every file, then on every directory deepest first (a directory's mtime
    # changes whenever an entry is made in it), the private directory's mode last of all.
    for i, rel in enumerate(sorted(files)):
        t = OLD_NS + i * 1_000_001_000  # distinct times, distinct sub-second parts
        os.utime(root / rel, ns=(t, t))
    os.utime(root / FIFO, ns=(OLD_NS, OLD_NS))
    modes["private"] = 0o700
    os.chmod(root / "private", 0o700)
    for i, rel in enumerate(sorted(dirs, key=lambda d: (-d.count("/"), d))):
        t = OLD_DIR_NS + i * 2_000_003_000
        os.utime(root / rel, ns=(t, t))
    os.utime(root, ns=(OLD_DIR_NS - 86_400 * 10**9, OLD_DIR_NS - 86_400 * 10**9))

    return {
        "root": root,
        "fifo": FIFO,
        "skip": {FIFO},
        "sparse": SPARSE,
        "sparse_size": SPARSE_SIZE,
        "sparse_data": SPARSE_DATA,
        "sentinel": sentinel,
        "sentinel_bytes": sentinel.read_bytes(),
        "sentinel_mtime_ns": sentinel.stat().st_mtime_ns,
        "symlinks": dict(symlinks),
        "abs_link": ABS_LINK,
        "files": sorted(files),
        "empty_files": sorted(rel for rel, size in files.items() if size == 0),
        "dirs": sorted(dirs),
        "empty_dirs": ["a/b/empty-inner", "empty"],
        "modes": modes,
        "bytes": sum(files.values()),
    }


def allocated(path: Path) -> int:
    """Bytes the file really holds on disk (``st_blocks`` x 512): small for a sparse file."""
    return os.lstat(path).st_blocks * 512


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative posix path, lstat) of every entry below ``root``, never following a link."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for entry in it:
                sub = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                yield sub, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(sub)


def _kind(st: os.stat_result) -> str:
    return _KINDS.get(stat.S_IFMT(st.st_mode), f"mode {stat.S_IFMT(st.st_mode):o}")


def _same_bytes(a: Path, b: Path) -> int | None:
    """None when the two files hold the same bytes, else the offset of the first difference."""
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        off = 0
        while True:
            x = fa.read(MiB)
            y = fb.read(MiB)
            if x != y:
                n = min(len(x), len(y))
                first = next((i for i in range(n) if x[i] != y[i]), n)
                return off + first
            if not x:
                return None
            off += len(x)


def _skipped(rel: str, skip: Iterable[str]) -> bool:
    return any(rel == s.rstrip("/") or rel.startswith(s.rstrip("/") + "/") for s in skip)


def compare_trees(
    src: Path, dst: Path, *, skip: Iterable[str] = frozenset(), check_root: bool = True
) -> list[str]:
    """Every difference between the trees ``src`` and ``dst``; an empty list if identical.

    Compared, without following any symlink (lstat): the set of relative paths, the kind of
    each entry, the bytes of regular files, the permission bits (``& 0o777``) and the mtime
    (to the microsecond) of files and directories, and the text of symlinks. Paths in
    ``skip`` (relative, posix) and everything below them are ignored. ``check_root`` also
    compares the two roots' own permission bits and mtimes (reported as ``.``).
    """
    src, dst = Path(src), Path(dst)
    skip = set(skip)
    problems: list[str] = []
    if not dst.is_dir() or dst.is_symlink():
        return [f".: {dst} is not a directory"]
    a = {rel: st for rel, st in _walk(src) if not _skipped(rel, skip)}
    b = {rel: st for rel, st in _walk(dst) if not _skipped(rel, skip)}
    for rel in sorted(a.keys() - b.keys()):
        problems.append(f"{rel}: missing in the copy ({_kind(a[rel])})")
    for rel in sorted(b.keys() - a.keys()):
        problems.append(f"{rel}: extra in the copy ({_kind(b[rel])})")
    pairs = [(rel, a[rel], b[rel]) for rel in sorted(a.keys() & b.keys())]
    if check_root:
        pairs.insert(0, (".", os.lstat(src), os.lstat(dst)))
    for rel, sa, sb in pairs:
        ka, kb = _kind(sa), _kind(sb)
        if ka != kb:
            problems.append(f"{rel}: {ka} in the source, {kb} in the copy")
            continue
        if ka in ("file", "dir"):
            ma, mb = stat.S_IMODE(sa.st_mode) & 0o777, stat.S_IMODE(sb.st_mode) & 0o777
            if ma != mb:
                problems.append(f"{rel}: mode {ma:04o} in the source, {mb:04o} in the copy")
            ta, tb = sa.st_mtime_ns // 1000, sb.st_mtime_ns // 1000
            if ta != tb:
                problems.append(
                    f"{rel}: mtime {sa.st_mtime_ns} ns in the source, {sb.st_mtime_ns} ns in the"
                    " copy"
                )
        if ka == "file":
            if sa.st_size != sb.st_size:
                problems.append(
                    f"{rel}: {sa.st_size} bytes in the source, {sb.st_size} in the copy"
                )
            else:
                where = _same_bytes(src / rel, dst / rel)
                if where is not None:
                    problems.append(f"{rel}: contents differ from byte {where}")
        elif ka == "symlink":
            la, lb = os.readlink(src / rel), os.readlink(dst / rel)
            if la != lb:
                problems.append(f"{rel}: link text {la!r} in the source, {lb!r} in the copy")
    return problems


def diff_r(src: Path, dst: Path, *, exclude: Iterable[str] = ()) -> int:
    """``diff -r --no-dereference SRC DST``'s exit code (0: same); its output is printed.

    ``exclude`` are file name patterns (``diff --exclude``, matched against base names), e.g.
    the FIFO's name, which the copy must not contain.
    """
    argv = ["diff", "-r", "--no-dereference"]
    argv += [f"--exclude={pat}" for pat in exclude]
    argv += ["--", str(src), str(dst)]
    out = subprocess.run(argv, capture_output=True, timeout=300)
    if out.returncode:
        print(out.stdout.decode(errors="replace")[-4000:], out.stderr.decode(errors="replace"))
    return out.returncode
