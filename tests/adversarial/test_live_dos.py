"""Denial of service before authentication, against live receivers: idle, half-open and
trickling connections, handshake floods, random garbage, and the work and memory an attacker
without the key can make the receiver spend.

Every attacker here holds **no key**, except where a test says otherwise (to show that even
the key does not help). Receivers get ``handshake_timeout=1.0`` and small caps so that the
bounds show up within a second or two; a legitimate sender must get through afterwards (and,
where the bound is per address, during the attack).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from attacker import (
    Arena,
    Peer,
    client_handshake,
    expect_refused,
    now_ms,
    raw_frame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from itest_support import CliReceiver, make_keyfile, wait_for

import stxpar
import stxpar.handshake
import stxpar.partials
import stxpar.receiver
from stxpar.handshake import ReplayCache
from stxpar.wire import ClientHello, FrameType, Init, KeyShare, MacOnly, encode_frame

T = FrameType
HS_TIMEOUT = 1.0
#: how late a cut may come on a loaded machine
SLACK = 1.5
BUSY = "receiver busy: too many handshakes; try again shortly"


def _connect_many(arena: Arena, n: int, ip: str) -> list[Peer]:
    return [Peer(arena.addr, source_ip=ip) for _ in range(n)]


def _closed_now(peers: list[Peer]) -> list[Peer]:
    return [p for p in peers if p.closed_by_peer()]


class _Background:
    """Run ``fn`` in a thread (a legitimate sender during an attack); ``join`` re-raises."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # handed to join()
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the legitimate sender hung"
        if self._error is not None:
            raise self._error


def _wait_all_closed(peers: list[Peer], started: float) -> float:
    """Wait until the receiver has closed every one of ``peers``; seconds since ``started``."""
    assert wait_for(lambda: all(p.closed_by_peer() for p in peers), HS_TIMEOUT + 5, 0.05)
    return time.monotonic() - started


# ---------------------------------------------------------------- idle and half-open


@pytest.mark.timeout(60)
def test_idle_connections_are_capped_per_address_and_cut(
    make_arena: Callable[..., Arena],
) -> None:
    arena = make_arena(handshake_timeout=HS_TIMEOUT, max_pending=8, max_pending_per_ip=4)
    started = time.monotonic()
    idle = _connect_many(arena, 10, "127.0.0.2")
    # Beyond 4 from one address: closed at once, long before any timeout.
    assert wait_for(lambda: len(_closed_now(idle)) >= 6, HS_TIMEOUT / 2, 0.02)
    assert len(_closed_now(idle)) == 6
    # Another address (the legitimate sender's) is not held up meanwhile.
    legit = _Background(arena.still_serving)
    took = _wait_all_closed(idle, started)
    legit.join()
    assert HS_TIMEOUT - 0.2 <= took <= HS_TIMEOUT + SLACK
    assert not any(p.errors for p in idle)  # an idle connection gets no ERROR, just a close
    arena.unharmed()


@pytest.mark.timeout(60)
def test_idle_connections_from_many_addresses_hit_the_global_cap(
    make_arena: Callable[..., Arena],
) -> None:
    arena = make_arena(handshake_timeout=HS_TIMEOUT, max_pending=8, max_pending_per_ip=4)
    started = time.monotonic()
    idle = [p for ip in range(2, 6) for p in _connect_many(arena, 4, f"127.0.0.{ip}")]
    assert wait_for(lambda: len(_closed_now(idle)) >= 8, HS_TIMEOUT / 2, 0.02)
    assert len(_closed_now(idle)) == 8  # 16 tried, 8 held
    with Peer(arena.addr, source_ip="127.0.0.6") as fresh:  # a fresh address gets in...
        assert not fresh.closed_by_peer(wait=HS_TIMEOUT / 4)
        assert len(_closed_now(idle)) == 9  # ...and the oldest idle connection makes room
    # A legitimate sender retries (connection closed = retryable) and gets in once the idle
    # connections are cut.
    legit = _Background(lambda: arena.still_serving(options=stxpar.SendOptions(max_retries=12)))
    took = _wait_all_closed(idle, started)
    assert took <= HS_TIMEOUT + SLACK
    legit.join()
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("after_init", ["silence", "half-close"])
def test_half_open_connections(make_arena: Callable[..., Arena], after_init: str) -> None:
    """INIT, then the client never speaks again (its side vanished, or it only half-closed):
    cut at the handshake deadline, or at once on the half-close; the per-address cap holds."""
    arena = make_arena(handshake_timeout=HS_TIMEOUT, max_pending=8, max_pending_per_ip=4)
    started = time.monotonic()
    peers = _connect_many(arena, 6, "127.0.0.2")
    assert wait_for(lambda: len(_closed_now(peers)) >= 2, HS_TIMEOUT / 2, 0.02)
    refused = _closed_now(peers)
    assert len(refused) == 2  # beyond the per-address cap: closed at once
    for p in peers:
        if p not in refused:
            p.send_frame(T.INIT, Init().encode())
            if after_init == "half-close":
                p.sock.shutdown(socket.SHUT_WR)
    took = _wait_all_closed(peers, started)
    for p in peers:
        p.drain(timeout=1)  # parse what arrived before the close
    greeted = [p for p in peers if any(t is T.SERVER_HELLO for t, _ in p.received)]
    assert len(greeted) == 4
    for p in greeted:
        assert [e.code for e in p.errors] == [4]  # "connection ... lost: ..."
    if after_init == "half-close":
        assert took < HS_TIMEOUT
    else:
        assert HS_TIMEOUT - 0.2 <= took <= HS_TIMEOUT + SLACK
    arena.unharmed()


def _trickle(
    addr: tuple[str, int], data: bytes, interval: float, out: dict[str, float], *, init: bool
) -> None:
    """Send ``data`` one byte every ``interval`` s until the receiver closes; record when."""
    started = time.monotonic()
    with Peer(addr, source_ip="127.0.0.3") as p:
        if init:
            p.send_frame(T.INIT, Init().encode())
        sent = 0
        for byte in data:
            try:
                p.send_bytes(bytes([byte]))
            except OSError:
                break
            sent += 1
            if p.closed_by_peer(wait=interval):
                break
        else:
            assert p.closed_by_peer(wait=HS_TIMEOUT + SLACK)
        out["closed_after"] = time.monotonic() - started
        out["bytes"] = sent


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("what", "interval"),
    [("INIT", 1.0), ("INIT", 0.3), ("CLIENT_HELLO after INIT", 0.3)],
    ids=["init-1s", "init-0.3s", "hello-0.3s"],
)
def test_trickler_is_cut_at_the_deadline(
    make_arena: Callable[..., Arena], what: str, interval: float
) -> None:
    """One byte at a time, each well within a per-read timeout: the deadline is for the whole
    pre-authentication phase, so the trickler is cut once it has passed. A legitimate sender
    gets through meanwhile."""
    arena = make_arena(handshake_timeout=HS_TIMEOUT)
    after_init = what != "INIT"
    frame = (
        encode_frame(T.CLIENT_HELLO, ClientHello(os.urandom(8), os.urandom(32), now_ms()).encode())
        if after_init
        else encode_frame(T.INIT, Init().encode())
    )
    results: list[dict[str, float]] = [{} for _ in range(3)]
    threads = [
        threading.Thread(
            target=_trickle, args=(arena.addr, frame, interval, r), kwargs={"init": after_init}
        )
        for r in results
    ]
    for t in threads:
        t.start()
    arena.still_serving()
    for t in threads:
        t.join(timeout=HS_TIMEOUT + 10)
    for r in results:
        assert r["closed_after"] <= HS_TIMEOUT + SLACK, r
        assert r["bytes"] < len(frame), r
    arena.unharmed()


# ---------------------------------------------------------------- handshake rate limit


@pytest.mark.timeout(60)
def test_handshake_flood_gets_busy_and_a_retrying_sender_gets_through(
    make_arena: Callable[..., Arena],
) -> None:
    """A flood of INITs from many addresses: beyond the token bucket, each gets the 'busy'
    ERROR (wire code 4, retryable) at once. A legitimate sender arriving in the middle of it
    is told the same, reconnects with backoff, and gets through."""
    arena = make_arena(handshake_timeout=HS_TIMEOUT, max_handshakes_per_s=1.0)  # burst 2
    flood = [Peer(arena.addr, source_ip=f"127.0.0.{10 + i}") for i in range(12)]
    for p in flood:
        p.send_frame(T.INIT, Init().encode())
    reasons: list[str] = []
    arena.still_serving(
        options=stxpar.SendOptions(max_retries=12),
        on_event=lambda kind, f: reasons.append(str(f.get("reason", ""))),
    )
    assert reasons, "the sender was never refused: the flood did not use up the bucket"
    assert all(r == f"receiver: {BUSY}" for r in reasons), reasons
    greeted = 0
    for p in flood:
        frames = p.drain(timeout=HS_TIMEOUT + 5)
        if frames and frames[0][0] is T.SERVER_HELLO:
            greeted += 1
            assert [e.code for e in p.errors] == [4]  # then cut at the deadline
        else:
            assert [(e.code, e.message) for e in p.errors] == [(4, BUSY)]
        p.close()
    assert 2 <= greeted <= 3  # the burst, plus at most one refill
    arena.unharmed()


# ---------------------------------------------------------------- work and memory


@pytest.fixture
def receiver_work(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count the receiver's X25519 operations and its first disk steps of an admission (calls
    from the test's own thread, the attacker's client, are not counted)."""
    counts = {"x25519": 0, "ephemeral": 0, "state": 0, "partial": 0}

    def counting(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*a: object, **kw: object) -> object:
            if threading.current_thread() is not threading.main_thread():
                counts[name] += 1
            return fn(*a, **kw)

        return wrapper

    monkeypatch.setattr(
        stxpar.handshake, "x25519_shared", counting("x25519", stxpar.handshake.x25519_shared)
    )
    monkeypatch.setattr(
        stxpar.handshake, "_private_key", counting("ephemeral", stxpar.handshake._private_key)
    )
    monkeypatch.setattr(stxpar.partials, "load", counting("state", stxpar.partials.load))
    monkeypatch.setattr(
        stxpar.partials,
        "create_partial",
        counting("partial", stxpar.partials.create_partial),
    )
    yield counts


@pytest.mark.timeout(60)
def test_no_x25519_disk_or_replay_state_before_the_psk_mac(
    make_arena: Callable[..., Arena], receiver_work: dict[str, int]
) -> None:
    arena = make_arena(handshake_timeout=HS_TIMEOUT)
    zero = dict(receiver_work)
    # Without the key: a wrong PSK, a made-up CLIENT_AUTH, garbage, a made-up key share.
    for _ in range(5):
        with Peer(arena.addr) as p:
            with pytest.raises(stxpar.AuthError):
                client_handshake(p, os.urandom(32))
    with Peer(arena.addr) as p:
        p.send_frame(T.INIT, Init().encode())
        p.send_frame(T.CLIENT_HELLO, ClientHello(os.urandom(8), os.urandom(32), now_ms()).encode())
        p.send_frame(T.CLIENT_AUTH, MacOnly(os.urandom(32)).encode())
        p.send_frame(T.KEY_NEGOTIATION, KeyShare(os.urandom(32), os.urandom(32)).encode())
        expect_refused(p, 3, "authentication failed")
    assert receiver_work == zero
    assert (
        arena.receiver.snapshot().replay_entries == 0
    )  # only a verified CLIENT_AUTH may enter the replay cache
    # With the key up to SERVER_AUTH, then a key share whose MAC is wrong: still no X25519.
    with Peer(arena.addr) as p:
        client_handshake(p, arena.psk, until=T.SERVER_AUTH)
        p.send_frame(T.KEY_NEGOTIATION, KeyShare(os.urandom(32), os.urandom(32)).encode())
        expect_refused(p, 3, "authentication failed")
    assert receiver_work == zero
    assert arena.receiver.snapshot().replay_entries == 1
    # Control: an honest handshake does the work, and only then.
    with Peer(arena.addr) as p:
        assert client_handshake(p, arena.psk).established
    assert wait_for(lambda: receiver_work["x25519"] == 1 and receiver_work["ephemeral"] == 1)
    assert receiver_work["state"] == receiver_work["partial"] == 0
    arena.unharmed()
    assert receiver_work["partial"] == 1


@pytest.mark.timeout(30)
def test_replay_cache_is_bounded() -> None:
    cache = ReplayCache(max_entries=64, ttl_ms=10**9)
    now = now_ms()
    for i in range(1000):
        cache.check_and_add(i.to_bytes(32, "big"), now_ms=now)
        assert len(cache) <= 64
    # entries expire: after the ttl nothing stays
    cache = ReplayCache(max_entries=64, ttl_ms=1000)
    for i in range(10):
        cache.check_and_add(i.to_bytes(32, "big"), now_ms=now)
    cache.check_and_add(b"x" * 32, now_ms=now + 2000)
    assert len(cache) == 1


# ---------------------------------------------------------------- garbage on the port


@pytest.fixture(scope="module")
def cli_receiver() -> Iterator[tuple[CliReceiver, bytes, Path]]:
    """``stx recv`` in its own process, so that its memory can be measured."""
    import shutil
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix="stx-adv-cli-", dir=base))
    (root / "dest").mkdir()
    (root / "logs").mkdir()
    key = make_keyfile(root / "stx.key")
    recv = CliReceiver(root / "stx.key", root / "dest", root / "logs", workers=1, once=False)
    try:
        recv.start()
        yield recv, key, root
    finally:
        recv.stop()
        shutil.rmtree(root, ignore_errors=True)


_TYPES = [int(t) for t in T] + [0x13, 0x7F, 0xFF]
_frames = st.builds(
    lambda t, n, body: raw_frame(t, body, length=n),
    st.sampled_from(_TYPES),
    st.one_of(
        st.sampled_from([0, 1, 6, 511, 512, 513, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
    ),
    st.binary(max_size=520),
)
_after_init = st.binary(max_size=300).map(lambda b: encode_frame(T.INIT, Init().encode()) + b)
GARBAGE = st.one_of(
    st.binary(min_size=1, max_size=600),
    _frames,
    _after_init,
    st.lists(_frames, max_size=4).map(b"".join),
)


@pytest.mark.timeout(120)
def test_random_garbage_on_the_port(cli_receiver: tuple[CliReceiver, bytes, Path]) -> None:
    """Random bytes, random frames and a valid INIT followed by random bytes: each connection
    ends with at most an ERROR, never anything the attacker could use, and the receiver's
    memory stays flat."""
    recv, key, root = cli_receiver
    assert recv.proc is not None
    addr = (recv.host, recv.port)
    proc = psutil.Process(recv.proc.pid)
    for _ in range(5):  # warm up (lazy imports, first threads) before measuring
        with Peer(addr) as p:
            p.send_bytes(b"\xff" * 5)
            p.drain()
    rss_before = proc.memory_info().rss

    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(junk=GARBAGE)
    def attack(junk: bytes) -> None:
        with Peer(addr) as p:
            try:
                p.send_bytes(junk)
                p.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # refused before everything was written
            frames = p.drain(timeout=5)
            assert p.eof
            for ftype, _ in frames:
                assert ftype in (T.SERVER_HELLO, T.ERROR), ftype
            for err in p.errors:
                assert err.code in (1, 3, 4, 6), err
                assert err.message == "authentication failed" or err.code in (4, 6), err

    attack()
    grown = proc.memory_info().rss - rss_before
    assert grown < 50 << 20, f"receiver RSS grew by {grown >> 20} MiB"
    assert proc.is_running() and recv.proc.poll() is None
    # And it still serves a legitimate sender.
    src = root / "legit.bin"
    data = os.urandom(20000)
    src.write_bytes(data)
    stxpar.send(src, recv.host, recv.port, psk=key, workers=1, block_size=4096)
    assert (root / "dest" / "legit.bin").read_bytes() == data
    assert sorted(os.listdir(root / "dest")) == ["legit.bin"]
