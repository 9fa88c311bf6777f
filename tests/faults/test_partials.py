"""Partial transfers left behind: a changed source starts over, ``stx recv --list-partial``
shows what a killed transfer left, ``--purge-partial AGE`` removes what is old enough, and a
completed transfer leaves nothing behind.

A partial transfer is made for real: ``stx send`` is SIGKILLed part-way through a transfer to
``stx recv`` (through a throttling relay, so the kill lands at a chosen fraction of the blocks).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from itest_support import assert_dest_exactly, run_stx, sha256_file

from stxpar.state import load as load_state

KB = 1 << 10
MB = 1 << 20
RATE = 6 * MB
BS = 256 * KB
DAY = 86400


def _killed_midway(rig_factory: Any, kit: Any, src: Any, fraction: float = 0.4) -> Any:
    rig = rig_factory(
        src, workers=2, recv_workers=2, block_size=BS, rate=RATE, label=f"partial {src.path.name}"
    )
    kill = rig.kill_at(kit.KillPoint("sender-coordinator", "progress", fraction=fraction))
    assert kill is not None, rig.context()
    assert kill.state.exists and 0 < kill.state.claimed < rig.total, kill.state
    return rig


def _partial_files(dest: Path) -> set[str]:
    return {p.name for p in dest.iterdir() if p.name.startswith(".")}


def _have_bytes(have: bytearray, size: int, bs: int) -> int:
    return sum(min(bs, size - i * bs) for i, v in enumerate(have) if v)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------- a changed source


def _change(path: Path, how: str) -> None:
    st = path.stat()
    if how == "content":  # same size, new bytes, written in place (same inode)
        with open(path, "r+b") as f:
            f.write(os.urandom(st.st_size))
    elif how == "size":
        with open(path, "ab") as f:
            f.write(os.urandom(300 * KB))
    elif how == "mtime":  # same bytes, a later modification time
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
        return
    elif how == "replaced":  # same size and mtime, but another file (another sender-side id)
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(os.urandom(st.st_size))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
        after = path.stat()
        assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        assert after.st_ino != st.st_ino
        return
    if path.stat().st_mtime_ns == st.st_mtime_ns:  # a coarse clock: make the change visible
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["content", "size", "mtime", "replaced"])
def test_changed_source_starts_over(how: str, rig_factory: Any, kit: Any, scratch: Path) -> None:
    src = kit.make_source(scratch / "data.bin", 12 * MB)
    rig = _killed_midway(rig_factory, kit, src)
    old_state = load_state(rig.statep)
    assert old_state is not None and old_state.count > 0

    _change(src.path, how)
    data = src.path.read_bytes()
    rig.src = kit.Source(src.path, data, sha256_file(src.path))
    rig.total = -(-len(data) // BS)
    rig.start_sender()
    run = rig.finish()
    result = run.json()
    ctx = rig.context()

    assert result["blocks_resumed"] == 0, (result, ctx)
    assert result["bytes_resumed"] == 0, result
    assert result["blocks_sent"] >= rig.total, result
    log = rig.receiver.stderr
    assert "starting data.bin over" in log, ctx  # and says so
    second = log[log.index("starting data.bin over") :]
    assert "resuming with" not in second, ctx
    assert sha256_file(rig.dest / "data.bin") == rig.src.sha256
    assert_dest_exactly(rig.dest, {"data.bin"})
    assert rig.receiver.stop() == 0


@pytest.mark.timeout(90)
def test_same_source_resumes_without_starting_over(
    rig_factory: Any, kit: Any, scratch: Path
) -> None:
    """The control for the test above: nothing changed, nothing is discarded."""
    src = kit.make_source(scratch / "data.bin", 12 * MB)
    rig = _killed_midway(rig_factory, kit, src)
    held = load_state(rig.statep)
    assert held is not None
    rig.start_sender()
    result = rig.finish().json()
    assert result["blocks_resumed"] >= held.count > 0
    assert "over" not in rig.receiver.stderr
    assert rig.receiver.stop() == 0


# ---------------------------------------------------------------- listing and purging


@pytest.mark.timeout(90)
def test_list_partial_shows_a_killed_transfer(rig_factory: Any, kit: Any, scratch: Path) -> None:
    src = kit.make_source(scratch / "data.bin", 8 * MB)
    rig = _killed_midway(rig_factory, kit, src)
    assert rig.receiver.stop() == 0  # nothing is writing any more
    state = load_state(rig.statep)
    assert state is not None
    have, total = state.count, state.identity.total_blocks
    dest = rig.dest
    assert _partial_files(dest) == {".data.bin.stxpart", ".data.bin.stxstate"}

    listed = run_stx("recv", "--dest", dest, "--list-partial")  # no key needed to look
    assert listed.rc == 0, listed.stderr
    lines = [ln for ln in listed.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, listed.stdout
    assert lines[0].startswith("partial data.bin: "), lines[0]
    assert f"({have}/{total} blocks)" in lines[0], lines[0]

    as_json = run_stx("recv", "--dest", dest, "--list-partial", "--json")
    assert as_json.rc == 0, as_json.stderr
    (obj,) = _json_lines(as_json.stdout)
    assert obj["name"] == "data.bin"
    assert obj["bytes"] == len(src.data)
    assert obj["blocks_have"] == have and obj["blocks_total"] == total
    assert obj["have_bytes"] == _have_bytes(state.have, len(src.data), BS)
    assert obj["action"] == "partial"
    assert 0 <= obj["age_s"] < 120
    # listing changed nothing
    assert _partial_files(dest) == {".data.bin.stxpart", ".data.bin.stxstate"}


@pytest.mark.timeout(90)
def test_purge_partial_by_age(rig_factory: Any, kit: Any, scratch: Path) -> None:
    src = kit.make_source(scratch / "data.bin", 8 * MB)
    rig = _killed_midway(rig_factory, kit, src)
    assert rig.receiver.stop() == 0
    dest = rig.dest
    (dest / "unrelated.txt").write_text("not a partial")
    (dest / "done.bin").write_bytes(b"a finished file")
    files = {".data.bin.stxpart", ".data.bin.stxstate"}

    kept = run_stx("recv", "--dest", dest, "--purge-partial", "7d")  # a fresh partial stays
    assert kept.rc == 0, kept.stderr
    assert kept.stdout.strip() == ""
    assert "nothing old enough to remove" in kept.stderr
    assert _partial_files(dest) == files

    # untouched for 8 days: a 9-day purge keeps it, a 7-day purge removes it
    old = time.time() - 8 * DAY
    for name in files:
        os.utime(dest / name, (old, old))
    kept = run_stx("recv", "--dest", dest, "--purge-partial", "9d", "--json")
    assert kept.rc == 0 and kept.stdout.strip() == "", kept.stdout
    assert _partial_files(dest) == files
    gone = run_stx("recv", "--dest", dest, "--purge-partial", "7d", "--json")
    assert gone.rc == 0, gone.stderr
    (obj,) = _json_lines(gone.stdout)
    assert obj["name"] == "data.bin" and obj["action"] == "removed"
    assert obj["age_s"] >= 7 * DAY
    assert _partial_files(dest) == set()
    assert_dest_exactly(dest, {"unrelated.txt", "done.bin"})
    assert (dest / "unrelated.txt").read_text() == "not a partial"


@pytest.mark.timeout(90)
def test_purge_partial_zero_removes_it_and_the_next_send_starts_fresh(
    rig_factory: Any, kit: Any, scratch: Path
) -> None:
    src = kit.make_source(scratch / "data.bin", 8 * MB)
    rig = _killed_midway(rig_factory, kit, src)
    assert rig.receiver.stop() == 0
    dest = rig.dest

    gone = run_stx("recv", "--dest", dest, "--purge-partial", "0s")
    assert gone.rc == 0, gone.stderr
    assert gone.stdout.startswith("removed data.bin: "), gone.stdout
    assert _partial_files(dest) == set()
    assert_dest_exactly(dest, set())

    listed = run_stx("recv", "--dest", dest, "--list-partial")
    assert listed.rc == 0 and listed.stdout.strip() == ""
    assert "no partial transfers" in listed.stderr
    listed = run_stx("recv", "--dest", dest, "--list-partial", "--json")
    assert listed.rc == 0 and listed.stdout.strip() == ""

    # the next run has nothing to resume and nothing to discard
    rig.start_receiver()
    rig.start_sender()
    result = rig.finish().json()
    assert result["blocks_resumed"] == 0 and result["blocks_sent"] >= rig.total
    assert "over" not in rig.receiver.stderr and "resuming with" not in rig.receiver.stderr
    assert rig.receiver.stop() == 0


@pytest.mark.timeout(60)
def test_unreadable_state_is_still_listed_and_purged(
    rig_factory: Any, kit: Any, scratch: Path
) -> None:
    """A partial whose state log is damaged (or missing) is still found and removable."""
    src = kit.make_source(scratch / "data.bin", 8 * MB)
    rig = _killed_midway(rig_factory, kit, src)
    assert rig.receiver.stop() == 0
    dest = rig.dest
    raw = bytearray(rig.statep.read_bytes())
    raw[12] ^= 0xFF  # inside the header
    rig.statep.write_bytes(bytes(raw))
    (dest / ".orphan.bin.stxpart").write_bytes(b"\0" * 1000)  # a partial with no state at all

    listed = run_stx("recv", "--dest", dest, "--list-partial", "--json")
    assert listed.rc == 0, listed.stderr
    objs = {o["name"]: o for o in _json_lines(listed.stdout)}
    assert set(objs) == {"data.bin", "orphan.bin"}
    for o in objs.values():
        assert o["blocks_have"] == 0 and o["have_bytes"] == 0  # nothing trusted

    gone = run_stx("recv", "--dest", dest, "--purge-partial", "0s", "--json")
    assert gone.rc == 0, gone.stderr
    assert {o["name"] for o in _json_lines(gone.stdout)} == {"data.bin", "orphan.bin"}
    assert_dest_exactly(dest, set())


def test_list_partial_of_a_missing_destination_is_a_usage_error(scratch: Path) -> None:
    run = run_stx("recv", "--dest", scratch / "nope", "--list-partial")
    assert run.rc == 2, (run.rc, run.stderr)
    assert "Traceback" not in run.stderr and run.stderr.strip()


# ---------------------------------------------------------------- completion leaves nothing


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rate", [0, RATE], ids=["direct", "throttled"])
def test_completed_transfer_leaves_no_state(
    rate: float, rig_factory: Any, kit: Any, scratch: Path
) -> None:
    src = kit.make_source(scratch / "data.bin", 6 * MB + 12345)
    rig = rig_factory(src, workers=3, recv_workers=2, block_size=BS, rate=rate, label="clean")
    result = rig.finish().json()
    assert result["blocks_resumed"] == 0
    assert_dest_exactly(rig.dest, {"data.bin"})  # no .stxpart, .stxstate or .stxstate.tmp
    listed = run_stx("recv", "--dest", rig.dest, "--list-partial", "--json")
    assert listed.rc == 0 and listed.stdout.strip() == ""
    assert rig.receiver.stop() == 0


@pytest.mark.timeout(90)
def test_resumed_transfer_leaves_no_state(rig_factory: Any, kit: Any, scratch: Path) -> None:
    src = kit.make_source(scratch / "data.bin", 8 * MB)
    rig = _killed_midway(rig_factory, kit, src, fraction=0.6)
    rig.start_sender()
    rig.finish()
    assert_dest_exactly(rig.dest, {"data.bin"})
    listed = run_stx("recv", "--dest", rig.dest, "--list-partial")
    assert listed.rc == 0 and "no partial transfers" in listed.stderr
    assert rig.receiver.stop() == 0
