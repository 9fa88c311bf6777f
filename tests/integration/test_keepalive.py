"""Short TCP keepalive on every connection of a transfer, on both sides.

A peer that vanishes without a FIN (a dead host, a paused VM, a middlebox that black-holes
the flow) is noticed by keepalive only; the kernel's default waits two hours before the first
probe. ``netio.keepalive`` sets it to 30 s + 3 probes 10 s apart on every socket: each
connection ``stx send`` makes (control and data) and each one the receiver accepts.

The sockets live in other processes (the sender's coordinator and workers, the receiver's
workers), so the test takes a copy of each one with ``pidfd_getfd`` (Linux 5.6 or later, and
the right to trace the process: workers make themselves non-dumpable, so as root only) and
reads its options with ``getsockopt``, during a transfer slowed down by a relay.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from itest_support import STX, wait_for
from tcp_relay import UplinkThrottle

import stxpar

MB = 1 << 20
RATE = 1 * MB  # per connection: the transfer lasts seconds
MAX_IDLE_S = 30
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _copy_fd(pid: int, fd: int) -> socket.socket:
    """A copy of descriptor ``fd`` of process ``pid`` (``pidfd_getfd``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.ENOSYS):
                pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
            raise OSError(err, os.strerror(err))
    finally:
        os.close(pidfd)
    return socket.socket(fileno=new)


def _keepalive_of(pid: int, fd: int) -> tuple[int, int]:
    """(SO_KEEPALIVE, TCP_KEEPIDLE) of a TCP socket of another process."""
    with _copy_fd(pid, fd) as s:
        on = s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        idle = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    return on, idle


def _tcp(p: psutil.Process, port: int, *, local: bool) -> list[int]:
    """Descriptors of ``p``'s established TCP connections on ``port`` (local or remote)."""
    try:
        conns = p.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [
        c.fd
        for c in conns
        if c.status == psutil.CONN_ESTABLISHED
        and c.fd >= 0
        and ((c.laddr and c.laddr.port == port) if local else (c.raddr and c.raddr.port == port))
    ]


@pytest.mark.timeout(90)
def test_every_transfer_socket_has_short_keepalive(
    scratch: Path, keyfile: tuple[Path, bytes]
) -> None:
    key_path, key = keyfile
    dest = scratch / "dest"
    dest.mkdir()
    src = scratch / "slow.bin"
    src.write_bytes(os.urandom(8 * MB))
    with stxpar.Receiver(dest, psk=key, workers=2) as r:
        port = r.address[1]
        relay = UplinkThrottle(("127.0.0.1", port), RATE).start()
        env = dict(os.environ)
        env.pop("STX_PSK_FILE", None)
        sender = psutil.Popen(
            [
                str(STX),
                "send",
                str(src),
                f"127.0.0.1:{relay.port}",
                "--psk-file",
                str(key_path),
                "--workers",
                "2",
                "--block-size",
                "64K",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            recv_workers = [p for p in psutil.Process().children() if p.name() == "stx-recv-worker"]

            def sender_side() -> dict[tuple[int, int], None]:
                found = {}
                for p in [sender, *sender.children(recursive=True)]:
                    for fd in _tcp(p, relay.port, local=False):
                        found[(p.pid, fd)] = None
                return found

            def receiver_side() -> dict[tuple[int, int], None]:
                return {(p.pid, fd): None for p in recv_workers for fd in _tcp(p, port, local=True)}

            # the control connection and 2 data streams on the sender's side, both data
            # streams in the receiver's workers
            assert wait_for(
                lambda: len(sender_side()) >= 3 and len(receiver_side()) >= 2, timeout=30
            ), "the transfer's connections never showed up"
            checked = 0
            for pid, fd in [*sender_side(), *receiver_side()]:
                try:
                    on, idle = _keepalive_of(pid, fd)
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        continue  # that stream just ended
                    raise
                assert on == 1, f"no keepalive on fd {fd} of process {pid}"
                assert 0 < idle <= MAX_IDLE_S, f"keepalive idle {idle} s on fd {fd} of {pid}"
                checked += 1
            assert checked >= 5
            # the receiver's own end of the control connection (this process)
            mine = _tcp(psutil.Process(), port, local=True)
            assert mine
            for fd in mine:
                on, idle = _keepalive_of(os.getpid(), fd)
                assert on == 1 and 0 < idle <= MAX_IDLE_S
            assert sender.wait(timeout=60) == 0
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
            relay.stop()
    assert (dest / "slow.bin").read_bytes() == src.read_bytes()
