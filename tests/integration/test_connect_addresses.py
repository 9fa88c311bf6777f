"""Every address a name resolves to is tried, happy-eyeballs style (issue 11, RFC 8305).

With ``::1 localhost`` listed before ``127.0.0.1 localhost`` (Debian's usual /etc/hosts) and
the receiver on 127.0.0.1 only, ``stx send FILE localhost:PORT`` used to try ::1 alone and fail
with exit 4. The end-to-end test runs the real ``stx send`` in a private mount namespace whose
/etc/hosts is such a file (``unshare -m`` + ``mount --bind``: real name resolution, no mock);
it skips with the reason when the sandbox allows neither. The ordering logic itself is
checked with real sockets: an address that refuses, one that black-holes (a listener whose
accept queue is full: the kernel drops further SYNs), one that listens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from itest_support import STX, assert_no_secrets, sha256_file, wait_for, write_random

import stxpar
from stxpar.netio import ATTEMPT_DELAY, connect, connect_first, interleave, resolve_all


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_v6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def _refusing(family: int = socket.AF_INET) -> tuple[int, tuple]:
    """An address where nothing listens (bound, never listening: the port stays ours)."""
    s = socket.socket(family)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    _keep.append(s)
    return family, s.getsockname()


@contextlib.contextmanager
def _blackhole(family: int = socket.AF_INET, port: int = 0) -> Iterator[tuple[int, tuple]]:
    """A listener that never accepts, its accept queue filled: a further connect gets no answer
    (SYNs dropped), as behind a black-holing firewall."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    lst = socket.socket(family)
    lst.bind((host, port))
    lst.listen(0)
    fillers: list[socket.socket] = []
    try:
        addr = lst.getsockname()
        for _ in range(8):  # until one connect stays unanswered
            c = socket.socket(family)
            c.setblocking(False)
            fillers.append(c)
            rc = c.connect_ex(addr)
            if rc == errno.EINPROGRESS:
                time.sleep(0.2)
                if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and _pending(c):
                    break
        else:
            pytest.skip("could not fill a listener's accept queue to make a black hole")
        yield family, addr
    finally:
        for c in fillers:
            c.close()
        lst.close()


def _pending(sock: socket.socket) -> bool:
    """The non-blocking connect has not completed (no answer to its SYN)."""
    try:
        sock.getpeername()
        return False
    except OSError:
        return True


_keep: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_kept() -> Iterator[None]:
    yield
    while _keep:
        _keep.pop().close()


@contextlib.contextmanager
def _listening(family: int = socket.AF_INET) -> Iterator[tuple[int, tuple]]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family) as s:
        s.bind((host, 0))
        s.listen(8)
        yield family, s.getsockname()


# ---------------------------------------------------------------- the race, with real sockets


@pytest.mark.timeout(30)
def test_a_refusing_first_address_falls_through_at_once() -> None:
    with _listening() as good:
        started = time.monotonic()
        sock = connect_first([_refusing(), _refusing(), good], timeout=10)
        took = time.monotonic() - started
        with sock:
            assert sock.getpeername() == good[1]
            assert sock.gettimeout() == 10
    assert took < ATTEMPT_DELAY, f"a refused address cost {took:.2f} s"


@pytest.mark.timeout(30)
def test_a_black_holed_first_address_costs_the_attempt_delay_not_the_timeout() -> None:
    with _blackhole() as hole, _listening() as good:
        started = time.monotonic()
        sock = connect_first([hole, good], timeout=10)
        took = time.monotonic() - started
        with sock:
            assert sock.getpeername() == good[1]
    assert ATTEMPT_DELAY * 0.9 <= took < 3.0, f"took {took:.2f} s"


@pytest.mark.timeout(30)
def test_every_address_failing_is_one_error_naming_the_reason() -> None:
    with pytest.raises(OSError) as info:
        connect_first([_refusing(), _refusing()], timeout=5)
    assert info.value.errno == errno.ECONNREFUSED
    with _blackhole() as hole:
        started = time.monotonic()
        with pytest.raises(OSError) as info2:
            connect_first([hole, _refusing()], timeout=1.0)
        took = time.monotonic() - started
    assert "timed out" in str(info2.value) and "refused" in str(info2.value), info2.value
    assert 0.9 <= took < 3.0, took


@pytest.mark.timeout(30)
def test_connect_retries_the_whole_race_and_raises_connecterror() -> None:
    family, addr = _refusing()
    started = time.monotonic()
    with pytest.raises(stxpar.ConnectError, match="after 2 attempts: Connection refused"):
        connect("127.0.0.1", addr[1], max_retries=1, timeout=2)
    assert time.monotonic() - started >= 0.25  # the backoff's floor (0.25-0.5 s)


@pytest.mark.timeout(30)
def test_addresses_alternate_families_from_the_first() -> None:
    """RFC 8305 section 4: getaddrinfo's first address, then the families alternate, each in
    its own order (so a run of unreachable v6 addresses cannot starve v4)."""
    v6 = [(socket.AF_INET6, (f"2001:db8::{i}", 7, 0, 0)) for i in range(1, 4)]
    v4 = [(socket.AF_INET, (f"192.0.2.{i}", 7)) for i in range(1, 3)]
    assert interleave([*v6, *v4]) == [v6[0], v4[0], v6[1], v4[1], v6[2]]
    assert interleave([v4[0], *v6, v4[1]]) == [v4[0], v6[0], v4[1], v6[1], v6[2]]
    assert interleave(v4) == v4


@pytest.mark.timeout(30)
def test_resolve_all_gives_each_address_once() -> None:
    assert resolve_all("127.0.0.1", 7) == [(socket.AF_INET, ("127.0.0.1", 7))]
    with pytest.raises(stxpar.UsageError, match="cannot resolve"):
        resolve_all("no-such-host.invalid", 7)


# ---------------------------------------------------------------- the real CLI, real /etc/hosts


def _namespace_hosts_works(hosts: Path) -> str | None:
    """None when ``unshare -m`` + a bind mount over /etc/hosts work here; else why not."""
    if os.geteuid() != 0:
        return "a private mount namespace needs root here"
    if not shutil.which("unshare") or not shutil.which("mount"):
        return "unshare or mount is not installed"
    probe = (
        "import socket;print([i[4][0] for i in socket.getaddrinfo('localhost', 1, "
        "type=socket.SOCK_STREAM)])"
    )
    try:
        run = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
            + [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if run.returncode != 0:
        return f"unshare -m / mount --bind not allowed here: {run.stderr.strip()[:200]}"
    if not run.stdout.strip().startswith("['::1'"):
        return f"/etc/hosts is not what resolves localhost here: {run.stdout.strip()}"
    return None


@needs_v6
@pytest.mark.timeout(90)
@pytest.mark.parametrize("v6", ["refused", "black-holed"])
def test_send_to_localhost_when_hosts_lists_v6_first_and_the_receiver_is_v4_only(
    scratch: Path, keyfile: tuple[Path, bytes], v6: str
) -> None:
    hosts = scratch / "hosts"
    hosts.write_text("::1 localhost\n127.0.0.1 localhost\n")
    why = _namespace_hosts_works(hosts)
    if why:
        pytest.skip(why)
    src = scratch / "data.bin"
    sha = write_random(src, 600_000)
    dest = scratch / "dst"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=keyfile[1], host="127.0.0.1", port=0, workers=2) as receiver:
        port = receiver.address[1]
        with contextlib.ExitStack() as stack:
            if v6 == "black-holed":
                stack.enter_context(_blackhole(socket.AF_INET6, port))
            else:
                with socket.socket(socket.AF_INET6) as probe:
                    probe.bind(("::1", port))  # nothing serves [::1]:port: it refuses
            argv = [
                "unshare",
                "-m",
                "sh",
                "-c",
                'mount --bind "$0" /etc/hosts && exec "$@"',
                str(hosts),
                str(STX),
                "send",
                str(src),
                f"localhost:{port}",
                "--psk-file",
                str(keyfile[0]),
                "--workers",
                "2",
                "--block-size",
                "64K",
                "--max-retries",
                "2",  # a retryable hiccup of a loaded receiver is not what this test is about
                "--json",
            ]
            env = {k: v for k, v in os.environ.items() if k not in ("STX_PSK_FILE", "STX_DEBUG")}
            run = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env
            )
        assert_no_secrets(run.stdout, run.stderr)
        assert run.returncode == 0, (run.returncode, run.stderr)
        assert wait_for(lambda: (dest / src.name).exists(), timeout=10)
    assert sha256_file(dest / src.name) == sha
