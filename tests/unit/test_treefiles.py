"""The receiver's storage of a tree, on real files: admission, per-file finalize, finalize,
resume, plants, end."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from stxpar import treefiles, treestate
from stxpar.blocks import BlockLedger, BlockSpace
from stxpar.errors import RejectedError
from stxpar.manifest import Entry, Kind, Manifest
from stxpar.treefiles import TreeOpened, end, finalize, gone, open_tree, partial_name, staging_name

pytestmark = pytest.mark.timeout(60)

BS = 4096
T0 = 1_500_000_000_123_456_789


def F(path: str, data: bytes, *, mode: int = 0o644, mtime: int = T0, sparse: bool = False) -> Entry:
    if sparse:  # data, then a trailing hole as long again and more
        extents: tuple[int, ...] = (0, len(data)) if data else ()
        size = len(data) * 2 + 5000
    else:
        extents, size = ((0, len(data)) if data else ()), len(data)
    fid = hashlib.sha256(path.encode() + data + str(mtime).encode()).digest()[:16]
    return Entry(Kind.FILE, path, size, mode, mtime, extents=extents, file_id=fid)


def D(path: str, *, mode: int = 0o755, mtime: int = T0) -> Entry:
    return Entry(Kind.DIR, path, 0, mode, mtime)


def L(path: str, link: str, *, mtime: int = T0) -> Entry:
    return Entry(Kind.SYMLINK, path, 0, 0o777, mtime, link=link)


def content(e: Entry, data: bytes) -> bytes:
    return data + bytes(e.size - len(data))


class Tree:
    """A manifest and the content of each file, and a simulated worker."""

    def __init__(self, entries: list[tuple[Entry, bytes]]) -> None:
        self.entries = [e for e, _ in entries]
        self.data = {e.path: content(e, d) for e, d in entries}
        self.m = Manifest(self.entries, block_size=BS)

    def write(self, opened: TreeOpened, blocks: Iterable[int]) -> list[tuple[int, bytes]]:
        """What a receiver worker does: pwrite each block into its partial, fdatasync."""
        sfd = os.open(opened.staging, os.O_RDONLY | os.O_DIRECTORY)
        out = []
        try:
            for b in blocks:
                ref = self.m.space.locate(b)
                e = self.m.entries[ref.entry]
                chunk = self.data[e.path][ref.offset : ref.offset + ref.length]
                fd = os.open(
                    partial_name(self.m.key(ref.entry)),
                    os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=sfd,
                )
                try:
                    os.pwrite(fd, chunk, ref.offset)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                out.append((b, hashlib.md5(chunk).digest()))
        finally:
            os.close(sfd)
        return out

    def blocks_of(self, path: str) -> range:
        return self.m.space.entry_blocks([e.path for e in self.entries].index(path))

    def send(self, opened: TreeOpened, blocks: Iterable[int]) -> None:
        opened.log.append(self.write(opened, blocks))


def admit(
    dest: Path,
    m: Manifest,
    restarts: list[str] | None = None,
    remembered: Callable[[bytes], BlockLedger | None] | None = None,
) -> TreeOpened:
    return open_tree(
        dest,
        m,
        remembered=remembered or (lambda digest: None),
        on_restart=(restarts if restarts is not None else []).append,
    )


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "victim").write_bytes(b"precious")
    return o


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for p in root.rglob("*"):
        st = p.lstat()
        body = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        out[str(p)] = (st.st_mode, st.st_mtime_ns, body)
    return out


def make(entries: list[tuple[Entry, bytes]]) -> Tree:
    return Tree(entries)


def tree_basic() -> Tree:
    big = os.urandom(3 * BS - 100)
    return make(
        [
            (D("D", mode=0o750), b""),
            (D("D/sub"), b""),
            (F("D/big.bin", big, mode=0o640), big),
            (F("D/small", b"hello"), b"hello"),
            (F("D/sub/empty", b""), b""),
            (L("D/link", "small"), b""),
        ]
    )


def all_blocks(t: Tree) -> range:
    return range(t.m.space.total)


# ---------------------------------------------------------------- names


def test_names() -> None:
    a = staging_name(["D", "x"])
    assert a == staging_name(("x", "D"))
    assert a.startswith(".stx-") and a.endswith(".stxtree") and len(a) == 5 + 16 + 8
    assert a != staging_name(["D"])
    assert partial_name(b"\x01" * 16) == "01" * 16


# ---------------------------------------------------------------- admission and progress


def test_admission_makes_directories_and_staging_only(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    try:
        assert not opened.complete and opened.ledger.count == 0 and opened.files_done == 0
        st = opened.staging.name
        assert listing(dest) == sorted(["D", "D/sub", st, f"{st}/state"])
        assert stat.S_IMODE((dest / "D").stat().st_mode) == 0o700
        assert stat.S_IMODE(opened.staging.stat().st_mode) == 0o700
        assert opened.inode() == (opened.staging.stat().st_dev, opened.staging.stat().st_ino)
        assert opened.identity == t.m.digest
        assert not gone(opened)
    finally:
        end(opened, "keep")


def test_files_appear_only_when_complete(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    big = t.blocks_of("D/big.bin")
    t.send(opened, [big[0]])
    assert not (dest / "D/big.bin").exists()
    t.send(opened, t.blocks_of("D/small"))
    small = dest / "D/small"
    assert small.read_bytes() == b"hello"
    assert stat.S_IMODE(small.stat().st_mode) == 0o644 and small.stat().st_mtime_ns == T0
    assert opened.files_done == 1
    t.send(opened, list(big)[1:] + [big[0]])  # a block reported again is harmless
    f = dest / "D/big.bin"
    assert f.read_bytes() == t.data["D/big.bin"]
    assert stat.S_IMODE(f.stat().st_mode) == 0o640 and f.stat().st_mtime_ns == T0
    assert opened.files_done == 2
    assert not (dest / "D/sub/empty").exists() and not (dest / "D/link").exists()
    finalize(opened, mode=0o600)
    assert (dest / "D/sub/empty").read_bytes() == b""
    assert os.readlink(dest / "D/link") == "small"
    assert stat.S_IMODE((dest / "D").stat().st_mode) == 0o750
    assert (dest / "D").stat().st_mtime_ns == T0
    assert listing(dest) == ["D", "D/big.bin", "D/link", "D/small", "D/sub", "D/sub/empty"]
    end(opened, "discard")  # after a finalize: nothing to do
    assert (dest / "D/big.bin").exists()


def test_sparse_file_keeps_its_trailing_hole(dest: Path) -> None:
    data = os.urandom(BS + 10)
    e = F("S/sparse", data, sparse=True)
    t = make([(D("S"), b""), (e, data)])
    opened = admit(dest, t.m)
    t.send(opened, all_blocks(t))
    f = dest / "S/sparse"
    assert f.stat().st_size == e.size == 2 * len(data) + 5000
    assert f.read_bytes() == t.data["S/sparse"]
    if t.m.space.total == 2:  # blocks over the data only (BlockSpace.of_extents)
        assert f.stat().st_blocks * 512 < e.size
    finalize(opened, mode=0)
    assert f.stat().st_mtime_ns == T0


def test_finalize_makes_empty_files_symlinks_and_directories_last(
    dest: Path, outside: Path
) -> None:
    hole = F("T/ro/hole", b"", sparse=True)
    t = make(
        [
            (D("T", mode=0o755, mtime=T0 + 1), b""),
            (D("T/priv", mode=0o700, mtime=T0 + 2), b""),
            (D("T/ro", mode=0o555, mtime=T0 + 3), b""),
            (F("T/ro/f", b"x" * 10, mode=0o600, mtime=T0 + 4), b"x" * 10),
            (hole, b""),
            (D("T/ro/deep", mode=0o555, mtime=T0 + 5), b""),
            (L("T/rel", "../T/ro/f", mtime=T0 + 6), b""),
            (L("T/dangling", "no/such/file", mtime=T0 + 7), b""),
            (L("T/abs", str(outside / "victim"), mtime=T0 + 8), b""),
            (D("T/empty", mode=0o711, mtime=T0 + 9), b""),
        ]
    )
    before = snapshot(outside)
    opened = admit(dest, t.m)
    t.send(opened, all_blocks(t))
    finalize(opened, mode=0o600)
    T = dest / "T"
    try:
        assert os.readlink(T / "rel") == "../T/ro/f"
        assert os.readlink(T / "dangling") == "no/such/file"
        assert os.readlink(T / "abs") == str(outside / "victim")
        assert os.lstat(T / "abs").st_mtime_ns == T0 + 8
        assert os.lstat(T / "dangling").st_mtime_ns == T0 + 7
        assert (T / "ro/hole").stat().st_size == hole.size
        assert (T / "ro/hole").read_bytes() == bytes(hole.size)
        modes = {
            p: stat.S_IMODE((T / p).stat().st_mode) for p in ("", "priv", "ro", "ro/deep", "empty")
        }
        assert modes == {"": 0o755, "priv": 0o700, "ro": 0o555, "ro/deep": 0o555, "empty": 0o711}
        times = {p: (T / p).stat().st_mtime_ns for p in ("", "priv", "ro", "ro/deep", "empty")}
        assert times == {
            "": T0 + 1,
            "priv": T0 + 2,
            "ro": T0 + 3,
            "ro/deep": T0 + 5,
            "empty": T0 + 9,
        }
        assert (T / "ro/f").stat().st_mtime_ns == T0 + 4
        assert not opened.staging.exists()
        assert listing(dest) == sorted(
            [
                "T",
                "T/priv",
                "T/ro",
                "T/ro/f",
                "T/ro/hole",
                "T/ro/deep",
                "T/rel",
                "T/dangling",
                "T/abs",
                "T/empty",
            ]
        )
        assert snapshot(outside) == before
    finally:
        for p in ("ro/deep", "ro"):
            os.chmod(T / p, 0o755)


def test_existing_tree_is_merged_and_files_replaced_whole(dest: Path, outside: Path) -> None:
    (dest / "D").mkdir()
    (dest / "D/keep").write_text("mine")
    os.symlink(outside / "victim", dest / "D/small")  # replaced, never followed
    os.chmod(dest / "D", 0o500)  # lacks u+w: given it for the transfer
    t = tree_basic()
    opened = admit(dest, t.m)
    t.send(opened, all_blocks(t))
    finalize(opened, mode=0)
    assert (outside / "victim").read_bytes() == b"precious"
    assert not (dest / "D/small").is_symlink() and (dest / "D/small").read_bytes() == b"hello"
    assert (dest / "D/keep").read_text() == "mine"
    assert stat.S_IMODE((dest / "D").stat().st_mode) == 0o750


# ---------------------------------------------------------------- resume


def test_resume_keeps_held_blocks_and_finished_files(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    big = list(t.blocks_of("D/big.bin"))
    t.send(opened, t.blocks_of("D/small"))
    t.send(opened, big[:2])
    end(opened, "keep")
    end(opened, "keep")
    assert opened.staging.exists()
    restarts: list[str] = []
    again = admit(dest, t.m, restarts)
    try:
        assert restarts == []
        assert sorted(again.ledger.held()) == sorted(list(t.blocks_of("D/small")) + big[:2])
        assert again.files_done == 1
        assert (
            again.ledger.held_pairs()
            == BlockLedger.of(
                t.m.space, t.write(again, sorted(list(t.blocks_of("D/small")) + big[:2]))
            ).held_pairs()
        )
        t.send(again, big[2:])
        finalize(again, mode=0)
    finally:
        again.close()
    assert (dest / "D/big.bin").read_bytes() == t.data["D/big.bin"]


def test_a_changed_file_starts_over_alone(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    big = list(t.blocks_of("D/big.bin"))
    t.send(opened, t.blocks_of("D/small"))
    t.send(opened, big[:2])
    old_key = partial_name(
        t.m.key(t.entries.index(next(e for e in t.entries if e.path == "D/big.bin")))
    )
    end(opened, "keep")
    # big.bin changed at the source (other mtime: another key); small is unchanged.
    entries = [
        (F(e.path, t.data[e.path], mode=e.mode, mtime=T0 + 99) if e.path == "D/big.bin" else e)
        for e in t.entries
    ]
    t2 = Tree([(e, t.data[e.path]) for e in entries])
    again = admit(dest, t2.m)
    try:
        assert list(again.ledger.held()) == list(t2.blocks_of("D/small"))
        assert again.files_done == 1
        assert not (again.staging / old_key).exists()
        t2.send(again, t2.blocks_of("D/big.bin"))
        finalize(again, mode=0)
    finally:
        again.close()
    assert (dest / "D/big.bin").stat().st_mtime_ns == T0 + 99


def test_a_finished_file_deleted_meanwhile_starts_over(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    t.send(opened, t.blocks_of("D/small"))
    end(opened, "keep")
    (dest / "D/small").unlink()
    again = admit(dest, t.m)
    try:
        assert again.ledger.count == 0 and again.files_done == 0
    finally:
        end(again, "keep")
    (dest / "D/small").write_bytes(b"hellp")  # same size, other mtime
    again = admit(dest, t.m)
    try:
        assert again.ledger.count == 0
    finally:
        again.close()


def test_a_damaged_log_restarts(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    t.send(opened, t.blocks_of("D/big.bin")[:1])
    end(opened, "keep")
    (opened.staging / "state").write_bytes(b"garbage")
    restarts: list[str] = []
    again = admit(dest, t.m, restarts)
    try:
        assert again.ledger.count == 0 and len(restarts) == 1
    finally:
        again.close()


def test_remembered_completion_does_nothing(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    t.send(opened, all_blocks(t))
    ledger = BlockLedger.of(t.m.space, t.write(opened, []))
    finalize(opened, mode=0)
    got = admit(dest, t.m, remembered=lambda digest: ledger if digest == t.m.digest else None)
    assert got.complete and got.inode() is None and not gone(got)
    assert not got.staging.exists()
    got.log.append([])
    finalize(got, mode=0)
    end(got, "discard")
    # Not remembered: a new staging dir, nothing held (the log went with the last one).
    again = admit(dest, t.m)
    assert not again.complete and again.staging.exists()
    end(again, "discard")
    assert not again.staging.exists()


def test_a_cut_off_rerun_of_a_remembered_tree_is_finished_not_taken_as_done(dest: Path) -> None:
    """A tree completed (and remembered), sent again, and that run cut off after every file
    was in place but before its finalize: the staging directory is there, the directories
    are still 0700. The next run must resume and finalize (modes, mtimes), not answer
    "complete" from memory because every file looks in place."""
    big = os.urandom(3 * BS - 100)
    t = make(  # files with data only: all of them are in place before finalize
        [
            (D("D", mode=0o750), b""),
            (D("D/sub", mode=0o755), b""),
            (F("D/big.bin", big, mode=0o640), big),
            (F("D/sub/small", b"hello"), b"hello"),
        ]
    )
    first = admit(dest, t.m)
    t.send(first, all_blocks(t))
    ledger = BlockLedger.of(t.m.space, t.write(first, []))
    finalize(first, mode=0)
    shutil.rmtree(dest / "D")  # the copy removed; then the same tree again, cut off at the end
    rerun = admit(dest, t.m)
    t.send(rerun, all_blocks(t))
    end(rerun, "keep")
    assert stat.S_IMODE(os.stat(dest / "D").st_mode) == 0o700
    got = admit(dest, t.m, remembered=lambda digest: ledger if digest == t.m.digest else None)
    assert not got.complete
    got.log.append([])
    finalize(got, mode=0)
    for e in t.m.entries:
        if e.kind == Kind.DIR:
            st = os.stat(dest / e.path)
            assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (e.mode, e.mtime_ns)
    assert not got.staging.exists()


# ---------------------------------------------------------------- plants and refusals


@pytest.mark.parametrize("planted", ["D", "D/sub"])
def test_a_symlink_where_a_directory_goes_is_refused(
    dest: Path, outside: Path, planted: str
) -> None:
    if planted == "D/sub":
        (dest / "D").mkdir()
    os.symlink(outside, dest / planted)
    before = snapshot(outside)
    t = make([(D("D"), b""), (D("D/sub"), b""), (F("D/sub/x", b"evil"), b"evil")])
    with pytest.raises(RejectedError, match="not a directory; refusing to write through it"):
        admit(dest, t.m)
    assert snapshot(outside) == before
    assert sorted(p.name for p in dest.iterdir()) == ["D"]
    assert not any(p.name.endswith(".stxtree") for p in dest.iterdir())


def test_a_file_where_a_directory_goes_is_refused(dest: Path) -> None:
    (dest / "D").write_text("file")
    t = make([(D("D"), b""), (F("D/x", b"1"), b"1")])
    with pytest.raises(RejectedError, match="D exists in the destination and is not a directory"):
        admit(dest, t.m)
    assert listing(dest) == ["D"]


def test_a_directory_where_a_file_goes_is_refused(dest: Path) -> None:
    (dest / "D/x").mkdir(parents=True)
    t = make([(D("D"), b""), (F("D/x", b"1"), b"1")])
    with pytest.raises(RejectedError, match="D/x exists in the destination and is a directory"):
        admit(dest, t.m)
    assert listing(dest) == ["D", "D/x"]
    t = make([(D("D"), b""), (L("D/x", "y"), b"")])
    with pytest.raises(RejectedError):
        admit(dest, t.m)


def test_a_directory_planted_during_the_transfer_stops_the_file(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    (dest / "D/small").mkdir()
    with pytest.raises(OSError, match="D/small is a directory"):
        t.send(opened, t.blocks_of("D/small"))
    end(opened, "keep")


def test_staging_planted_as_a_symlink_is_refused(dest: Path, outside: Path) -> None:
    t = tree_basic()
    os.symlink(outside, dest / staging_name(t.m.roots))
    before = snapshot(outside)
    with pytest.raises(RejectedError, match="not a directory"):
        admit(dest, t.m)
    assert snapshot(outside) == before
    assert not (dest / "D").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user owns")
def test_staging_of_another_user_is_refused(dest: Path) -> None:
    t = tree_basic()
    st = dest / staging_name(t.m.roots)
    st.mkdir(mode=0o700)
    os.chown(st, 65534, 65534)
    with pytest.raises(RejectedError, match="owned by uid 65534"):
        admit(dest, t.m)


def test_not_enough_space_is_refused_with_nothing_made(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(treefiles, "free_bytes", lambda path: 100)
    t = tree_basic()
    with pytest.raises(RejectedError, match="not enough space"):
        admit(dest, t.m)
    assert listing(dest) == []


# ---------------------------------------------------------------- gone and end


def test_gone_when_the_staging_directory_is_removed(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    assert not gone(opened)
    import shutil

    shutil.rmtree(opened.staging)
    assert gone(opened)
    opened.staging.mkdir()
    assert gone(opened)  # another directory now
    end(opened, "gone")
    end(opened, "gone")


def test_end_discard_removes_staging_keeps_placed_files(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    t.send(opened, t.blocks_of("D/small"))
    (opened.staging / "layout").write_text("lead's")
    end(opened, "discard")
    end(opened, "discard")
    assert not opened.staging.exists()
    assert (dest / "D/small").read_bytes() == b"hello"


def test_end_revert_and_gone(dest: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    big = list(t.blocks_of("D/big.bin"))
    t.send(opened, big[:1])
    end(opened, "keep")
    again = admit(dest, t.m)
    initial = tuple(again.ledger.held_pairs())
    assert [b for b, _ in initial] == big[:1]
    t.send(again, big[1:2])
    t.send(again, t.blocks_of("D/small"))  # placed during this session: not in initial
    (again.staging / "layout").write_text("lead's")
    end(again, "revert", initial)
    assert (again.staging / "layout").read_text() == "lead's"
    third = admit(dest, t.m)
    assert tuple(third.ledger.held_pairs()) == initial and third.files_done == 0
    end(third, "gone")
    assert not (third.staging / "state").exists() and third.staging.exists()
    fourth = admit(dest, t.m)
    assert fourth.ledger.count == 0
    end(fourth, "discard")


def test_a_symlink_swapped_in_during_the_transfer_is_never_followed(
    dest: Path, outside: Path
) -> None:
    t = make([(D("D"), b""), (D("D/sub"), b""), (F("D/sub/victim", b"evil"), b"evil")])
    opened = admit(dest, t.m)
    (dest / "D/sub").rmdir()
    os.symlink(outside, dest / "D/sub")
    before = snapshot(outside)
    with pytest.raises(OSError):
        t.send(opened, all_blocks(t))
    with pytest.raises(RejectedError):
        finalize(opened, mode=0)
    end(opened, "discard")
    assert snapshot(outside) == before


def test_a_partial_that_is_not_ours_is_not_resumed(dest: Path, outside: Path) -> None:
    t = tree_basic()
    opened = admit(dest, t.m)
    big = list(t.blocks_of("D/big.bin"))
    t.send(opened, big[:2])
    end(opened, "keep")
    i = [e.path for e in t.entries].index("D/big.bin")
    part = opened.staging / partial_name(t.m.key(i))
    part.unlink()
    os.link(outside / "victim", part)  # a hard link to a file outside
    before = snapshot(outside)
    again = admit(dest, t.m)
    try:
        assert again.ledger.count == 0
        assert not part.exists()  # unlinked, so a worker makes a fresh one
        t.send(again, all_blocks(t))
        finalize(again, mode=0)
    finally:
        again.close()
    assert snapshot(outside) == before
    assert (dest / "D/big.bin").read_bytes() == t.data["D/big.bin"]


def test_a_pack_is_held_only_when_the_log_has_it_for_every_file() -> None:
    # entries 0-2 share block 0; entry 3 is alone in block 1
    space = BlockSpace.of_extents([(0, 1), (0, 2), (0, 3), (0, 9)], block_size=64, pack=True)
    assert space.locate(0).count == 3 and space.total == 2
    d, e = b"d" * 16, b"e" * 16
    whole = {0: [(0, d)], 1: [(0, d)], 2: [(0, d)], 3: [(1, e)]}
    held, done = {k: list(v) for k, v in whole.items()}, {0, 1, 2, 3}
    treefiles._whole_packs(space, held, done)
    assert held == whole and done == {0, 1, 2, 3}
    # one file's record missing (a torn append, or files that share the block changed)
    held, done = {0: [(0, d)], 2: [(0, d)], 3: [(1, e)]}, {0, 3}
    treefiles._whole_packs(space, held, done)
    assert held == {3: [(1, e)]} and done == {3}
    # records of another pack (another digest): the block starts over, done files too
    held, done = {0: [(0, d)], 1: [(0, e)], 2: [(0, d)]}, {0, 1, 2}
    treefiles._whole_packs(space, held, done)
    assert held == {} and done == set()


def test_a_file_renamed_in_place_before_its_done_record_is_not_sent_again(dest: Path) -> None:
    """A crash between a file's rename into place and its DONE record: the next admission
    finds every block logged, no partial, and the file in place with its size and mtime."""
    t = tree_basic()
    opened = admit(dest, t.m)
    t.send(opened, t.blocks_of("D/small"))
    end(opened, "keep")
    log = opened.staging / treestate.NAME
    data = log.read_bytes()
    start = 13 + int.from_bytes(data[9:13], "big") + 4  # magic, length, header, CRC
    records = [
        data[i : i + treestate.RECORD_LEN] for i in range(start, len(data), treestate.RECORD_LEN)
    ]
    assert any(r[0] == treestate.DONE for r in records)
    log.write_bytes(data[:start] + b"".join(r for r in records if r[0] != treestate.DONE))
    placed = (dest / "D/small").stat()
    again = admit(dest, t.m)
    try:
        assert again.files_done == 1
        assert set(t.blocks_of("D/small")) <= set(again.ledger.held())
        t.send(again, t.blocks_of("D/big.bin"))
        finalize(again, mode=0)
    finally:
        again.close()
    after = (dest / "D/small").stat()
    assert (after.st_ino, after.st_mtime_ns) == (placed.st_ino, placed.st_mtime_ns)
    assert (dest / "D/big.bin").read_bytes() == t.data["D/big.bin"]
