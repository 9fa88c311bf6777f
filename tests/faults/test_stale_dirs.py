"""Private IPC directories of killed coordinators (issue 11): a SIGKILLed ``stx recv`` cannot
remove its ``stx-recv-*`` directory; the next receiver removes those whose process is gone,
and nothing else (a live process's, another user's, a symbolic link, an old-style name).

Every test runs with a temporary directory of its own (``TMPDIR``), so no other process's
directories are in sight.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from itest_support import CliReceiver, make_keyfile, process_tree, wait_dead

from stxpar import ipc


def _dirs(tmp: Path) -> set[str]:
    return {p.name for p in tmp.iterdir() if p.name.startswith(("stx-recv-", "stx-send-"))}


@pytest.mark.timeout(90)
def test_killed_receivers_directory_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="stx-t-"))  # short: IPC paths have 107 bytes
    monkeypatch.setenv("TMPDIR", str(tmp))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    for d in ("dest", "logs"):
        (tmp_path / d).mkdir()
    key = tmp_path / "stx.key"
    make_keyfile(key)
    first = CliReceiver(key, tmp_path / "dest", tmp_path / "logs", once=False).start()
    assert first.proc is not None
    stale = _dirs(tmp)
    assert len(stale) == 1, stale
    tree = process_tree(first.proc.pid)
    for p in tree:
        p.send_signal(signal.SIGKILL)
    for p in tree:
        wait_dead(p)
    first.proc.wait(timeout=10)
    assert _dirs(tmp) == stale  # left behind

    second = CliReceiver(key, tmp_path / "dest", tmp_path / "logs", once=False).start()
    try:
        now = _dirs(tmp)
        assert not now & stale, "the dead receiver's directory is still there"
        assert len(now) == 1  # the live one's own
    finally:
        second.stop()
    assert _dirs(tmp) == set()


@pytest.mark.timeout(60)
def test_only_stale_directories_of_ours_are_removed(tmp_path: Path) -> None:
    # A dead process: one that ran and exited (its pid and start time no longer match).
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid = child.pid
    started = ipc._start_time(dead_pid) or 1
    child.wait()
    ns = os.stat("/proc/self/ns/pid").st_ino
    me = psutil.Process()
    my_start = ipc._start_time(os.getpid())

    def make(name: str) -> Path:
        p = tmp_path / name
        p.mkdir(mode=0o700)
        (p / "report").write_text("x")
        return p

    dead = make(f"stx-recv-{dead_pid}-{started}-{ns}-aaaaaaaa")
    dead_sender = make(f"stx-send-{dead_pid}-{started}-{ns}-bbbbbbbb")
    reused = make(f"stx-recv-{os.getppid()}-{started + 12345}-{ns}-cccccccc")  # pid reused
    live = make(f"stx-recv-{os.getpid()}-{my_start}-{ns}-dddddddd")
    other_ns = make(f"stx-recv-{dead_pid}-{started}-{ns + 1}-eeeeeeee")
    old_style = make("stx-recv-ffffffff")
    not_ours = make(f"stx-recv-{dead_pid}-{started}-{ns}-gggggggg")
    os.chown(not_ours, 65534, 65534)
    target = make("victim")
    link = tmp_path / f"stx-recv-{dead_pid}-{started}-{ns}-hhhhhhhh"
    link.symlink_to(target)

    removed = {Path(p).name for p in ipc.remove_stale_dirs(str(tmp_path))}

    assert removed == {dead.name, dead_sender.name, reused.name}
    for kept in (live, other_ns, old_style, not_ours, target):
        assert (kept / "report").exists(), kept.name
    assert link.is_symlink()
    assert me.is_running()


@pytest.mark.timeout(30)
def test_directory_name_carries_the_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    path = Path(ipc.private_dir("stx-recv-"))
    try:
        pid, started, ns, _ = path.name[len("stx-recv-") :].split("-", 3)
        assert int(pid) == os.getpid()
        assert int(started) == ipc._start_time(os.getpid())
        assert int(ns) == os.stat("/proc/self/ns/pid").st_ino
        assert path.parent == tmp_path
        assert (path.stat().st_mode & 0o777) == 0o700
        assert ipc.remove_stale_dirs(str(tmp_path)) == []  # we are alive
    finally:
        ipc.remove_dir(str(path))
