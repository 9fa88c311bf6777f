"""Directory trees end to end (issue 13, stx3): real receivers (``stxpar.Receiver`` and ``stx
recv``), real senders (``stxpar.send`` and ``stx send``), real loopback sockets.

The issue's test tree (``treegen.make_tree``: nested and empty directories, 0-byte files, odd
and non-Latin names, modes, old mtimes, relative, dangling and absolute symlinks, a sparse file
and a FIFO) must arrive identical but for the FIFO, which is skipped and counted; holes stay
holes; no symlink is ever followed and nothing outside the destination is touched; no staging
directory or lock file is left behind. Then: several PATHs at once, an empty directory alone,
a tree of empty files, 2,000 small files, a resend of a changed tree, and a peer of the old
protocol version.
"""

from __future__ import annotations

import os
import random
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from itest_support import CliReceiver, make_keyfile, run_stx, wait_for
from treegen import allocated, compare_trees, diff_r, make_tree

import stxpar
from stxpar.wire import HEADER, ErrorMsg, FrameType

BLOCK = 64 << 10
KiB = 1 << 10


# ---------------------------------------------------------------- helpers


def leftovers(dest: Path) -> list[str]:
    """Staging directories, lock, partial and state files anywhere under ``dest``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            if (name.startswith(".stx-") and name.endswith(".stxtree")) or name.endswith(
                (".stxlock", ".stxpart", ".stxstate", ".stxtree")
            ):
                found.append(os.path.join(dirpath, name))
    return found


def snapshot(root: Path, *, exclude: Path) -> dict[str, tuple[int, int, int, str]]:
    """(kind bits, size, mtime ns, link text) of every entry below ``root`` but ``exclude``'s
    subtree, without following a symlink."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == exclude:
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if here / d != exclude]
        for name in dirnames + filenames:
            p = here / name
            st = os.lstat(p)
            text = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            out[str(p)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, text)
    return out


def check_tree_arrived(facts: dict[str, Any], copy: Path) -> None:
    """Everything the tree tests promise about one copy of ``make_tree``'s tree."""
    src: Path = facts["root"]
    problems = compare_trees(src, copy, skip=facts["skip"])
    assert not problems, "\n".join(problems)
    assert diff_r(src, copy, exclude=[Path(facts["fifo"]).name]) == 0
    # the FIFO is not there (its directory is)
    assert not os.path.lexists(copy / facts["fifo"])
    assert (copy / Path(facts["fifo"]).parent).is_dir()
    # holes are holes on the receiver
    sparse = copy / facts["sparse"]
    assert sparse.stat().st_size == facts["sparse_size"]
    data_bytes = sum(length for _, length in facts["sparse_data"])
    assert allocated(sparse) < facts["sparse_size"] // 16, (allocated(sparse), data_bytes)
    for off, length in facts["sparse_data"]:
        with open(src / facts["sparse"], "rb") as a, open(sparse, "rb") as b:
            a.seek(off)
            b.seek(off)
            assert a.read(length) == b.read(length)
    # symlinks arrive as links with their own text, never followed
    for rel, text in facts["symlinks"].items():
        assert os.path.islink(copy / rel), rel
        assert os.readlink(copy / rel) == text, rel
    # the outside sentinel (the absolute link's target) is untouched
    sentinel: Path = facts["sentinel"]
    assert sentinel.read_bytes() == facts["sentinel_bytes"]
    assert sentinel.stat().st_mtime_ns == facts["sentinel_mtime_ns"]


def assert_clean(dest: Path, names: set[str]) -> None:
    found = {p.name for p in dest.iterdir()}
    assert found == names, f"destination holds {sorted(found)}, expected {sorted(names)}"
    assert not leftovers(dest), leftovers(dest)


def small_files(root: Path, count: int, *, seed: int = 7) -> int:
    """``count`` files of 1-3 KiB in 20 directories below the new directory ``root``; total
    bytes."""
    rng = random.Random(seed)
    root.mkdir()
    total = 0
    for i in range(count):
        d = root / f"d{i % 20:02d}"
        d.mkdir(exist_ok=True)
        size = rng.randint(1 * KiB, 3 * KiB)
        (d / f"f{i:05d}.dat").write_bytes(rng.randbytes(size))
        total += size
    return total


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def key() -> bytes:
    return stxpar.generate_key()


@pytest.fixture
def api_receiver(scratch: Path, key: bytes) -> Iterator[stxpar.Receiver]:
    dest = scratch / "dest"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=key, host="127.0.0.1", port=0, workers=2) as r:
        yield r


@pytest.fixture
def tree(scratch: Path) -> dict[str, Any]:
    (scratch / "src").mkdir()
    return make_tree(scratch / "src" / "tree")


# ---------------------------------------------------------------- (a) the tree


@pytest.mark.timeout(90)
def test_tree_with_the_api_arrives_identical(
    api_receiver: stxpar.Receiver, key: bytes, scratch: Path, tree: dict[str, Any]
) -> None:
    dest = Path(api_receiver.dest)
    before = snapshot(scratch, exclude=dest)
    warnings: list[str] = []
    heard: list[tuple[str, int, int]] = []
    result = stxpar.send(
        [tree["root"]],
        *api_receiver.address,
        psk=key,
        workers=2,
        block_size=BLOCK,
        warn=warnings.append,
        progress=lambda done, total: heard.append(("bytes", done, total)),
        file_progress=lambda done, total: heard.append(("files", done, total)),
    )
    # The CLI draws its line on each bytes report with the files count heard before it: the
    # last line must count every file (a file count after the last line is never shown).
    last = max(i for i, h in enumerate(heard) if h[0] == "bytes")
    files = [h for h in heard[:last] if h[0] == "files"]
    assert heard[last][1] == heard[last][2] and files[-1][1] == files[-1][2], heard[-4:]
    copy = dest / "tree"
    check_tree_arrived(tree, copy)
    assert_clean(dest, {"tree"})
    assert snapshot(scratch, exclude=dest) == before, "something outside DEST changed"
    assert any("named.fifo" in w for w in warnings), warnings

    summary = result.as_json()
    assert summary["skipped"] == 1, summary
    assert summary["files"] == len(tree["files"]), summary
    assert summary["dirs"] == len(tree["dirs"]) + 1, summary  # and the root
    assert summary["symlinks"] == len(tree["symlinks"]), summary
    assert summary["bytes_sparse"] > 0, summary
    assert result.blocks_resumed == 0 and result.blocks_sent == result.blocks_total
    assert wait_for(lambda: len(api_receiver.completed) >= 1, timeout=10)


@pytest.mark.timeout(90)
def _cli_receiver(scratch: Path) -> tuple[Path, Path, CliReceiver]:
    """A key file, DEST and an ``stx recv --once`` listening into it (logs in scratch/logs)."""
    keyfile = scratch / "stx.key"
    make_keyfile(keyfile)
    dest = scratch / "dest"
    dest.mkdir()
    (scratch / "logs").mkdir()
    return keyfile, dest, CliReceiver(keyfile, dest, scratch / "logs", workers=2, once=True).start()


def test_tree_with_the_cli_arrives_identical(scratch: Path, tree: dict[str, Any]) -> None:
    keyfile, dest, receiver = _cli_receiver(scratch)
    try:
        before = snapshot(scratch, exclude=dest)
        run = run_stx(
            "send",
            tree["root"],
            receiver.address,
            "--psk-file",
            keyfile,
            "--block-size",
            "64K",
            "--workers",
            "2",
            "--json",
        )
        assert run.rc == 0, run.stderr
        assert "Traceback" not in run.stderr
        assert "named.fifo" in run.stderr  # the warning that it was skipped
        summary = run.json()
        assert summary["skipped"] == 1, summary
        assert summary["files"] == len(tree["files"]), summary
        assert summary["dirs"] == len(tree["dirs"]) + 1, summary
        assert summary["symlinks"] == len(tree["symlinks"]), summary
        assert summary["bytes_sparse"] > 0, summary
        assert summary["blocks_sent"] == summary["blocks_total"], summary

        assert receiver.wait(timeout=20) == 0, receiver.stderr
        (line,) = receiver.json_lines()
        assert line["digest"] == summary["digest"]
        assert line["files"] == summary["files"] and line["dirs"] == summary["dirs"]
        assert line["symlinks"] == summary["symlinks"]
        check_tree_arrived(tree, dest / "tree")
        # logs are in scratch/logs: they changed, nothing else outside DEST did
        logs = scratch / "logs"
        after = snapshot(scratch, exclude=dest)
        assert {k: v for k, v in after.items() if not k.startswith(str(logs))} == {
            k: v for k, v in before.items() if not k.startswith(str(logs))
        }
        assert_clean(dest, {"tree"})
    finally:
        receiver.stop()


def test_a_command_line_read_otherwise_early_still_sends_the_tree(
    scratch: Path, tree: dict[str, Any]
) -> None:
    """``--work 2`` (argparse's abbreviation of --workers) makes stxpar.launch take "2" for a
    PATH: the parser finds other PATHs, the early walk is dropped, and stx send walks."""
    keyfile, dest, receiver = _cli_receiver(scratch)
    try:
        run = run_stx(
            "send", "--work", "2", tree["root"], receiver.address, "--psk-file", keyfile, "-q"
        )
        assert run.rc == 0, run.stderr
        assert receiver.wait(timeout=20) == 0, receiver.stderr
        check_tree_arrived(tree, dest / "tree")
    finally:
        receiver.stop()


def test_a_missing_path_beside_a_tree_is_a_one_line_error(
    scratch: Path, tree: dict[str, Any]
) -> None:
    """The CLI walks a tree in a forked child (stxpar.prescan): its usage errors are still
    the command's one line and exit 2, before anything connects (nothing listens here)."""
    keyfile = scratch / "stx.key"
    make_keyfile(keyfile)
    missing = scratch / "missing"
    run = run_stx("send", tree["root"], missing, "127.0.0.1:9", "--psk-file", keyfile)
    assert run.rc == 2, run.stderr
    assert run.stderr.splitlines()[-1] == f"stx: error: {missing}: no such file or directory"
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------- (b) (c) (d)


@pytest.mark.timeout(60)
def test_several_paths_land_side_by_side(
    api_receiver: stxpar.Receiver, key: bytes, scratch: Path
) -> None:
    src = scratch / "src"
    src.mkdir()
    one, two = src / "one", src / "two"
    (one / "sub").mkdir(parents=True)
    (one / "sub" / "a.bin").write_bytes(os.urandom(3 * BLOCK + 7))
    (one / "b.txt").write_bytes(b"b" * 10)
    two.mkdir()
    (two / "c.bin").write_bytes(os.urandom(BLOCK))
    os.symlink("c.bin", two / "link")
    lone = src / "lone.dat"
    lone.write_bytes(os.urandom(5 * BLOCK + 1))

    result = stxpar.send(
        [one, two, lone], *api_receiver.address, psk=key, workers=2, block_size=BLOCK
    )
    dest = Path(api_receiver.dest)
    assert_clean(dest, {"one", "two", "lone.dat"})
    assert not compare_trees(one, dest / "one")
    assert not compare_trees(two, dest / "two")
    assert (dest / "lone.dat").read_bytes() == lone.read_bytes()
    assert (dest / "lone.dat").stat().st_mtime_ns // 1000 == lone.stat().st_mtime_ns // 1000
    assert result.blocks_total == 4 + 1 + 1 + 6


@pytest.mark.timeout(60)
def test_an_empty_directory_alone(api_receiver: stxpar.Receiver, key: bytes, scratch: Path) -> None:
    src = scratch / "src" / "nothing"
    src.mkdir(parents=True)
    os.chmod(src, 0o750)
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    result = stxpar.send([src], *api_receiver.address, psk=key, block_size=BLOCK)
    dest = Path(api_receiver.dest)
    assert_clean(dest, {"nothing"})
    assert (dest / "nothing").is_dir() and not list((dest / "nothing").iterdir())
    assert not compare_trees(src, dest / "nothing")
    assert result.blocks_total == 0 and result.bytes == 0


@pytest.mark.timeout(60)
def test_a_tree_of_only_empty_files(
    api_receiver: stxpar.Receiver, key: bytes, scratch: Path
) -> None:
    src = scratch / "src" / "empties"
    (src / "x" / "y").mkdir(parents=True)
    for rel in ("a", "b", "x/c", "x/y/d", "x/y/e f"):
        (src / rel).write_bytes(b"")
    os.chmod(src / "x/c", 0o600)
    result = stxpar.send([src], *api_receiver.address, psk=key, block_size=BLOCK)
    dest = Path(api_receiver.dest)
    assert_clean(dest, {"empties"})
    problems = compare_trees(src, dest / "empties")
    assert not problems, problems
    assert result.blocks_total == 0 and result.bytes == 0
    assert result.as_json()["files"] == 5


@pytest.mark.timeout(90)
def test_two_thousand_small_files(api_receiver: stxpar.Receiver, key: bytes, scratch: Path) -> None:
    src = scratch / "src" / "many"
    src.parent.mkdir()
    total = small_files(src, 2000)
    result = stxpar.send([src], *api_receiver.address, psk=key, workers=4, block_size=BLOCK)
    dest = Path(api_receiver.dest)
    assert_clean(dest, {"many"})
    problems = compare_trees(src, dest / "many")
    assert not problems, problems[:20]
    assert result.bytes == total
    assert result.as_json()["files"] == 2000
    # packed: 20 directories of 100 files of 1-3 KiB, up to 64 KiB of whole files a block
    assert result.blocks_sent == result.blocks_total
    assert 20 * 3 <= result.blocks_total <= 20 * 7, result.blocks_total
    assert result.seconds < 30, f"2,000 small files took {result.seconds:.1f} s"


# ---------------------------------------------------------------- (e) the same tree twice


@pytest.mark.timeout(90)
def test_sending_the_same_tree_twice_replaces_files_whole(
    api_receiver: stxpar.Receiver, key: bytes, scratch: Path
) -> None:
    src = scratch / "src" / "again"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "changes.bin").write_bytes(os.urandom(4 * BLOCK + 3))
    (src / "sub" / "shrinks.bin").write_bytes(os.urandom(6 * BLOCK))
    (src / "same.bin").write_bytes(os.urandom(2 * BLOCK))
    (src / "goes.txt").write_bytes(b"old")
    os.symlink("same.bin", src / "link")
    stxpar.send([src], *api_receiver.address, psk=key, workers=2, block_size=BLOCK)
    dest = Path(api_receiver.dest)
    copy = dest / "again"
    assert not compare_trees(src, copy)
    assert_clean(dest, {"again"})

    # another name for the old copy: a whole replacement leaves it as it was
    old_bytes = (copy / "sub" / "changes.bin").read_bytes()
    os.link(copy / "sub" / "changes.bin", scratch / "old-changes.bin")
    old_ino = (copy / "sub" / "changes.bin").stat().st_ino

    (src / "sub" / "changes.bin").write_bytes(os.urandom(4 * BLOCK + 3))
    (src / "sub" / "shrinks.bin").write_bytes(os.urandom(BLOCK + 9))
    os.unlink(src / "link")
    os.symlink("sub/changes.bin", src / "link")
    (src / "new.txt").write_bytes(b"new file")

    result = stxpar.send([src], *api_receiver.address, psk=key, workers=2, block_size=BLOCK)
    problems = compare_trees(src, copy)
    assert not problems, problems
    assert (copy / "sub" / "changes.bin").read_bytes() == (src / "sub/changes.bin").read_bytes()
    assert (copy / "sub" / "changes.bin").stat().st_ino != old_ino
    assert (scratch / "old-changes.bin").read_bytes() == old_bytes  # never written in place
    assert_clean(dest, {"again"})
    assert result.blocks_total == 5 + 2 + 2 + 1 + 1  # changes, shrinks, same, goes, new
    assert result.blocks_sent + result.blocks_resumed >= result.blocks_total


# ---------------------------------------------------------------- (f) a peer of stx2


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    buf = b""
    while len(buf) < HEADER.size:
        chunk = sock.recv(HEADER.size - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} header bytes")
        buf += chunk
    ftype, length = HEADER.unpack(buf)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed in a frame")
        body += chunk
    return ftype, body


@pytest.mark.timeout(60)
def test_a_stx2_peer_is_told_the_version(
    api_receiver: stxpar.Receiver, key: bytes, scratch: Path
) -> None:
    payload = msgpack.packb(["stx2"], use_bin_type=True)
    with socket.create_connection(api_receiver.address, timeout=10) as sock:
        sock.sendall(HEADER.pack(FrameType.INIT, len(payload)) + payload)
        ftype, body = _read_frame(sock)
    assert ftype == FrameType.ERROR, (ftype, body)
    err = ErrorMsg.decode(body)
    assert "stx2" in err.message, err.message
    assert "version" in err.message, err.message
    # the receiver still serves a current sender
    src = scratch / "after.bin"
    src.write_bytes(os.urandom(BLOCK + 1))
    stxpar.send(src, *api_receiver.address, psk=key, block_size=BLOCK)
    assert (Path(api_receiver.dest) / "after.bin").read_bytes() == src.read_bytes()
