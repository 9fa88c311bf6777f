"""`stx recv --list-partial` and `--purge-partial` see a tree's staging directory (issue 13):
listed with its top-level name and the blocks its log holds; removed when old enough and no
receiver holds its names; left alone while one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stxpar import treefiles
from stxpar.destination import NameLock
from stxpar.digest import block_digest
from stxpar.sources import open_sources

BLOCK = 64 << 10


def _interrupted_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A tree of two files whose first block landed (as a receiver worker would write it)
    before the transfer stopped: the staging directory and its log stay in DEST."""
    src = tmp_path / "src" / "D"
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3 * BLOCK))
    (src / "b.bin").write_bytes(os.urandom(BLOCK))
    dest = tmp_path / "dst"
    dest.mkdir()
    manifest = open_sources([src]).manifest(BLOCK)
    opened = treefiles.open_tree(dest, manifest, remembered=lambda d: None, on_restart=print)
    first = manifest.space.locate(0)
    data = (src / manifest.entries[first.entry].path.split("/", 1)[1]).read_bytes()[:BLOCK]
    name = treefiles.partial_name(manifest.key(first.entry))
    fd = os.open(opened.staging / name, os.O_WRONLY | os.O_CREAT, 0o600)
    os.pwrite(fd, data, 0)
    os.close(fd)
    opened.log.append([(0, block_digest(data))])
    treefiles.end(opened, "keep")
    return dest, opened.staging


def _stx(*args: object) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "stxpar.cli", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.timeout(60)
def test_a_trees_staging_directory_is_listed(tmp_path: Path) -> None:
    dest, staging = _interrupted_tree(tmp_path)
    run = _stx("recv", "--dest", dest, "--list-partial", "--json")
    assert run.returncode == 0, run.stderr
    (line,) = run.stdout.splitlines()
    got = json.loads(line)
    assert got["tree"] is True and got["name"] == "D"
    assert got["blocks_have"] == 1 and got["have_bytes"] >= BLOCK
    text = _stx("recv", "--dest", dest, "--list-partial")
    assert text.stdout.startswith("partial tree D: "), text.stdout
    assert staging.is_dir()


@pytest.mark.timeout(60)
def test_purge_leaves_a_tree_a_receiver_holds_and_removes_it_after(tmp_path: Path) -> None:
    dest, staging = _interrupted_tree(tmp_path)
    held = NameLock.acquire(dest, "D")  # a live receiver on the same destination
    try:
        run = _stx("recv", "--dest", dest, "--purge-partial", "0")
        assert run.returncode == 0, run.stderr
        assert staging.is_dir(), "removed while a receiver holds its name"
    finally:
        held.release()
    run = _stx("recv", "--dest", dest, "--purge-partial", "0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("removed tree D: "), run.stdout
    assert not staging.exists()
    assert not list(dest.glob(".*.stxlock"))
