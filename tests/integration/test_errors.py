"""Failures through the CLI: wrong key, bad local input, nothing listening. Each gives its
documented exit code and one line on stderr, never a traceback, and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from itest_support import (
    CliReceiver,
    CliRun,
    assert_dest_exactly,
    assert_one_line_error,
    free_port,
    make_keyfile,
    read_keyfile,
    run_stx,
    sha256_file,
    write_random,
)

import stxpar

# ---------------------------------------------------------------- wrong key


@pytest.mark.timeout(60)
def test_wrong_key_exits_3_and_the_receiver_serves_the_next_sender(
    cli_receiver: Callable[..., CliReceiver],
    keyfile: tuple[Path, bytes],
    scratch: Path,
) -> None:
    good, _ = keyfile
    wrong = scratch / "wrong.key"
    make_keyfile(wrong)
    dest = scratch / "dst"
    dest.mkdir()
    src = scratch / "secret.bin"
    want = write_random(src, 300_000)
    receiver = cli_receiver(good, dest, workers=2, once=True)
    send = ("send", src, receiver.address, "--workers", "1", "--block-size", "64K", "--json")

    bad = run_stx(*send, "--psk-file", wrong)

    assert bad.rc == 3, bad.stderr
    assert_one_line_error(bad)
    assert len(bad.stderr_lines()) == 1, bad.stderr
    assert bad.stdout.strip() == ""
    assert_dest_exactly(dest, set())
    # a failed handshake does not end an --once receiver
    time.sleep(0.2)
    assert receiver.proc is not None and receiver.proc.poll() is None, receiver.stderr

    ok = run_stx(*send, "--psk-file", good)

    assert ok.rc == 0, ok.stderr
    assert receiver.wait(timeout=20) == 0
    assert sha256_file(dest / src.name) == want
    assert_dest_exactly(dest, {src.name})
    assert "Traceback" not in receiver.stderr
    assert len(receiver.json_lines()) == 1


@pytest.mark.timeout(60)
def test_wrong_key_through_the_api_raises_auth_error(scratch: Path) -> None:
    dest = scratch / "dst"
    dest.mkdir()
    src = scratch / "f.bin"
    write_random(src, 1000)
    with stxpar.Receiver(dest, psk=stxpar.generate_key(), workers=1) as r:
        with pytest.raises(stxpar.AuthError) as info:
            stxpar.send(src, *r.address, psk=stxpar.generate_key(), workers=1)
        assert info.value.exit_code == 3
        assert r.completed == []
    assert_dest_exactly(dest, set())


# ---------------------------------------------------------------- bad input


Arg = str | os.PathLike[str]


@dataclass
class Case:
    """One bad command: its argv (after ``stx``), the exit code it must give."""

    args: list[Arg]
    rc: int
    #: words the error line must contain (case-insensitive)
    hint: str
    #: a well-formed command would end at most this fast
    max_seconds: float = 15.0


@pytest.fixture(scope="module")
def base_key(shm_dir: Path) -> Path:
    path = shm_dir / "base.key"
    make_keyfile(path)
    return path


def _key_copy(src: Path, dst: Path, mode: int) -> Path:
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    return dst


@contextlib.contextmanager
def _listening_socket() -> Iterator[int]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])
    finally:
        s.close()


def build_case(name: str, scratch: Path, key: Path, stack: contextlib.ExitStack) -> Case:
    """The command for ``name``; resources it needs live as long as ``stack``."""
    src = scratch / "input.bin"
    write_random(src, 10_000)
    # nothing listens there: a command that skipped its local check would end with 4, not 2
    nowhere = f"127.0.0.1:{free_port()}"
    send: list[Arg] = ["send", src, nowhere, "--psk-file", key, "--max-retries", "0"]
    dest = scratch / "dst"
    dest.mkdir(exist_ok=True)
    recv: list[Arg] = ["recv", "--listen", "127.0.0.1:0", "--psk-file", key, "--dest", dest]
    recv.append("--once")
    if name == "missing-file":
        return Case(["send", scratch / "nope.bin", *send[2:]], 2, "no such file")
    if name == "unreadable-file":
        os.chmod(src, 0)
        return Case(send, 2, "cannot read")
    if name == "fifo":
        os.mkfifo(scratch / "pipe")
        return Case(["send", scratch / "pipe", *send[2:]], 2, "FIFO")
    if name == "reserved-name":
        reserved = scratch / "backup.stxlock"
        write_random(reserved, 10)
        return Case(["send", reserved, *send[2:]], 2, "reserved")
    if name == "control-character-name":
        odd = scratch / "two\nlines.bin"
        write_random(odd, 10)
        return Case(["send", odd, *send[2:]], 2, "control characters")
    if name == "same-name-twice":
        (scratch / "a").mkdir()
        twin = scratch / "a" / "input.bin"
        write_random(twin, 10)
        return Case(["send", src, twin, *send[2:]], 2, "both arrive as input.bin")
    if name == "no-port":
        return Case(["send", src, "nohostport", *send[3:]], 2, "nohostport")
    if name == "port-out-of-range":
        return Case(["send", src, "h:99999", *send[3:]], 2, "port")
    if name == "missing-key":
        return Case([*send[:4], scratch / "no.key", *send[5:]], 2, "does not exist")
    if name == "short-key":
        short = scratch / "short.key"
        short.write_text("stx1-psk " + os.urandom(16).hex() + "\n")
        os.chmod(short, 0o600)
        return Case([*send[:4], short, *send[5:]], 2, "256 bits")
    if name == "key-too-open":
        opened = _key_copy(key, scratch / "open.key", 0o644)
        return Case([*send[:4], opened, *send[5:]], 2, "chmod 600")
    if name == "workers-0":
        return Case([*send, "--workers", "0"], 2, "--workers")
    if name == "recv-dest-missing":
        return Case([*recv[:-2], scratch / "no-dir", "--once"], 2, "does not exist")
    if name == "recv-dest-not-dir":
        return Case([*recv[:-2], src, "--once"], 2, "not a directory")
    if name == "recv-dest-not-writable":
        locked = scratch / "locked"
        locked.mkdir()
        os.chmod(locked, 0o500)
        return Case([*recv[:-2], locked, "--once"], 2, "not writable")
    if name == "recv-port-in-use":
        port = stack.enter_context(_listening_socket())
        return Case(["recv", "--listen", f"127.0.0.1:{port}", *recv[3:]], 2, "in use")
    if name == "nothing-listening":
        args: list[Arg] = ["send", src, nowhere, "--psk-file", key, "--max-retries", "1"]
        return Case(args, 4, "cannot connect", max_seconds=5.0)
    raise AssertionError(name)


CASES = [
    "missing-file",
    "unreadable-file",
    "fifo",
    "same-name-twice",
    "reserved-name",
    "control-character-name",
    "no-port",
    "port-out-of-range",
    "missing-key",
    "short-key",
    "key-too-open",
    "workers-0",
    "recv-dest-missing",
    "recv-dest-not-dir",
    "recv-dest-not-writable",
    "recv-port-in-use",
    "nothing-listening",
]
#: errors that argparse reports, with its usage block before the error line


def _run_case(name: str, scratch: Path, base_key: Path) -> CliRun:
    if name == "unreadable-file" and os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading a file")
    if name == "recv-dest-not-writable" and os.geteuid() == 0:
        pytest.skip("running as root: chmod 500 does not stop root from writing")
    with contextlib.ExitStack() as stack:
        case = build_case(name, scratch, base_key, stack)
        run = run_stx(*case.args, timeout=30)
    assert run.rc == case.rc, f"{name}: exit {run.rc}, expected {case.rc}: {run.stderr!r}"
    assert run.seconds < case.max_seconds, f"{name} took {run.seconds:.1f} s"
    last = run.stderr_lines()[-1] if run.stderr_lines() else ""
    assert case.hint.lower() in last.lower(), f"{name}: unhelpful message {last!r}"
    dest = scratch / "dst"
    if dest.is_dir():
        assert_dest_exactly(dest, set())
    return run


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", CASES)
def test_bad_input_exit_code_without_traceback(name: str, scratch: Path, base_key: Path) -> None:
    run = _run_case(name, scratch, base_key)
    assert_one_line_error(run)
    assert run.stdout.strip() == ""
    # the message is on the last line, prefixed with the program name
    assert "error" in run.stderr_lines()[-1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", CASES)
def test_bad_input_error_is_one_short_line(name: str, scratch: Path, base_key: Path) -> None:
    run = _run_case(name, scratch, base_key)
    lines = run.stderr_lines()
    assert len(lines) == 1, run.stderr
    assert len(lines[0]) < 300, lines[0]


# ---------------------------------------------------------------- keygen


@pytest.mark.timeout(30)
def test_keygen_refuses_to_overwrite_without_force(scratch: Path) -> None:
    path = scratch / "k"
    first = make_keyfile(path)

    again = run_stx("keygen", "-o", path)
    assert again.rc == 2, again.stderr
    assert_one_line_error(again)
    assert len(again.stderr_lines()) == 1
    assert read_keyfile(path) == first

    forced = run_stx("keygen", "-o", path, "--force")
    assert forced.rc == 0, forced.stderr
    assert (path.stat().st_mode & 0o777) == 0o600
    assert read_keyfile(path) != first


@pytest.mark.timeout(30)
def test_keygen_force_tightens_an_open_file(scratch: Path) -> None:
    path = scratch / "k"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    run = run_stx("keygen", "-o", path, "--force")
    assert run.rc == 0, run.stderr
    assert (path.stat().st_mode & 0o777) == 0o600
    assert len(read_keyfile(path)) == 32
