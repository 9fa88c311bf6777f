"""``stx send --to SUBDIR`` and ``--as NAME``, and ``stx recv --no-subdirs`` (issue 15).

Real ``stx recv`` and ``stx send`` processes on 127.0.0.1: files and trees land where asked;
hostile values are refused by the sender before it connects, and by the receiver when a
symlink or a file is planted on the way; nothing is ever written outside the destination.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from itest_support import (
    CliReceiver,
    assert_one_line_error,
    cli_receiver_rig,
    run_stx,
    sha256_file,
    write_random,
)

pytestmark = pytest.mark.timeout(120)


def _send(recv: CliReceiver, key: Path, *paths: str | Path, opts: tuple[str, ...] = ()) -> Any:
    """``stx send PATHS... ADDRESS --psk-file KEY --quiet OPTS...``."""
    return run_stx("send", *paths, recv.address, "--psk-file", key, "--quiet", *opts)


def _everything(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_files_and_trees_land_where_asked() -> None:
    with cli_receiver_rig("stx-to-") as (recv, key, root):
        src, dest = root / "src", root / "dest"
        digest = write_random(src / "one.bin", 300_000)
        tree = src / "tree"
        (tree / "sub").mkdir(parents=True)
        write_random(tree / "sub" / "x", 5000)
        write_random(tree / "y", 7000)

        assert _send(recv, key, src / "one.bin", opts=("--to", "a/b/c")).rc == 0
        assert sha256_file(dest / "a" / "b" / "c" / "one.bin") == digest
        assert _send(recv, key, src / "one.bin", opts=("--to", "a/b", "--as", "two.bin")).rc == 0
        assert sha256_file(dest / "a" / "b" / "two.bin") == digest
        assert _send(recv, key, src / "one.bin", opts=("--as", "three.bin")).rc == 0
        assert sha256_file(dest / "three.bin") == digest
        assert _send(recv, key, tree, opts=("--to", "trees/today", "--as", "copy")).rc == 0
        landed = dest / "trees" / "today" / "copy"
        assert (landed / "sub" / "x").read_bytes() == (tree / "sub" / "x").read_bytes()
        assert (landed / "y").read_bytes() == (tree / "y").read_bytes()
        # nothing else: no staging, lock or partial left anywhere
        assert _everything(dest) == {
            "a", "a/b", "a/b/c", "a/b/c/one.bin", "a/b/two.bin", "three.bin",
            "trees", "trees/today", "trees/today/copy", "trees/today/copy/sub",
            "trees/today/copy/sub/x", "trees/today/copy/y",
        }  # fmt: skip
        assert recv.proc is not None and recv.proc.poll() is None


@pytest.mark.parametrize(
    "to",
    ["../x", "/etc", "a/../../b", "a//b", ".", "a/./b", "x\x01y", "a/.b.stxpart/c", "a/"],
    ids=repr,
)
def test_hostile_subdirs_are_refused_by_the_sender(to: str) -> None:
    with cli_receiver_rig("stx-to-") as (recv, key, root):
        write_random(root / "src" / "f", 1000)
        run = _send(recv, key, root / "src" / "f", opts=("--to", to))
        assert run.rc == 2, run.stderr
        assert "--to" in run.stderr
        assert_one_line_error(run)
        assert _everything(root / "dest") == set()


@pytest.mark.parametrize("name", ["", "a/b", "..", "x.stxpart", "bad\nname"], ids=repr)
def test_bad_names_for_as_are_refused(name: str) -> None:
    with cli_receiver_rig("stx-as-") as (recv, key, root):
        write_random(root / "src" / "f", 1000)
        run = _send(recv, key, root / "src" / "f", opts=("--as", name))
        assert run.rc == 2, run.stderr
        assert_one_line_error(run)
        assert _everything(root / "dest") == set()


def test_as_needs_exactly_one_path() -> None:
    with cli_receiver_rig("stx-as-") as (recv, key, root):
        write_random(root / "src" / "f", 1000)
        write_random(root / "src" / "g", 1000)
        run = _send(recv, key, root / "src" / "f", root / "src" / "g", opts=("--as", "h"))
        assert run.rc == 2 and "exactly one PATH" in run.stderr
        assert _everything(root / "dest") == set()


@pytest.mark.parametrize("plant", ["symlink", "deep-symlink", "file"])
def test_a_plant_on_the_way_is_refused_and_nothing_is_written_outside(plant: str) -> None:
    with cli_receiver_rig("stx-to-") as (recv, key, root):
        dest = root / "dest"
        outside = root / "outside"
        outside.mkdir()
        if plant == "symlink":
            os.symlink(outside, dest / "evil")
            to = "evil/y"
        elif plant == "deep-symlink":
            (dest / "a").mkdir()
            os.symlink(outside, dest / "a" / "b")
            to = "a/b/c"
        else:
            (dest / "f").write_bytes(b"not a directory")
            to = "f/y"
        before = _everything(dest)
        write_random(root / "src" / "data.bin", 100_000)
        run = _send(recv, key, root / "src" / "data.bin", opts=("--to", to))
        assert run.rc == 1, run.stderr
        assert "is not a directory" in run.stderr
        assert_one_line_error(run)
        assert list(outside.iterdir()) == []
        assert _everything(dest) == before


def test_no_subdirs_refuses_to_and_as() -> None:
    with cli_receiver_rig("stx-nosub-") as (_, key, root):
        dest = root / "dest2"
        dest.mkdir()
        recv = CliReceiver(key, dest, root / "logs", once=False, extra=["--no-subdirs"]).start()
        try:
            write_random(root / "src" / "f", 1000)
            for opts in (("--to", "x"), ("--as", "g")):
                run = _send(recv, key, root / "src" / "f", opts=opts)
                assert run.rc == 1, run.stderr
                assert "--no-subdirs" in run.stderr
            assert _everything(dest) == set()
            assert _send(recv, key, root / "src" / "f").rc == 0
            assert _everything(dest) == {"f"}
        finally:
            recv.stop()
