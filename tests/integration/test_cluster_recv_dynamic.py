"""Receiving helpers that join or die while a session runs (issue 14): a helper that joins
mid-transfer takes streams of that very session, and a dead helper's streams go to the
surviving helpers as well as to the receiver. Real ``stx recv``/``stx send``/``stx worker``
processes on 127.0.0.1; the sender's ``--limit-rate`` keeps the transfer going for a few
seconds, so that the change happens in its data phase."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from itest_support import assert_no_secrets, register_key, sha256_file, wait_for, write_random
from test_cluster_recv import DATA_PORT, _joined, _landed, rig  # noqa: F401  (the fixture)

import stxpar
from stxpar.errors import ConnectError, ProtocolError, StxError
from stxpar.handshake import ServerHandshake, handshake_cap, keyring_for
from stxpar.manifest import Builder, Header, Limits
from stxpar.netio import FramedSocket
from stxpar.records import ControlChannel
from stxpar.transfer import Transfer
from stxpar.wire import MAX_STREAMS, FrameType, MetadataAck, bitmap

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
REROUTED = re.compile(r"streams rerouted \(([^:]+): [^)]*\): (.*)")


def _reroutes(stderr: str, reason: str) -> list[dict[str, int]]:
    """The receiver's ``streams rerouted`` lines for ``reason``: place -> stream ids."""
    out = []
    for why, rest in REROUTED.findall(stderr):
        if why == reason:
            out.append({p: int(n) for n, p in re.findall(r"(\d+) to (\S+?)(?:,|$)", rest)})
    return out


def _data_port(helper: Any) -> str:
    m = DATA_PORT.search(helper.stderr)
    assert m, helper.stderr
    return str(m.group(1))


@pytest.mark.parametrize("before", [1, 0], ids=["one-helper-before", "none-before"])
def test_helper_joining_mid_transfer_takes_streams(
    rig: dict[str, Any],  # noqa: F811
    before: int,
) -> None:
    """A transfer through the receiver (and ``before`` helpers); a helper joins while it
    runs and lands blocks of it; the file arrives identical."""
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 64 * MIB)
    recv = rig["receiver"](*(["--cluster-workers", str(before)] if before else []))
    first = [rig["helper"]("--once") for _ in range(before)]
    assert wait_for(lambda: all(_joined(h) for h in first), timeout=20)
    send = rig["sender"](src, recv.address, "--workers", "4", "--limit-rate", "6M")
    dest: Path = rig["root"] / "dest"
    assert wait_for(lambda: "receiving big" in recv.stderr, timeout=20), recv.stderr
    time.sleep(1.0)
    assert send.proc.poll() is None, send.stderr  # still in its data phase
    late = rig["helper"]("--once")
    assert wait_for(lambda: _joined(late), timeout=20), late.stderr
    assert send.wait(timeout=80) == 0, send.stderr + recv.stderr
    assert recv.wait(timeout=20) == 0, recv.stderr
    assert sha256_file(dest / "big") == digest
    # The late helper landed blocks of this very transfer (--once: it then exits 0).
    assert late.wait(timeout=20) == 0, late.stderr
    assert _landed(late) and _landed(late)[0] > 0, late.stderr
    joined = _reroutes(recv.stderr, "helper joined")
    assert joined and _data_port(late) in joined[0], recv.stderr
    result = send.json()
    assert result["streams_moved"] > 0, result
    assert "Traceback" not in recv.stderr + send.stderr + late.stderr


def test_dead_helpers_streams_go_to_the_survivors_too(rig: dict[str, Any]) -> None:  # noqa: F811
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 64 * MIB)
    recv = rig["receiver"]("--cluster-workers", "2")
    victim, survivor = rig["helper"](), rig["helper"]()
    assert wait_for(lambda: _joined(victim) and _joined(survivor), timeout=20)
    send = rig["sender"](src, recv.address, "--workers", "6", "--limit-rate", "8M")
    assert wait_for(lambda: "receiving big" in recv.stderr, timeout=20), recv.stderr
    time.sleep(1.5)
    assert send.proc.poll() is None, send.stderr
    victim.kill_group()  # SIGKILL: the helper and its workers
    assert send.wait(timeout=90) == 0, send.stderr + recv.stderr
    assert recv.wait(timeout=20) == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    # The victim's stream ids were dealt over the survivor and the receiver (weighted 1:1).
    left = _reroutes(recv.stderr, "helper left")
    assert left, recv.stderr
    assert left[0].get(_data_port(survivor), 0) > 0, recv.stderr
    assert left[0].get("receiver", 0) > 0, recv.stderr
    assert wait_for(lambda: bool(_landed(survivor)), timeout=10), survivor.stderr
    assert "Traceback" not in recv.stderr + send.stderr


# ------------------------------------------------------------ a hostile receiver's ROUTES


def _hostile_routes_receiver(
    psk: bytes, routes: list[bytes] | None, *, after: float = 0.5, joins: list[int] | None = None
) -> tuple[socket.socket, threading.Thread]:
    """A receiver holding the key: it admits the transfer (nothing held), takes the data
    streams (reads and drops them; ``joins`` counts them), and in the data phase sends each
    of ``routes`` (raw ROUTES payloads, sealed; None: the ones ``flip`` makes) ``after``
    seconds apart."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    conns: list[socket.socket] = []
    if routes is None:
        routes = flip(f"127.0.0.1:{lsock.getsockname()[1]}")

    def drain(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1 << 16):
                pass

    def control(fs: FramedSocket, first: tuple[FrameType, bytes]) -> None:
        hs = ServerHandshake(keyring=keyring_for([psk]), now_ms=int(time.time() * 1000))
        frames = hs.receive(*first, now_ms=int(time.time() * 1000))
        while True:
            for f in frames:
                fs.send(f)
            if hs.established:
                break
            ftype, payload = fs.recv_frame(cap=handshake_cap)
            frames = hs.receive(ftype, payload, now_ms=int(time.time() * 1000))
        assert hs.session is not None
        channel = ControlChannel(session=hs.session, client=False)
        ftype, payload = fs.recv_frame(cap=lambda t: 1 << 20)
        header = Header.decode(channel.open(ftype, payload))
        builder = Builder(header, Limits())
        while not builder.done:
            ftype, payload = fs.recv_frame(cap=lambda t: 1 << 20)
            builder.feed(channel.open(ftype, payload))
        empty = bitmap(bytes(Transfer(header, builder.manifest()).total_blocks))
        fs.send(channel.seal(FrameType.METADATA_ACK, MetadataAck(have=empty).encode()))
        for body in routes:
            time.sleep(after)
            fs.send(channel.seal(FrameType.ROUTES, body))
        drain(fs.sock)

    def serve(conn: socket.socket) -> None:
        fs = FramedSocket(conn, peer="sender")
        with contextlib.suppress(StxError, OSError):
            ftype, payload = fs.recv_frame(cap=lambda t: 1 << 20)
            if ftype is FrameType.INIT:
                control(fs, (ftype, payload))
            else:
                if joins is not None:
                    joins.append(1)
                drain(conn)  # a data stream (JOIN): taken, never acknowledged

    def accept() -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(20)
            conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return lsock, thread


@pytest.mark.parametrize(
    "body, why",
    [
        (msgpack.packb([["no-port-here"], b"\x01"]), "not host:port"),
        (msgpack.packb([["a b:1"], b"\x01"]), "not host:port"),
        (msgpack.packb([["h:1"], bytes(MAX_STREAMS + 1)]), "route table"),
        (msgpack.packb([["h:1"], b"\x00\x02"]), "routed to no place"),
        (b"\x93garbage", "Routes"),
    ],
    ids=["no-port", "space", "table-too-long", "no-such-place", "garbage"],
)
def test_hostile_routes_in_the_data_phase_are_refused(
    scratch: Path, body: bytes, why: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A receiver holding the key sends a malformed ROUTES while the data streams run: the
    sender checks it as before (no stream moves on it) and fails with a ProtocolError."""
    key = register_key(os.urandom(32))
    src = scratch / "f"
    write_random(src, 4 * MIB)
    lsock, thread = _hostile_routes_receiver(key, [body])
    try:
        opts = stxpar.SendOptions(workers=2, block_size=64 << 10, max_retries=0, stall_timeout=10.0)
        with pytest.raises(ProtocolError, match=why) as info:
            stxpar.send(src, "127.0.0.1", lsock.getsockname()[1], psk=key, options=opts)
    finally:
        lsock.close()
        thread.join(timeout=5)
    out, err = capfd.readouterr()
    assert_no_secrets(out, err, str(info.value))
    assert "Traceback" not in out + err


def flip(place: str, times: int = 40) -> list[bytes]:
    """ROUTES that send every stream to the receiver, then all of them to ``place`` (the
    same listening port under another name), and so on: each one moves every open stream."""
    table = [b"\x00" * 64, b"\x01" * 64]
    return [msgpack.packb([[place], table[i % 2]]) for i in range(1, times + 1)]


def test_routes_that_keep_changing_move_streams_a_bounded_number_of_times(
    scratch: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A receiver holding the key sends ROUTES that move every stream, again and again: the
    sender moves at most ``MOVES_PER_WORKER`` per worker and ``MOVES_EXTRA`` streams in the
    session (each a new process and connection), then only new streams follow the routes."""
    from stxpar.sender import MOVES_EXTRA, MOVES_PER_WORKER

    key = register_key(os.urandom(32))
    src = scratch / "f"
    write_random(src, 4 * MIB)
    joins: list[int] = []
    lsock, thread = _hostile_routes_receiver(key, None, after=0.1, joins=joins)
    try:
        opts = stxpar.SendOptions(workers=2, block_size=64 << 10, max_retries=0, stall_timeout=6.0)
        with pytest.raises(ConnectError, match="stalled"):
            stxpar.send(src, "127.0.0.1", lsock.getsockname()[1], psk=key, options=opts)
    finally:
        lsock.close()
        thread.join(timeout=5)
    assert MOVES_PER_WORKER * 2 + MOVES_EXTRA == 8
    assert 2 + 2 <= len(joins) <= 2 + 8, len(joins)  # some moves, never all 80
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_late_helper_that_cannot_see_the_destination_takes_nothing(
    rig: dict[str, Any],  # noqa: F811
) -> None:
    """A helper joins mid-transfer but its host does not see the destination (here: a mount
    namespace with an empty tmpfs over it): it refuses the offer, the routes do not change
    (no stream moves to it), and the transfer completes without it."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a mount namespace")
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 48 * MIB)
    recv = rig["receiver"]()
    send = rig["sender"](src, recv.address, "--workers", "3", "--limit-rate", "6M")
    dest: Path = rig["root"] / "dest"
    assert wait_for(lambda: "receiving big" in recv.stderr, timeout=20), recv.stderr
    err_path = rig["root"] / "logs" / "blind-helper.err"
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs stx-hidden "$STX_HIDE" && exec "$@"',
        "sh",
        str(Path(sys.executable).with_name("stx")),
        "worker",
        "--join",
        rig["cluster"],
        "--psk-file",
        str(rig["key"]),
        "--workers",
        "1",
        "--data-listen",
        "127.0.0.1:0",
    ]
    env = {k: v for k, v in os.environ.items() if k != "STX_PSK_FILE"}
    env["STX_HIDE"] = str(dest)
    with open(err_path, "wb") as err:
        blind = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, start_new_session=True
        )
    try:
        assert wait_for(lambda: "refused a transfer" in err_path.read_text(), timeout=20), (
            err_path.read_text() + recv.stderr
        )
        assert send.wait(timeout=80) == 0, send.stderr + recv.stderr
        assert recv.wait(timeout=20) == 0, recv.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(blind.pid, signal.SIGKILL)
        blind.wait(timeout=10)
    assert sha256_file(dest / "big") == digest
    assert "put aside: for this session: the destination is not visible" in recv.stderr, recv.stderr
    assert send.json()["streams_moved"] == 0
