"""How many TCP streams carry a transfer, seen from outside the product (a TCP relay in front of
the receiver's one port), and transfers through such a relay."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from itest_support import (
    BLOCK,
    CliReceiver,
    assert_dest_exactly,
    expected_digest,
    run_stx,
    sha256_file,
    wait_for,
    write_random,
)
from tcp_relay import UP, Direction, RelayConnection, TcpRelay

import stxpar


class BarrierRelay(TcpRelay):
    """Holds the client->receiver bytes of every connection after the first (the control
    connection) until ``expect`` connections in all were accepted, or ``hold_s`` passed.

    On loopback a whole test file fits in the first stream's socket buffers before the other
    worker processes have even started; holding the data streams a moment makes the share of
    the work every stream gets independent of process start-up times."""

    def __init__(self, target: tuple[str, int], *, expect: int, hold_s: float = 8.0) -> None:
        super().__init__(target)
        self.expect = expect
        self.hold_s = hold_s
        self.released = threading.Event()

    def transform(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        if direction == UP and conn.id > 0 and not self.released.is_set():
            self.wait_accepted(self.expect, timeout=self.hold_s)
            self.released.set()
        return data


@pytest.fixture
def receiver(scratch: Path, psk: bytes) -> Iterator[stxpar.Receiver]:
    dest = scratch / "dst"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=psk, host="127.0.0.1", port=0, workers=2) as r:
        yield r


@pytest.mark.timeout(60)
def test_four_workers_use_four_tcp_streams_through_one_port(
    receiver: stxpar.Receiver, scratch: Path, psk: bytes
) -> None:
    # more than the first three streams can park in their socket buffers while the fourth
    # worker starts (on loopback up to ~8 MiB of SO_SNDBUF each, plus the relay's window)
    size = 64 << 20
    src = scratch / "four.bin"
    want = write_random(src, size)

    with BarrierRelay(receiver.address, expect=5) as relay:
        result = stxpar.send(src, *relay.address, psk=psk, workers=4, block_size=BLOCK)
        assert relay.wait_idle(timeout=10)
        conns = relay.snapshot()

    dest = Path(receiver.dest)
    assert sha256_file(dest / src.name) == want
    assert_dest_exactly(dest, {src.name})
    assert result.workers == 4
    assert result.digest == expected_digest(src, BLOCK)

    # seen from outside: one control connection and four data streams, all on the relay's port
    assert len(conns) == 5, [c.bytes_up for c in conns]
    control, data = conns[0], conns[1:]
    assert control.bytes_up < 4096, "the control connection carried file data"
    assert sum(c.bytes_up for c in data) >= size
    for c in data:
        assert c.bytes_up >= BLOCK, f"data stream {c.id} carried no block: {c.bytes_up} bytes"
        assert c.bytes_down > 0, f"data stream {c.id} got no acknowledgement"

    # and the receiver counted four authenticated streams
    assert wait_for(lambda: len(receiver.completed) == 1)
    assert receiver.completed[0].streams == 4
    assert receiver.dropped_streams == 0


@pytest.mark.timeout(60)
def test_cli_transfer_through_a_relay(
    cli_receiver: Callable[..., CliReceiver],
    keyfile: tuple[Path, bytes],
    scratch: Path,
) -> None:
    """Every stream connects to the HOST:PORT the sender was given (here the relay's), never
    to an address the receiver reports; so a port forward in front of the receiver works."""
    path, _ = keyfile
    dest = scratch / "dst"
    dest.mkdir()
    size = 3 * (1 << 20) + 17
    src = scratch / "relayed.bin"
    want = write_random(src, size)
    receiver = cli_receiver(path, dest, workers=2, once=True)

    with BarrierRelay((receiver.host, receiver.port), expect=3) as relay:
        run = run_stx(
            "send",
            src,
            f"127.0.0.1:{relay.port}",
            "--psk-file",
            path,
            "--workers",
            "2",
            "--block-size",
            "64K",
            "--json",
        )
        relay.wait_idle(timeout=10)
        conns = relay.snapshot()

    assert run.rc == 0, run.stderr
    assert run.json()["bytes"] == size
    assert receiver.wait(timeout=20) == 0
    assert sha256_file(dest / src.name) == want
    assert_dest_exactly(dest, {src.name})
    assert len(conns) == 3
    assert sum(c.bytes_up for c in conns[1:]) >= size


@pytest.mark.timeout(60)
def test_more_workers_than_needed_do_not_stall_the_sender(
    receiver: stxpar.Receiver, scratch: Path, psk: bytes
) -> None:
    # 16 worker processes take a while to start on a small machine; a 1 MiB file is
    # acknowledged long before the last of them says hello.
    src = scratch / "small.bin"
    want = write_random(src, 1 << 20)
    started = time.monotonic()
    result = stxpar.send(src, *receiver.address, psk=psk, workers=16, block_size=BLOCK)
    elapsed = time.monotonic() - started

    assert sha256_file(Path(receiver.dest) / src.name) == want
    assert result.bytes == 1 << 20
    leftovers = [
        p
        for p in psutil.Process().children(recursive=True)
        if "workers.sender" in " ".join(_cmd(p))
    ]
    assert not leftovers, "sender workers outlived send()"
    assert elapsed < 5.0, f"a 1 MiB loopback transfer took {elapsed:.1f} s"


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []
