"""The tree tests' own tools: ``make_tree`` builds what it says, and ``compare_trees`` and
``diff_r`` see every kind of difference (else an integration test built on them could not fail)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treegen import allocated, compare_trees, diff_r, make_tree  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The test tree and a faithful copy of it (``cp -a``, then the FIFO removed, as a tree
    transfer must leave it)."""
    src = tmp_path / "src"
    facts = make_tree(src)
    dst = tmp_path / "dst"
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)
    fifo = dst / facts["fifo"]
    parent = os.lstat(fifo.parent)
    fifo.unlink()
    os.utime(fifo.parent, ns=(parent.st_atime_ns, parent.st_mtime_ns))
    return src, dst, facts


def only(problems: list[str], rel: str, word: str) -> None:
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{rel}: "), problems
    assert word in problems[0], problems


def keep_times(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns


def test_make_tree_builds_every_kind(tmp_path: Path) -> None:
    facts = make_tree(tmp_path / "t")
    root = facts["root"]
    assert stat.S_ISFIFO(os.lstat(root / facts["fifo"]).st_mode)
    sparse = root / facts["sparse"]
    assert sparse.stat().st_size == facts["sparse_size"] == 64 << 20
    assert allocated(sparse) < 1 << 20  # holes, not zeros
    assert os.readlink(root / facts["abs_link"]) == str(facts["sentinel"].resolve())
    assert not facts["sentinel"].is_relative_to(root)
    assert not (root / "links/dangling").exists() and (root / "links/dangling").is_symlink()
    assert stat.S_IMODE(os.lstat(root / "private").st_mode) == 0o700
    for rel, mode in facts["modes"].items():
        assert stat.S_IMODE(os.lstat(root / rel).st_mode) == mode, rel
    assert {0o600, 0o640, 0o755} <= set(facts["modes"].values())
    for rel in facts["files"] + facts["dirs"]:
        assert os.lstat(root / rel).st_mtime_ns < 1_100_000_000 * 10**9, rel  # before 2005
    for rel in facts["empty_dirs"]:
        assert not os.listdir(root / rel)
    for rel in facts["empty_files"]:
        assert (root / rel).stat().st_size == 0
    names = "/".join(facts["files"] + facts["dirs"])
    for name in ("данные", "数据", "ملف", " ", "/-"):
        assert name in names


def test_identical_copy_has_no_differences(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    assert compare_trees(src, dst, skip=facts["skip"]) == []
    assert diff_r(src, dst, exclude=[Path(facts["fifo"]).name]) == 0


def test_fifo_reported_unless_skipped(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    only(compare_trees(src, dst), facts["fifo"], "missing in the copy (fifo)")
    assert diff_r(src, dst) != 0


def test_changed_byte(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / "a/b/c/d/deep.txt"
    times = keep_times(p)
    data = bytearray(p.read_bytes())
    data[4096] ^= 1
    p.write_bytes(bytes(data))
    os.utime(p, ns=times)
    only(compare_trees(src, dst, skip=facts["skip"]), "a/b/c/d/deep.txt", "from byte 4096")
    assert diff_r(src, dst, exclude=[Path(facts["fifo"]).name]) == 1


def test_changed_byte_in_sparse_hole(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / facts["sparse"]
    times = keep_times(p)
    with open(p, "r+b") as f:
        f.seek(60 << 20)
        f.write(b"\1")
    os.utime(p, ns=times)
    only(compare_trees(src, dst, skip=facts["skip"]), facts["sparse"], f"from byte {60 << 20}")


def test_changed_size(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / "big.bin"
    times = keep_times(p)
    os.truncate(p, p.stat().st_size - 1)
    os.utime(p, ns=times)
    only(compare_trees(src, dst, skip=facts["skip"]), "big.bin", "bytes in the source")


@pytest.mark.parametrize("rel", ["modes/rw-r-----", "private", "."])
def test_changed_mode(trees: tuple[Path, Path, dict[str, Any]], rel: str) -> None:
    src, dst, facts = trees
    p = dst / rel
    os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) ^ 0o004)
    only(compare_trees(src, dst, skip=facts["skip"]), rel, "mode")


def test_root_not_compared_when_told(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    os.chmod(dst, 0o711)
    assert compare_trees(src, dst, skip=facts["skip"], check_root=False) == []


@pytest.mark.parametrize("rel", ["ملف.txt", "empty", "数据/子目录"])
def test_changed_mtime(trees: tuple[Path, Path, dict[str, Any]], rel: str) -> None:
    src, dst, facts = trees
    atime, mtime = keep_times(dst / rel)
    os.utime(dst / rel, ns=(atime, mtime + 1000))  # one microsecond
    only(compare_trees(src, dst, skip=facts["skip"]), rel, "mtime")


def test_sub_microsecond_mtime_not_reported(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    atime, mtime = keep_times(dst / "top.txt")
    assert mtime % 1000 == 0
    os.utime(dst / "top.txt", ns=(atime, mtime + 999))
    assert compare_trees(src, dst, skip=facts["skip"]) == []


def test_missing_file(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / "-dash-dir/-leading-dash"
    times = keep_times(p.parent)
    p.unlink()
    os.utime(p.parent, ns=times)
    only(compare_trees(src, dst, skip=facts["skip"]), "-dash-dir/-leading-dash", "missing")
    assert diff_r(src, dst, exclude=[Path(facts["fifo"]).name]) == 1


def test_missing_empty_dir(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    times = keep_times(dst / "a/b")
    (dst / "a/b/empty-inner").rmdir()
    os.utime(dst / "a/b", ns=times)
    only(
        compare_trees(src, dst, skip=facts["skip"]), "a/b/empty-inner", "missing in the copy (dir)"
    )


def test_extra_file(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    times = keep_times(dst / "empty")
    (dst / "empty/.stx-partial").write_bytes(b"")
    os.utime(dst / "empty", ns=times)
    only(compare_trees(src, dst, skip=facts["skip"]), "empty/.stx-partial", "extra")


def test_changed_link_text(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / "links/rel-file"
    times = keep_times(p.parent)
    p.unlink()
    os.symlink("../a/b/c/d/./deep.txt", p)  # the same target, another text
    os.utime(p.parent, ns=times)
    only(compare_trees(src, dst, skip=facts["skip"]), "links/rel-file", "link text")
    assert diff_r(src, dst, exclude=[Path(facts["fifo"]).name]) == 1


def test_file_instead_of_symlink(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / facts["abs_link"]
    times = keep_times(p.parent)
    p.unlink()
    p.write_bytes(facts["sentinel_bytes"])  # what following the link would have made
    os.utime(p.parent, ns=times)
    only(
        compare_trees(src, dst, skip=facts["skip"]),
        facts["abs_link"],
        "symlink in the source, file",
    )


def test_symlink_instead_of_file(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / "top.txt"
    times = keep_times(dst)
    p.unlink()
    os.symlink(src / "top.txt", p)  # same bytes through the link
    os.utime(dst, ns=times)
    only(compare_trees(src, dst, skip=facts["skip"]), "top.txt", "file in the source, symlink")


def test_dir_symlink_not_followed(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    p = dst / "links/rel-dir"
    times = keep_times(p.parent)
    p.unlink()
    subprocess.run(["cp", "-a", "--", str(src / "a"), str(p)], check=True)
    os.utime(p.parent, ns=times)
    problems = compare_trees(src, dst, skip=facts["skip"])
    assert problems[0] == "links/rel-dir/b: extra in the copy (dir)", problems
    assert "links/rel-dir: symlink in the source, dir in the copy" in problems


def test_skip_covers_what_is_below(trees: tuple[Path, Path, dict[str, Any]]) -> None:
    src, dst, facts = trees
    (dst / "a/b/c/d/deep.txt").write_bytes(b"changed")
    (dst / "a/b/c/new").write_bytes(b"")
    assert compare_trees(src, dst, skip=facts["skip"]) != []
    assert compare_trees(src, dst, skip={*facts["skip"], "a/b/c"}) == []
    assert compare_trees(src, dst, skip={*facts["skip"], "a/b/c/"}) == []


def test_copy_that_is_not_a_directory(tmp_path: Path) -> None:
    facts = make_tree(tmp_path / "t")
    assert compare_trees(facts["root"], tmp_path / "nowhere") != []
