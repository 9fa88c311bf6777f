"""The cluster port's CurveZMQ over real ZeroMQ on 127.0.0.1: who gets in, who learns it was
refused, what a recording of the traffic shows, and what garbage costs the coordinator."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import zmq
from tcp_relay import Direction, RelayConnection, TcpRelay
from zmq.utils import z85

from stxpar import cluster_auth as ca
from stxpar.errors import AuthError, ConnectError, StxError

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
#: A wrong key must be told within this (the helper must never hang).
AUTH_WITHIN_S = 5.0


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@dataclass
class Coordinator:
    router: zmq.Socket
    auth: ca.ZapAuthenticator
    endpoint: str
    keys: ca.ClusterKeys

    def receives(self, timeout_s: float) -> list[bytes] | None:
        return self.router.recv_multipart() if self.router.poll(int(timeout_s * 1000)) else None


def _start_coordinator(
    ctx: zmq.Context, keys: ca.ClusterKeys, *, authenticate: bool = True, **kw: int
) -> Coordinator:
    router = ca.secure_server(ctx.socket(zmq.ROUTER), keys=keys, **kw)
    router.setsockopt(zmq.LINGER, 0)
    auth = ca.ZapAuthenticator(ctx, keys=keys, watch=router)
    if authenticate:
        auth.start()
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return Coordinator(router, auth, f"tcp://127.0.0.1:{port}", keys)


@pytest.fixture
def coordinator_factory(zctx: zmq.Context) -> Iterator[Callable[..., Coordinator]]:
    made: list[Coordinator] = []

    def factory(keys: ca.ClusterKeys, **kw: int) -> Coordinator:
        c = _start_coordinator(zctx, keys, **kw)
        made.append(c)
        return c

    try:
        yield factory
    finally:
        for c in made:
            c.auth.stop()
            c.router.close(linger=0)


@pytest.fixture
def keys(psk: bytes) -> ca.ClusterKeys:
    return ca.derive_cluster_keys(psk=psk)


@pytest.fixture
def coordinator(
    coordinator_factory: Callable[..., Coordinator], keys: ca.ClusterKeys
) -> Coordinator:
    return coordinator_factory(keys)


@pytest.fixture
def dealers(zctx: zmq.Context) -> Iterator[Callable[[ca.ClusterKeys | None], zmq.Socket]]:
    """A factory of DEALERs: CURVE clients with the given keys, or plain with None."""
    made: list[zmq.Socket] = []

    def factory(keys: ca.ClusterKeys | None) -> zmq.Socket:
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            ca.secure_client(sock, keys=keys)
        made.append(sock)
        return sock

    try:
        yield factory
    finally:
        for sock in made:
            sock.close(linger=0)


def _other_keys() -> ca.ClusterKeys:
    return ca.derive_cluster_keys(psk=os.urandom(32))


def _assert_no_secret(text: str, *keysets: ca.ClusterKeys) -> None:
    # Booleans only: a failing assertion must not print the secret either.
    secrets = [s.decode() for k in keysets for s in (k.coordinator_secret, k.helper_secret)]
    leaked = any(secret in text for secret in secrets)
    assert not leaked, "a secret key appears in the message"


def _round_trip(coordinator: Coordinator, dealer: zmq.Socket, payload: bytes) -> None:
    dealer.send(payload)
    got = coordinator.receives(5)
    assert got is not None and got[1] == payload
    coordinator.router.send_multipart([got[0], b"re:" + payload])
    assert dealer.poll(5000)
    assert dealer.recv() == b"re:" + payload


# ---------------------------------------------------------------- who gets in


def test_right_key_round_trip(
    coordinator: Coordinator, dealers: Callable, keys: ca.ClusterKeys
) -> None:
    dealer = dealers(keys)
    ca.wait_handshake(dealer, endpoint=coordinator.endpoint, timeout_s=10)
    _round_trip(coordinator, dealer, b"hello from a helper")
    assert coordinator.router.getsockopt(zmq.CURVE_SERVER) == 1
    assert coordinator.router.getsockopt(zmq.MAXMSGSIZE) == ca.MAX_CLUSTER_MESSAGE
    assert dealer.getsockopt(zmq.MAXMSGSIZE) == ca.MAX_CLUSTER_MESSAGE
    assert coordinator.auth.refusals() == ca.Refusals()


def test_wrong_psk_is_told_quickly_and_gets_nothing_in(
    coordinator: Coordinator, dealers: Callable
) -> None:
    wrong = _other_keys()
    dealer = dealers(wrong)
    started = time.monotonic()
    with pytest.raises(AuthError) as info:
        ca.wait_handshake(dealer, endpoint=coordinator.endpoint, timeout_s=30)
    assert time.monotonic() - started < AUTH_WITHIN_S
    assert "refused this helper's key" in str(info.value)
    assert info.value.exit_code == 3
    _assert_no_secret(str(info.value), wrong, coordinator.keys)
    with contextlib.suppress(zmq.Again):  # never connected: there is no one to send to
        dealer.send(b"let me in", zmq.NOBLOCK)
    assert coordinator.receives(0.5) is None
    # The coordinator could not decrypt its HELLOs: counted as wrong keys (by the monitor),
    # one per connection the helper tried.
    assert coordinator.auth.refusals().wrong_key >= ca.DROPS_FOR_AUTH
    # Closed (what a refused helper does next), it stops knocking.
    dealer.close(linger=0)
    time.sleep(0.3)
    refused = coordinator.auth.refusals().wrong_key
    time.sleep(0.5)
    assert coordinator.auth.refusals().wrong_key == refused


def test_wrong_helper_key_is_refused_by_zap(coordinator: Coordinator, dealers: Callable) -> None:
    """Someone who learnt the coordinator's public key, but not the PSK."""
    wrong = _other_keys()
    mixed = ca.ClusterKeys(
        coordinator_public=coordinator.keys.coordinator_public,
        coordinator_secret=wrong.coordinator_secret,
        helper_public=wrong.helper_public,
        helper_secret=wrong.helper_secret,
    )
    dealer = dealers(mixed)
    started = time.monotonic()
    with pytest.raises(AuthError) as info:
        ca.wait_handshake(dealer, endpoint=coordinator.endpoint, timeout_s=30)
    assert time.monotonic() - started < AUTH_WITHIN_S
    _assert_no_secret(str(info.value), wrong, coordinator.keys)
    assert coordinator.receives(0.5) is None
    assert coordinator.auth.refusals().wrong_key == 1


def test_plain_client_is_refused(coordinator: Coordinator, dealers: Callable) -> None:
    dealer = dealers(None)
    with pytest.raises(ConnectError, match="does not speak CURVE"):
        ca.wait_handshake(dealer, endpoint=coordinator.endpoint, timeout_s=10)
    plain = dealers(None)
    plain.connect(coordinator.endpoint)
    plain.send(b"plaintext hello")
    assert coordinator.receives(1.0) is None
    assert coordinator.auth.refusals().not_curve >= 1


def test_without_its_zap_handler_the_port_admits_no_one(
    coordinator_factory: Callable[..., Coordinator], keys: ca.ClusterKeys, dealers: Callable
) -> None:
    """ZAP_ENFORCE_DOMAIN: libzmq would otherwise let any CURVE client in when no handler runs."""
    bare = coordinator_factory(keys, authenticate=False)
    stranger = _other_keys()
    mixed = ca.ClusterKeys(
        keys.coordinator_public, b"", stranger.helper_public, stranger.helper_secret
    )
    with pytest.raises(StxError):
        ca.wait_handshake(dealers(mixed), endpoint=bare.endpoint, timeout_s=3)
    assert bare.receives(0.5) is None


def test_local_channels_on_the_same_context_are_not_refused(
    zctx: zmq.Context, coordinator: Coordinator
) -> None:
    """The ZAP handler serves the whole context; the coordinator's own NULL sockets (no ZAP
    domain) must not be asked, or refused."""
    pull = zctx.socket(zmq.PULL)
    push = zctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"local")
        assert pull.poll(5000) and pull.recv() == b"local"
        assert coordinator.auth.refusals() == ca.Refusals()
    finally:
        pull.close(linger=0)
        push.close(linger=0)


def test_one_zap_handler_per_context(zctx: zmq.Context, keys: ca.ClusterKeys) -> None:
    with ca.ZapAuthenticator(zctx, keys=keys):
        second = ca.ZapAuthenticator(zctx, keys=keys)
        with pytest.raises(StxError, match="cannot serve ZAP"):
            second.start()
    # Stopped cleanly: the endpoint is free again, and stop() twice is harmless.
    again = ca.ZapAuthenticator(zctx, keys=keys)
    again.start()
    again.stop()
    again.stop()


# ---------------------------------------------------------------- when nothing answers


def test_nothing_listening_is_a_connect_error(dealers: Callable, keys: ca.ClusterKeys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(ConnectError, match="could not reach"):
        ca.wait_handshake(dealers(keys), endpoint=f"tcp://127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - started < 3


def test_silent_peer_is_a_connect_error_not_an_auth_error(
    dealers: Callable, keys: ca.ClusterKeys
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ConnectError, match="no CURVE handshake"):
            ca.wait_handshake(dealers(keys), endpoint=endpoint, timeout_s=1.5)
    finally:
        stop.set()
        t.join(timeout=5)
        listener.close()
        for s in held:
            s.close()


# ---------------------------------------------------------------- limits


def test_oversize_message_drops_only_its_sender(
    coordinator_factory: Callable[..., Coordinator], keys: ca.ClusterKeys, dealers: Callable
) -> None:
    small = coordinator_factory(keys, max_message=64 << 10)
    big = dealers(keys)
    ca.wait_handshake(big, endpoint=small.endpoint, timeout_s=10)
    big.send(b"x" * (100 << 10))
    assert small.receives(1.0) is None
    good = dealers(keys)
    ca.wait_handshake(good, endpoint=small.endpoint, timeout_s=10)
    _round_trip(small, good, b"y" * (60 << 10))


# ---------------------------------------------------------------- encryption


class _Recorder:
    """Everything a relay saw, both directions (what a recording of the wire would hold)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes:
        with self.lock:
            self.chunks.append(data)
        return data

    def seen(self) -> bytes:
        with self.lock:
            return b"".join(self.chunks)


CANARY = b"STX-CLUSTER-PLAINTEXT-CANARY-" * 64


def test_traffic_is_encrypted(
    coordinator: Coordinator, dealers: Callable, keys: ca.ClusterKeys, psk: bytes
) -> None:
    recorder = _Recorder()
    host, port = coordinator.endpoint.removeprefix("tcp://").split(":")
    with TcpRelay((host, int(port)), transform=recorder) as relay:
        dealer = dealers(keys)
        ca.wait_handshake(dealer, endpoint=f"tcp://127.0.0.1:{relay.port}", timeout_s=10)
        _round_trip(coordinator, dealer, CANARY)
    seen = recorder.seen()
    assert len(seen) > len(CANARY)  # the message did go through the relay
    assert b"PLAINTEXT-CANARY" not in seen
    assert b"CURVE" in seen  # the ZMTP greeting names the mechanism
    secrets = (keys.coordinator_secret, keys.helper_secret, psk, z85.decode(keys.helper_secret))
    leaked = any(secret in seen for secret in secrets)
    assert not leaked, "key material on the wire"


def test_the_recorder_would_see_plaintext(zctx: zmq.Context) -> None:
    """The same recording of a plain ZeroMQ connection holds the message: the check above
    can fail."""
    router = zctx.socket(zmq.ROUTER)
    dealer = zctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        recorder = _Recorder()
        with TcpRelay(("127.0.0.1", port), transform=recorder) as relay:
            dealer.connect(f"tcp://127.0.0.1:{relay.port}")
            dealer.send(CANARY)
            assert router.poll(5000) and router.recv_multipart()[1] == CANARY
        assert b"PLAINTEXT-CANARY" in recorder.seen()
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


# ---------------------------------------------------------------- garbage on the port

#: A coordinator in its own process (a libzmq abort must not take the test with it): a CURVE
#: ROUTER with its ZAP handler that echoes what authenticated helpers send. PSK on stdin.
_COORDINATOR = """
import sys, zmq
from stxpar import cluster_auth as ca
keys = ca.derive_cluster_keys(psk=bytes.fromhex(sys.stdin.readline()))
ctx = zmq.Context()
router = ca.secure_server(ctx.socket(zmq.ROUTER), keys=keys)
auth = ca.ZapAuthenticator(ctx, keys=keys, watch=router)
auth.start()
print(router.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    if router.poll(200):
        router.send_multipart(router.recv_multipart())
"""
#: A ZMTP 3.0 greeting asking for CURVE, as a client (64 bytes, RFC 23).
_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\0") + bytes(32)


@pytest.fixture
def coordinator_process(psk: bytes) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _COORDINATOR],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(psk.hex().encode() + b"\n")
        proc.stdin.flush()
        port = int(proc.stdout.readline())
        yield proc, f"tcp://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _send_garbage(port: int, data: bytes) -> None:
    """Send ``data`` until the coordinator drops the connection (or all of it went)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            for i in range(0, len(data), 1 << 20):
                s.sendall(data[i : i + (1 << 20)])
        except OSError:
            pass


def _held_connection(port: int, tail: bytes) -> socket.socket:
    """A connection that sent a valid greeting, then ``tail``, and stays open."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(_GREETING)
        s.sendall(tail)
    except OSError:
        pass
    return s


def test_garbage_leaves_the_coordinator_up_and_bounded(
    coordinator_process: tuple[subprocess.Popen[bytes], str],
    dealers: Callable,
    keys: ca.ClusterKeys,
) -> None:
    proc, endpoint = coordinator_process
    port = int(endpoint.rsplit(":", 1)[1])
    first = dealers(keys)
    ca.wait_handshake(first, endpoint=endpoint, timeout_s=10)
    first.send(b"before")
    assert first.poll(5000) and first.recv() == b"before"
    rss_before = psutil.Process(proc.pid).memory_info().rss

    noise = os.urandom(1 << 20)
    _send_garbage(port, noise * 20)  # 20 MiB of random bytes
    _send_garbage(port, b"\x02" + (1 << 40).to_bytes(8, "big") + noise)  # no greeting
    # Frames of 12 MiB, over the cap, sent but for their last bytes: with a 16 MiB cap libzmq
    # would hold each (36 MiB) until the handshake times out.
    huge = 12 << 20
    unfinished = (noise * 12)[: huge - 4096]
    held = [
        _held_connection(port, b"\x06" + (1 << 40).to_bytes(8, "big") + noise),  # a command
        _held_connection(port, b"\x02" + (1 << 40).to_bytes(8, "big") + noise),  # a message
        *(_held_connection(port, b"\x06" + huge.to_bytes(8, "big") + unfinished) for _ in range(3)),
    ]
    try:
        time.sleep(0.5)
        assert proc.poll() is None
        grown = psutil.Process(proc.pid).memory_info().rss - rss_before
        assert grown < 16 << 20, f"the coordinator grew by {grown >> 20} MiB"
        second = dealers(keys)
        ca.wait_handshake(second, endpoint=endpoint, timeout_s=10)
        second.send(b"after")
        assert second.poll(5000) and second.recv() == b"after"
    finally:
        for s in held:
            s.close()
