"""A receiver worker's tree target with the coordinator's tree files: real files in a real
staging directory. A pack's small files are finished by the worker as it writes them (size,
mode, mtime, then fsync), so that the coordinator only checks and renames them; what the worker
must not finish (a mode that takes the owner's write away, a partial already there) the
coordinator still does, and every file lands as the manifest says."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from stxpar.workers.receiver import _TreeTarget

from stxpar import layout, treefiles
from stxpar.digest import block_digest
from stxpar.manifest import Entry, Kind, Manifest

BS = 1 << 16
T0 = 1_234_567_890_123_456_789


def F(path: str, data: bytes, mode: int, size: int | None = None) -> Entry:
    return Entry(
        kind=Kind.FILE,
        path=path,
        size=len(data) if size is None else size,
        mode=mode,
        mtime_ns=T0,
        extents=(0, len(data)),
        file_id=path.encode().ljust(16, b"\0")[:16],
    )


FILES = {
    "T/a": (b"alpha" * 100, 0o644, None),
    "T/ro": (b"read only" * 10, 0o444, None),
    "T/x": (b"#!/bin/sh\n", 0o755, None),
    "T/hole": (b"data then a hole", 0o640, 5000),  # a small file with a trailing hole
}


def manifest() -> Manifest:
    entries = [Entry(kind=Kind.DIR, path="T", size=0, mode=0o755, mtime_ns=T0)]
    entries += [F(p, d, m, s) for p, (d, m, s) in FILES.items()]
    return Manifest(entries, block_size=BS)


def plan(m: Manifest) -> layout.Layout:
    names = {
        i: (treefiles.partial_name(m.key(i)), e.size, e.mtime_ns, e.mode)
        for i, e in enumerate(m.entries)
        if e.extents
    }
    return layout.Layout.named(BS, [e.extents for e in m.entries], names)


def the_pack(m: Manifest) -> tuple[int, bytes]:
    """The one block that holds every file, and its plaintext."""
    assert m.space.total == 1
    ref = m.space.locate(0)
    assert ref.count == len(FILES)  # one pack
    return 0, b"".join(FILES[m.entries[i].path][0] for i in range(1, len(m.entries)))


def admit(dest: Path, m: Manifest) -> treefiles.TreeOpened:
    return treefiles.open_tree(dest, m, remembered=lambda digest: None, on_restart=print)


def land(dest: Path, m: Manifest, opened: treefiles.TreeOpened) -> None:
    b, plain = the_pack(m)
    target = _TreeTarget(str(opened.staging), opened.inode(), plan(m))
    try:
        target.write_pack(memoryview(plain), m.space.members(m.space.locate(b)))
    finally:
        target.close()
    opened.log.append([(b, block_digest(plain))])


def check_landed(dest: Path) -> None:
    for path, (data, mode, size) in FILES.items():
        st = os.lstat(dest / path)
        assert stat.S_IMODE(st.st_mode) == mode, path
        assert st.st_mtime_ns == T0, path
        assert st.st_size == (len(data) if size is None else size), path
        body = (dest / path).read_bytes()
        assert body == data + bytes(st.st_size - len(data)), path


@pytest.mark.parametrize("umask", [0o077, 0o022])  # made 0600 then chmod, or made with it
def test_the_worker_finishes_a_packs_new_partials(tmp_path: Path, umask: int) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    m = manifest()
    opened = admit(dest, m)
    b, plain = the_pack(m)
    target = _TreeTarget(str(opened.staging), opened.inode(), plan(m), umask)
    try:
        target.write_pack(memoryview(plain), m.space.members(m.space.locate(b)))
    finally:
        target.close()
    for i, e in enumerate(m.entries):
        if e.kind != Kind.FILE:
            continue
        st = os.lstat(opened.staging / treefiles.partial_name(m.key(i)))
        assert st.st_size == e.size and st.st_mtime_ns == T0, e.path
        # The owner must still be able to write it (a block may come again): 0o444 waits.
        want = e.mode if e.mode & 0o600 == 0o600 else 0o600
        assert stat.S_IMODE(st.st_mode) == want, e.path
        assert not (dest / e.path).exists()  # in place only once the block is logged
    opened.log.append([(b, block_digest(plain))])
    check_landed(dest)
    treefiles.finalize(opened, mode=0o600)
    check_landed(dest)
    assert sorted(os.listdir(dest / "T")) == sorted(p.split("/")[1] for p in FILES)


def test_a_partial_already_there_is_written_and_finished_by_the_coordinator(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    m = manifest()
    opened = admit(dest, m)
    for i, e in enumerate(m.entries):  # torn earlier writes of the same files
        if e.kind == Kind.FILE:
            stale = opened.staging / treefiles.partial_name(m.key(i))
            stale.write_bytes(b"x" * (e.extents[1] // 2))
            stale.chmod(0o600)
    land(dest, m, opened)
    check_landed(dest)
    treefiles.finalize(opened, mode=0o600)
    check_landed(dest)


def test_a_file_in_the_way_at_admission_is_replaced_whole(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "T").mkdir(parents=True)
    (dest / "T" / "a").write_bytes(b"old contents")
    os.symlink("elsewhere", dest / "T" / "x")
    m = manifest()
    opened = admit(dest, m)
    land(dest, m, opened)
    check_landed(dest)
    treefiles.finalize(opened, mode=0o600)
    assert not os.path.islink(dest / "T" / "x")
