"""Pre-shared key files: creation mode, overwrite, permission checks, refusals, no key in messages."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stxpar import psk as pskmod
from stxpar.errors import UsageError


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Most permissive umask, so only the code's own mode choice can make the file private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _assert_no_key(exc: BaseException, key: bytes) -> None:
    """The key must appear nowhere in what a user or a log could see."""
    for text in (str(exc), repr(exc), str(exc.args)):
        assert key.hex() not in text
        assert key.hex().upper() not in text
        assert repr(key) not in text
        assert key.hex()[:16] not in text


def test_write_key_file_is_private(scratch: Path, umask_zero: None) -> None:
    path = pskmod.write_key_file(scratch / "k")
    assert path == scratch / "k"
    assert _mode(path) == 0o600
    key = pskmod.load_key_file(path)
    assert len(key) == pskmod.KEY_BYTES == 32
    assert path.read_text() == pskmod.format_key(key)
    assert path.read_text().startswith("stx1-psk ")


def test_each_key_is_new(scratch: Path) -> None:
    a = pskmod.load_key_file(pskmod.write_key_file(scratch / "a"))
    b = pskmod.load_key_file(pskmod.write_key_file(scratch / "b"))
    assert a != b


def test_write_refuses_to_overwrite(scratch: Path) -> None:
    path = pskmod.write_key_file(scratch / "k")
    before = path.read_bytes()
    with pytest.raises(UsageError, match="already exists") as info:
        pskmod.write_key_file(path)
    assert path.read_bytes() == before
    _assert_no_key(info.value, pskmod.load_key_file(path))


def test_write_with_force_replaces_and_fixes_the_mode(scratch: Path, umask_zero: None) -> None:
    path = _write(scratch / "k", "old contents", mode=0o644)
    pskmod.write_key_file(path, force=True)
    assert _mode(path) == 0o600
    assert len(pskmod.load_key_file(path)) == 32


def test_write_into_missing_directory_is_a_usage_error(scratch: Path) -> None:
    with pytest.raises(UsageError):
        pskmod.write_key_file(scratch / "no" / "such" / "dir" / "k")


def test_load_round_trip_of_bare_hex(scratch: Path, psk: bytes) -> None:
    assert pskmod.load_key_file(_write(scratch / "k", psk.hex())) == psk
    assert pskmod.load_key_file(_write(scratch / "k2", "  stx1-psk  " + psk.hex() + "\n\n")) == psk
    longer = psk + os.urandom(32)
    assert pskmod.load_key_file(_write(scratch / "k3", pskmod.format_key(longer))) == longer


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601, 0o620])
def test_load_refuses_group_or_other_access(scratch: Path, psk: bytes, mode: int) -> None:
    path = _write(scratch / "k", pskmod.format_key(psk), mode=mode)
    with pytest.raises(UsageError) as info:
        pskmod.load_key_file(path)
    assert "chmod 600" in str(info.value)
    assert str(path) in str(info.value)
    _assert_no_key(info.value, psk)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_owner_only(scratch: Path, psk: bytes, mode: int) -> None:
    assert pskmod.load_key_file(_write(scratch / "k", pskmod.format_key(psk), mode=mode)) == psk


@pytest.mark.parametrize("nbytes", [0, 1, 16, 31])
def test_load_refuses_short_keys(scratch: Path, nbytes: int) -> None:
    key = os.urandom(nbytes)
    path = _write(scratch / "k", pskmod.format_key(key))
    with pytest.raises(UsageError) as info:
        pskmod.load_key_file(path)
    assert "256" in str(info.value)
    if nbytes >= 16:  # shorter hex strings could occur in the random scratch path by chance
        _assert_no_key(info.value, key)


GARBAGE = [
    "hello world",
    "stx1-psk not-hex-at-all",
    "stx1-psk " + "ab" * 31 + "a",  # odd number of digits
    "stx1-psk " + "zz" * 32,
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
    b"\x00\xff\xfe\x80" * 16,
]


@pytest.mark.parametrize("content", GARBAGE, ids=range(len(GARBAGE)))
def test_load_refuses_garbage(scratch: Path, content: str | bytes) -> None:
    with pytest.raises(UsageError):
        pskmod.load_key_file(_write(scratch / "k", content))


def test_garbage_message_does_not_echo_a_nearly_valid_key(scratch: Path, psk: bytes) -> None:
    # One stray character after a real key: the message must not quote the file.
    path = _write(scratch / "k", pskmod.format_key(psk).strip() + "g")
    with pytest.raises(UsageError) as info:
        pskmod.load_key_file(path)
    _assert_no_key(info.value, psk)
    assert info.value.__cause__ is None


def test_load_missing_file(scratch: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        pskmod.load_key_file(scratch / "missing")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


needs_proc_fd = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count open descriptors"
)


@needs_proc_fd
def test_load_refuses_a_directory(scratch: Path) -> None:
    directory = scratch / "keys"
    directory.mkdir(mode=0o700)
    before = _open_fds()
    with pytest.raises(UsageError, match="not a regular file") as info:
        pskmod.load_key_file(directory)
    assert str(directory) in str(info.value)
    assert info.value.__cause__ is None
    assert _open_fds() == before, "load_key_file leaked a file descriptor"


@needs_proc_fd
def test_load_refuses_a_fifo(scratch: Path) -> None:
    fifo = scratch / "fifo"
    os.mkfifo(fifo, 0o600)
    # With a writer present (the open cannot block either way).
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        before = _open_fds()
        with pytest.raises(UsageError, match="not a regular file"):
            pskmod.load_key_file(fifo)
        assert _open_fds() == before, "load_key_file leaked a file descriptor"
    finally:
        os.close(wfd)
        os.close(fd)


@needs_proc_fd
def test_load_refuses_a_fifo_without_a_writer_without_blocking(scratch: Path) -> None:
    fifo = scratch / "fifo"
    os.mkfifo(fifo, 0o600)
    before = _open_fds()
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            pskmod.load_key_file(fifo)
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # blocked in open(): release it by becoming the writer, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=10)
        pytest.fail("load_key_file blocked on a FIFO with no writer")
    assert len(result) == 1 and isinstance(result[0], UsageError)
    assert "not a regular file" in str(result[0])
    assert _open_fds() == before, "load_key_file leaked a file descriptor"


@needs_proc_fd
def test_load_leaks_no_fd_on_success_or_mode_refusal(scratch: Path, psk: bytes) -> None:
    good = _write(scratch / "good", pskmod.format_key(psk))
    loose = _write(scratch / "loose", pskmod.format_key(psk), mode=0o644)
    garbage = _write(scratch / "garbage", "not a key")
    before = _open_fds()
    for _ in range(3):
        assert pskmod.load_key_file(good) == psk
        for bad in (loose, garbage, scratch / "missing"):
            with pytest.raises(UsageError):
                pskmod.load_key_file(bad)
    assert _open_fds() == before, "load_key_file leaked a file descriptor"


def test_parse_key_messages_never_hold_the_key(psk: bytes) -> None:
    for text in (psk.hex()[:62], psk.hex() + "x", "stx1-psk " + psk.hex()[:-1]):
        with pytest.raises(UsageError) as info:
            pskmod.parse_key(text, source="test input")
        _assert_no_key(info.value, psk)
        assert "test input" in str(info.value)
