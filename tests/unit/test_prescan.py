"""The sender's walk in a forked child (``stxpar.prescan``): real forks over real files. What
the child hands back is what ``scan`` makes in the process itself; its UsageError is the
parent's, word for word; a child whose result is not wanted is killed and reaped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stxpar import prescan
from stxpar.errors import UsageError
from stxpar.scan import scan


def tree(root: Path) -> Path:
    top = root / "T"
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "a.bin").write_bytes(os.urandom(5000))
    (top / "sub" / "b").write_bytes(b"")
    (top / "sub" / "deeper" / "c").write_bytes(b"x" * 100)
    (top / "sub" / "deeper" / "c").chmod(0o640)
    os.symlink("../a.bin", top / "sub" / "link")
    os.mkfifo(top / "fifo")
    with open(top / "sparse", "wb") as f:
        f.truncate(1 << 20)
        f.write(b"data")
    return top


def test_the_child_walks_as_the_process_would(tmp_path: Path) -> None:
    top = tree(tmp_path)
    extra = tmp_path / "extra.txt"
    extra.write_text("more")
    warned: list[str] = []
    walk = prescan.start([str(top), str(extra)], warned.append)
    assert walk is not None
    got = walk.result()
    want = scan([str(top), str(extra)], warn=lambda text: None)
    assert got == want
    assert [type(e) for e in got.entries] == [type(e) for e in want.entries]
    assert got.skipped and got.skipped == want.skipped  # the FIFO
    assert walk.pid == 0  # reaped
    # The warnings were the child's to print (its own copy of ``warned``), not the parent's.
    assert warned == []


def test_a_path_that_cannot_be_sent_is_the_same_usage_error(tmp_path: Path) -> None:
    top = tree(tmp_path)
    missing = tmp_path / "missing"
    walk = prescan.start([str(top), str(missing)], None)
    assert walk is not None
    with pytest.raises(UsageError) as child:
        walk.result()
    with pytest.raises(UsageError) as here:
        scan([str(top), str(missing)])
    assert str(child.value) == str(here.value)


def test_one_regular_file_is_not_walked_by_a_child(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert prescan.start([str(f)], None) is None
    assert prescan.start([str(tmp_path / "missing")], None) is None


def test_close_kills_and_reaps_a_child_whose_result_is_not_read(tmp_path: Path) -> None:
    top = tmp_path / "big"
    top.mkdir()
    for i in range(2000):
        (top / f"f{i}").write_bytes(b"")
    walk = prescan.start([str(top)], None)
    assert walk is not None
    pid = walk.pid
    walk.close()
    assert walk.pid == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # no such child left: it was reaped
    time.sleep(0.01)
    walk.close()  # twice is harmless
