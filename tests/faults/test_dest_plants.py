"""A local user who can write into the destination plants entries at the names the receiver
uses (``NAME``, ``.NAME.stxpart``, ``.NAME.stxstate``, ``.NAME.stxstate.tmp``, ``.NAME.stxlock``)
before or during a transfer: FIFOs, symlinks to devices, hard links to victim files outside the
destination, directories. The receiver must not hang, read without bound, write into a victim,
or report success for a file that is not what the sender sent; a shared destination is refused
unless allowed.

Real processes on loopback: an in-process ``stxpar.Receiver`` (its workers are real processes)
and ``stx send`` runs; the plants are made by the test in a scratch destination (as root, the
"other user" is simulated with ``chown`` to uid 65534).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from itest_support import (
    STX,
    CliRun,
    assert_dest_exactly,
    assert_no_secrets,
    run_stx,
    sha256_file,
    wait_for,
)
from tcp_relay import UplinkThrottle

import stxpar
from stxpar import state
from stxpar.sender import SourceFile
from stxpar.state import Identity, encode_header

KB = 1 << 10
MB = 1 << 20
BS = 64 * KB
VICTIM = b"victim: must never change\n" * 100


class Site:
    """A destination, a directory beside it (victims live there) and a source directory."""

    def __init__(self, root: Path, keyfile: Path, key: bytes) -> None:
        self.root = root
        self.dest = root / "dst"
        self.outside = root / "outside"
        self.src = root / "src"
        for d in (self.dest, self.outside, self.src):
            d.mkdir()
        self.keyfile, self.key = keyfile, key
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def on_event(self, kind: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.events.append((kind, dict(fields)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [f for k, f in self.events if k == kind]

    def receiver(self, **kw: Any) -> stxpar.Receiver:
        kw.setdefault("workers", 1)
        return stxpar.Receiver(self.dest, psk=self.key, on_event=self.on_event, **kw)

    def victim(self, data: bytes = VICTIM) -> Path:
        path = self.outside / "victim"
        path.write_bytes(data)
        return path

    def source(self, name: str, size: int) -> tuple[Path, str]:
        path = self.src / name
        path.write_bytes(os.urandom(size))
        return path, sha256_file(path)

    def send_args(self, src: Path, port: int, *extra: str) -> list[str]:
        return [
            "send",
            str(src),
            f"127.0.0.1:{port}",
            "--psk-file",
            str(self.keyfile),
            "--workers",
            "1",
            "--block-size",
            "64K",
            "--max-retries",
            "1",
            "--json",
            *extra,
        ]

    def send(self, src: Path, port: int, *extra: str, timeout: float = 40.0) -> CliRun:
        try:
            return run_stx(*self.send_args(src, port, *extra), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"stx send hung for {timeout:.0f} s") from None


@pytest.fixture
def site(scratch: Path, stx_key: tuple[Path, bytes]) -> Iterator[Site]:
    s = Site(scratch, *stx_key)
    try:
        yield s
    finally:
        _unblock_fifos(s.dest)


def _unblock_fifos(dest: Path) -> None:
    """A receiver stuck in ``open()`` of a FIFO (the bug) is released, so teardown ends."""
    with contextlib.suppress(OSError):
        for p in dest.iterdir():
            if stat.S_ISFIFO(os.lstat(p).st_mode):
                with contextlib.suppress(OSError):
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))


def _delivered(site: Site, run: CliRun, name: str, sha: str) -> None:
    assert run.rc == 0, (run.rc, run.stderr)
    assert sha256_file(site.dest / name) == sha
    assert not (site.dest / name).is_symlink()
    assert_dest_exactly(site.dest, {name})


# ---------------------------------------------------------------- the state log


@pytest.mark.timeout(90)
def test_fifo_at_the_state_log_does_not_block_admission(site: Site) -> None:
    src, sha = site.source("fifo.bin", 300 * KB)
    os.mkfifo(site.dest / ".fifo.bin.stxstate")
    with site.receiver() as r:
        run = site.send(src, r.address[1], timeout=30)
        _delivered(site, run, "fifo.bin", sha)
        # and the name is not left reserved: the same name goes through again
        src.write_bytes(os.urandom(100 * KB))
        run = site.send(src, r.address[1], timeout=30)
        _delivered(site, run, "fifo.bin", sha256_file(src))


@pytest.mark.timeout(60)
def test_dev_zero_at_the_state_log_is_not_read(site: Site) -> None:
    """A symlink to /dev/zero: the receiver used to read it until it ran out of memory."""
    src, sha = site.source("zero.bin", 300 * KB)
    statep = site.dest / ".zero.bin.stxstate"
    statep.symlink_to("/dev/zero")
    started = time.monotonic()
    assert state.load(statep) is None
    assert time.monotonic() - started < 2
    with site.receiver() as r:
        run = site.send(src, r.address[1], timeout=30)
        _delivered(site, run, "zero.bin", sha)
    assert os.path.exists("/dev/zero") and stat.S_ISCHR(os.stat("/dev/zero").st_mode)


def test_load_reads_no_more_than_a_valid_log_holds(site: Site) -> None:
    """A huge (sparse) state log with a valid header: only header + records for its blocks are
    read; the claims are the same as for the log cut at that size."""
    ident = Identity("big.bin", 10 * BS, 1, BS, b"\1" * 16)
    statep = site.dest / ".big.bin.stxstate"
    with open(statep, "wb") as f:
        f.write(encode_header(ident) + state.encode_record(3, b"\2" * 16))
        f.truncate(4 << 30)  # 4 GiB of zeros after it (sparse: no memory, no disk)
    started = time.monotonic()
    parsed = state.load(statep)
    assert time.monotonic() - started < 2
    assert parsed is not None and parsed.count == 1 and parsed.have[3]


@pytest.mark.timeout(60)
def test_list_and_purge_partial_with_plants_do_not_hang_or_follow(site: Site) -> None:
    victim = site.victim()
    os.mkfifo(site.dest / ".fifo.bin.stxstate")
    (site.dest / ".zero.bin.stxstate").symlink_to("/dev/zero")
    (site.dest / ".link.bin.stxpart").symlink_to(victim)
    (site.dest / ".dir.bin.stxpart").mkdir()
    listed = run_stx("recv", "--dest", site.dest, "--list-partial", "--json", timeout=20)
    assert listed.rc == 0, listed.stderr
    assert {"fifo.bin", "zero.bin", "link.bin"} <= {ln["name"] for ln in _json(listed)}
    gone = run_stx("recv", "--dest", site.dest, "--purge-partial", "0s", "--json", timeout=20)
    assert gone.rc == 0, gone.stderr
    # the planted entries are unlinked, never what they point to; a directory stays
    assert {p.name for p in site.dest.iterdir()} == {".dir.bin.stxpart"}
    assert victim.read_bytes() == VICTIM
    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)


def _json(run: CliRun) -> list[dict[str, Any]]:
    import json

    return [json.loads(ln) for ln in run.stdout.splitlines() if ln.strip()]


# ---------------------------------------------------------------- hard links


@pytest.mark.timeout(60)
def test_hard_link_at_the_state_tmp_is_not_written(site: Site) -> None:
    victim = site.victim()
    src, sha = site.source("tmp.bin", 300 * KB)
    os.link(victim, site.dest / ".tmp.bin.stxstate.tmp")
    with site.receiver() as r:
        run = site.send(src, r.address[1])
        _delivered(site, run, "tmp.bin", sha)
    assert victim.read_bytes() == VICTIM, "the receiver wrote its state log into a hard link"
    assert victim.stat().st_nlink == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plant", ["hardlink", "symlink", "fifo", "foreign"])
def test_plant_at_the_lock_file_is_replaced_not_used(site: Site, plant: str) -> None:
    victim = site.victim()
    src, sha = site.source("lock.bin", 200 * KB)
    lockp = site.dest / ".lock.bin.stxlock"
    if plant == "hardlink":
        os.link(victim, lockp)
    elif plant == "symlink":
        lockp.symlink_to(victim)
    elif plant == "fifo":
        os.mkfifo(lockp)
    else:
        lockp.write_bytes(b"")
        os.chown(lockp, 65534, 65534)
    with site.receiver() as r:
        run = site.send(src, r.address[1], timeout=30)
        _delivered(site, run, "lock.bin", sha)
    assert victim.read_bytes() == VICTIM
    assert victim.stat().st_nlink == 1


@pytest.mark.timeout(60)
def test_hard_link_at_the_partial_with_a_matching_state_log_is_not_resumed_into(
    site: Site,
) -> None:
    """The strongest plant: a state log naming exactly the coming transfer, and the partial
    name hard-linked to a victim of the file's size. The receiver used to resume into it,
    overwriting the victim (and then renaming the victim's inode to the final name)."""
    size = 5 * BS
    src, sha = site.source("resume.bin", size)
    victim = site.victim(b"v" * size)
    sf = SourceFile.open(src)
    ident = Identity("resume.bin", sf.size, sf.mtime_ns, BS, sf.file_id)
    (site.dest / ".resume.bin.stxstate").write_bytes(encode_header(ident))
    os.link(victim, site.dest / ".resume.bin.stxpart")
    with site.receiver() as r:
        run = site.send(src, r.address[1])
        _delivered(site, run, "resume.bin", sha)
    assert victim.read_bytes() == b"v" * size, "the receiver wrote into a planted hard link"
    assert victim.stat().st_nlink == 1
    assert [e["file"] for e in site.of("restarting")] == ["resume.bin"]


# ---------------------------------------------------------------- the final name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_non_file_at_the_final_name_is_refused_before_any_data(site: Site, kind: str) -> None:
    src, _ = site.source("taken.bin", 2 * MB)
    final = site.dest / "taken.bin"
    if kind == "directory":
        final.mkdir()
    else:
        os.mkfifo(final)
    with site.receiver() as r:
        run = site.send(src, r.address[1])
        assert run.rc == 1, (run.rc, run.stderr)
        assert len(run.stderr_lines()) == 1 and "Traceback" not in run.stderr, run.stderr
        want = "is a directory" if kind == "directory" else "not a regular file"
        assert "taken.bin already exists" in run.stderr and want in run.stderr, run.stderr
        result = site.of("rejected")
        assert result and "already exists" in result[0]["error"]
        assert not site.of("accepted"), "admitted, data moved"
    assert {p.name for p in site.dest.iterdir()} == {"taken.bin"}  # no partial, no state, no lock


# ---------------------------------------------------------------- a shared destination


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["world", "group", "sticky", "owner"])
def test_shared_destination_is_refused_unless_allowed(site: Site, how: str) -> None:
    if how == "owner":
        os.chown(site.dest, 65534, 65534)
        os.chmod(site.dest, 0o755)
    elif how == "group":  # a group with another member (nobody's primary group)
        os.chown(site.dest, -1, 65534)
        os.chmod(site.dest, 0o770)
    else:
        os.chmod(site.dest, {"world": 0o777, "group": 0o770, "sticky": 0o1777}[how])
    with pytest.raises(stxpar.UsageError, match="shared"):
        site.receiver().start()
    recv = [
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--psk-file",
        str(site.keyfile),
        "--dest",
        str(site.dest),
    ]
    run = run_stx(*recv, timeout=20)
    assert run.rc == 2, (run.rc, run.stderr)
    assert len(run.stderr_lines()) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "shared" in run.stderr and "--allow-shared-dest" in run.stderr, run.stderr
    # allowed: a loud warning at start, then it serves
    src, sha = site.source("shared.bin", 100 * KB)
    proc = subprocess.Popen(
        [str(STX), *recv, "--allow-shared-dest", "--once"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        assert lines[0].startswith("WARNING: destination") and "shared" in lines[0], lines
        port = int(lines[1].split("listening on 127.0.0.1:")[1].split()[0])
        sent = site.send(src, port)
        assert sent.rc == 0, sent.stderr
        assert proc.wait(timeout=20) == 0
        assert sha256_file(site.dest / "shared.bin") == sha
        assert_no_secrets(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_group_writable_by_a_group_of_our_own_is_accepted(site: Site) -> None:
    """umask 002 with user-private groups makes directories 0775: only we are in that group."""
    if any(p.pw_gid == os.getegid() and p.pw_uid != os.geteuid() for p in pwd.getpwall()):
        pytest.skip("our primary group has other members here")
    if grp.getgrgid(os.getegid()).gr_mem:
        pytest.skip("our primary group has other members here")
    os.chown(site.dest, -1, os.getegid())
    os.chmod(site.dest, 0o775)
    with site.receiver():
        assert not site.of("warning")


def test_private_destination_in_a_shared_parent_is_accepted(site: Site) -> None:
    """Only the destination itself is judged (mkdtemp-made directories in /tmp or /dev/shm
    stay usable)."""
    os.chmod(site.root, 0o1777)
    try:
        with site.receiver():
            assert not site.of("warning")
    finally:
        os.chmod(site.root, 0o700)


# ---------------------------------------------------------------- the partial, swapped mid-way


@pytest.mark.timeout(90)
def test_partial_replaced_mid_transfer_is_not_reported_received(site: Site, procs: Any) -> None:
    """A plant swaps ``.NAME.stxpart`` for a file of its own while blocks arrive. The receiver
    used to rename whatever had the partial's name: the sender got its receipt (exit 0) for a
    file that held the planter's bytes. Now the inode kept since admission is checked: the
    transfer fails, the log says the partial is gone (not "kept for a resume"), its state log
    is dropped, and the planted file never takes the final name."""
    src, _ = site.source("swap.bin", 3 * MB)
    part = site.dest / ".swap.bin.stxpart"
    with site.receiver() as r, UplinkThrottle(r.address, rate=1 * MB) as slow:
        sender = procs.track(
            subprocess.Popen(
                [str(STX), *site.send_args(src, slow.port, "--max-retries", "0")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        assert wait_for(lambda: bool(site.of("accepted")), timeout=30), site.events
        planted = site.dest / "planted"
        planted.write_bytes(b"P" * (3 * MB))
        os.chmod(planted, 0o600)
        os.replace(planted, part)
        out, err = sender.communicate(timeout=60)
        assert_no_secrets(out, err)
        assert sender.returncode != 0, (sender.returncode, err)
        assert "removed or replaced" in err, err
        assert wait_for(lambda: bool(site.of("failed")), timeout=10)
        failed = site.of("failed")[0]
        assert failed["partial"] == "gone" and not failed["kept"], failed
        assert wait_for(lambda: not (site.dest / ".swap.bin.stxstate").exists(), timeout=10)
    assert not (site.dest / "swap.bin").exists()


# ---------------------------------------------------------------- purge and live transfers


@pytest.mark.timeout(90)
def test_purge_leaves_a_live_transfer_alone(site: Site, procs: Any) -> None:
    """``--purge-partial 0s`` while a receiver is writing the name: its lock is held, so the
    partial and its state stay and the transfer completes."""
    src, sha = site.source("live.bin", 2 * MB)
    with site.receiver() as r, UplinkThrottle(r.address, rate=1 * MB) as slow:
        sender = procs.track(
            subprocess.Popen(
                [str(STX), *site.send_args(src, slow.port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        assert wait_for(lambda: bool(site.of("accepted")), timeout=30), site.events
        gone = run_stx("recv", "--dest", site.dest, "--purge-partial", "0s", "--json")
        assert gone.rc == 0 and not gone.stdout.strip(), (gone.stdout, gone.stderr)
        assert (site.dest / ".live.bin.stxpart").exists()
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
    assert sha256_file(site.dest / "live.bin") == sha
    assert_dest_exactly(site.dest, {"live.bin"})


@pytest.mark.timeout(60)
def test_stale_lock_file_of_a_killed_receiver_does_not_block(site: Site) -> None:
    """A receiver SIGKILLed mid-transfer leaves its lock file (unlocked: the kernel released
    the flock): the next receiver takes it over, and purge removes it."""
    (site.dest / ".stale.bin.stxlock").write_bytes(b"")
    os.chmod(site.dest / ".stale.bin.stxlock", 0o600)
    src, sha = site.source("stale.bin", 100 * KB)
    with site.receiver() as r:
        run = site.send(src, r.address[1])
        _delivered(site, run, "stale.bin", sha)
    (site.dest / ".orphan.bin.stxlock").write_bytes(b"")
    gone = run_stx("recv", "--dest", site.dest, "--purge-partial", "0s")
    assert gone.rc == 0, gone.stderr
    assert_dest_exactly(site.dest, {"stale.bin"})


@pytest.mark.timeout(90)
def test_partial_deleted_mid_transfer_is_not_said_to_be_kept(
    site: Site, procs: Any, scratch: Path
) -> None:
    """``stx recv`` used to log "partial kept for a resume (...)" after ``.NAME.stxpart`` was
    deleted under it. It now says what is there: nothing, and the state log is dropped."""
    from itest_support import CliReceiver

    logdir = scratch / "logs"
    logdir.mkdir()
    recv = CliReceiver(site.keyfile, site.dest, logdir, workers=1, once=False).start()
    try:
        src, _ = site.source("del.bin", 3 * MB)
        with UplinkThrottle((recv.host, recv.port), rate=1 * MB) as slow:
            sender = procs.track(
                subprocess.Popen(
                    [str(STX), *site.send_args(src, slow.port, "--max-retries", "0")],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            assert wait_for(lambda: "receiving del.bin" in recv.stderr, timeout=30), recv.stderr
            (site.dest / ".del.bin.stxpart").unlink()
            _, err = sender.communicate(timeout=60)
            assert sender.returncode != 0, err
        assert wait_for(lambda: "failed del.bin" in recv.stderr, timeout=10), recv.stderr
        line = next(ln for ln in recv.stderr.splitlines() if "failed del.bin" in ln)
        assert "kept for a resume" not in line and "nothing kept" in line, line
        assert wait_for(lambda: not (site.dest / ".del.bin.stxstate").exists(), timeout=10)
        assert_dest_exactly(site.dest, set())
    finally:
        recv.stop()
