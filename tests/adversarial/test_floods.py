"""Keyless floods against a live ``stx recv`` with its default limits, while three honest
``stx send`` processes with default options send a file each: they must all succeed, soon.

The attacker holds no key. Two floods (issue 11): thousands of idle connections from a hundred
addresses (reconnected as soon as the receiver drops one), and hundreds of INITs a second from
one address. The receiver must also keep its log short (a few lines a second and a count of
what it held back) and its memory small.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from attacker import Arena, Peer, client_handshake
from itest_support import (
    STX,
    CliReceiver,
    cli_receiver_rig,
    sha256_file,
    wait_for,
    write_random,
)

from stxpar.errors import ConnectError
from stxpar.wire import FrameType, Init, encode_frame

#: how long the honest senders may take, all three together, while the flood goes on (the
#: issue's target; they take about a second here)
HONEST_WITHIN = 15.0
SENDERS = 3
INIT = encode_frame(FrameType.INIT, Init().encode())


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
        pytest.skip(f"cannot raise RLIMIT_NOFILE to {want} for the attacker")


class Flood:
    """The attacker: a selector loop in a thread. ``slots`` source addresses, one connection
    each at a time, made again as soon as the last one is closed. Without ``init`` it never
    says a word and waits for the receiver to close it; with ``init`` it sends INIT and hangs
    up at once, at most ``rate`` new connections a second (each INIT costs the receiver a
    handshake start, and the hang-up frees the connection slot for the next one)."""

    def __init__(
        self, addr: tuple[str, int], slots: list[str], *, init: bool, rate: float = 0.0
    ) -> None:
        self.addr = addr
        self.slots = slots
        self.init = init
        self.rate = rate
        self.connects = 0
        self.inits = 0
        self.closed_by_receiver = 0
        self.max_open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the flood did not stop"

    def _connect(self, sel: selectors.BaseSelector, src: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((src, 0))
            s.connect_ex(self.addr)
        except OSError:
            s.close()
            return
        self.connects += 1
        sel.register(s, selectors.EVENT_WRITE if self.init else selectors.EVENT_READ, src)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        waiting = list(self.slots)  # sources whose connection is to be made (again)
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.rate:
                    allowed = int((time.monotonic() - started) * self.rate) - self.connects
                    for _ in range(max(0, min(allowed, len(waiting)))):
                        self._connect(sel, waiting.pop())
                else:
                    while waiting:
                        self._connect(sel, waiting.pop())
                self.max_open = max(self.max_open, len(sel.get_map()))
                for key, events in sel.select(0.002):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    if events & selectors.EVENT_WRITE:
                        try:
                            s.send(INIT)
                            self.inits += 1
                        except OSError:
                            pass
                    else:
                        try:
                            if s.recv(4096):
                                continue  # a SERVER_HELLO or an ERROR: read on until closed
                        except BlockingIOError:
                            continue
                        except OSError:
                            pass
                        self.closed_by_receiver += 1
                    sel.unregister(s)
                    s.close()
                    waiting.append(key.data)
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


@pytest.fixture
def rig() -> Iterator[tuple[CliReceiver, Path, Path]]:
    with cli_receiver_rig("stx-flood-") as r:
        yield r


def _honest_senders(recv: CliReceiver, key: Path, root: Path) -> float:
    """Three ``stx send`` with default options at once; all must succeed. Seconds taken."""
    files = []
    for i in range(SENDERS):
        src = root / "src" / f"honest-{i}.bin"
        files.append((src, write_random(src, 300_000 + i)))
    env = dict(os.environ)
    env.pop("STX_PSK_FILE", None)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [str(STX), "send", str(src), recv.address, "--psk-file", str(key), "--quiet"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for src, _ in files
    ]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=HONEST_WITHIN + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results.append((p.returncode, err.strip()))
    took = time.monotonic() - started
    print(f"honest senders done in {took:.1f} s", file=sys.stderr)
    assert [rc for rc, _ in results] == [0] * SENDERS, results
    for src, digest in files:
        assert sha256_file(recv.dest / src.name) == digest
    return took


def _log_lines(recv: CliReceiver) -> tuple[int, list[str]]:
    lines = recv.stderr.splitlines()
    refused = [ln for ln in lines if ln.startswith(("rejected ", "dropped "))]
    summaries = [ln for ln in lines if "suppressed" in ln]
    return len(refused), summaries


def _rss(recv: CliReceiver) -> int:
    assert recv.proc is not None
    return int(psutil.Process(recv.proc.pid).memory_info().rss)


@pytest.mark.timeout(120)
def test_idle_flood_from_a_hundred_addresses(rig: tuple[CliReceiver, Path, Path]) -> None:
    """3000 idle connections from 100 addresses, each reconnected at once when dropped."""
    recv, key, root = rig
    _raise_nofile(3000 + 512)
    rss_before = _rss(recv)
    sources = [f"127.0.{1 + i // 250}.{2 + i % 250}" for i in range(100)]
    slots = [src for src in sources for _ in range(30)]
    flood_started = time.monotonic()
    with Flood((recv.host, recv.port), slots, init=False) as flood:
        time.sleep(2.0)  # let it reach full strength first
        assert flood.max_open >= 2000, f"the attacker held only {flood.max_open} connections"
        took = _honest_senders(recv, key, root)
        rss_during = _rss(recv)
        seconds = time.monotonic() - flood_started
    assert flood.closed_by_receiver > 0  # the receiver evicted (the attacker reconnected)
    assert took <= HONEST_WITHIN, f"the honest senders took {took:.1f} s"
    assert rss_during - rss_before < 64 << 20, f"RSS grew by {(rss_during - rss_before) >> 20} MiB"
    refused, summaries = _log_lines(recv)
    # a few lines a second (bursts of 10), the rest counted in summary lines
    assert refused <= 10 + 6 * seconds, f"{refused} log lines in {seconds:.0f} s"
    assert summaries, "no summary of the suppressed log lines"
    assert recv.proc is not None and recv.proc.poll() is None


@pytest.mark.timeout(120)
def test_init_flood_from_one_address(rig: tuple[CliReceiver, Path, Path]) -> None:
    """800 new connections a second from one address, each sending INIT and hanging up."""
    recv, key, root = rig
    _raise_nofile(4096)
    slots = ["127.0.0.2"] * 200
    flood_started = time.monotonic()
    with Flood((recv.host, recv.port), slots, init=True, rate=800) as flood:
        time.sleep(2.0)
        took = _honest_senders(recv, key, root)
        seconds = time.monotonic() - flood_started
    rate = flood.inits / seconds
    print(f"INIT flood: {flood.inits} INITs in {seconds:.1f} s ({rate:.0f}/s)", file=sys.stderr)
    assert flood.inits >= 1000, f"the attacker sent only {flood.inits} INITs"
    assert took <= HONEST_WITHIN, f"the honest senders took {took:.1f} s"
    refused, summaries = _log_lines(recv)
    assert refused <= 10 + 6 * seconds, f"{refused} log lines in {seconds:.0f} s"
    assert summaries, "no summary of the suppressed log lines"


# ---------------------------------------------------------------- the rules, one at a time


@pytest.mark.timeout(60)
def test_the_idle_connection_is_evicted_not_the_one_that_speaks(
    make_arena: Callable[..., Arena],
) -> None:
    """The pending cap is full: a newcomer evicts the oldest connection that has not sent a
    whole frame, not an older one in the middle of its handshake (an honest sender speaks at
    once, an idle attacker never does)."""
    arena = make_arena(handshake_timeout=5.0, max_pending=4, max_pending_per_ip=4)
    talking = Peer(arena.addr, source_ip="127.0.0.2")
    talking.send_frame(FrameType.INIT, Init().encode())
    assert talking.recv_frame() is not None  # SERVER_HELLO: it is in its handshake
    idle = [Peer(arena.addr, source_ip=f"127.0.0.{3 + i}") for i in range(3)]
    time.sleep(0.2)
    newcomer = Peer(arena.addr, source_ip="127.0.0.9")
    assert wait_for(lambda: idle[0].closed_by_peer(), 2.0, 0.02), "the oldest idle one stays"
    assert not talking.closed_by_peer(wait=0.3)
    assert not any(p.closed_by_peer() for p in idle[1:])
    assert not newcomer.closed_by_peer()
    dropped = arena.kinds("dropped")
    assert [d["peer"] for d in dropped] == ["127.0.0.3"], dropped
    for p in (talking, newcomer, *idle):
        p.close()
    arena.unharmed()


@pytest.mark.timeout(60)
def test_authenticated_sessions_are_capped_with_a_retryable_busy(
    make_arena: Callable[..., Arena],
) -> None:
    """One control session at most: a second key holder is told "receiver busy" (code 4, the
    sender retries) in place of KEY_CONFIRMATION, and gets in once the first is gone."""
    arena = make_arena(handshake_timeout=5.0, max_sessions=1)
    first = Peer(arena.addr)
    assert client_handshake(first, arena.psk).established
    second = Peer(arena.addr)
    with pytest.raises(ConnectError, match="receiver busy: too many transfers at once"):
        client_handshake(second, arena.psk)
    second.close()
    first.close()
    arena.settle()
    arena.unharmed()
