"""The test helper tests/tcp_relay.py against a tiny echo server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from tcp_relay import DOWN, UP, Direction, RelayConnection, TcpRelay


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """Echoes until the client half-closes, then sends b'<bye>' and closes."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the relay may cut the connection
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.sendall(b"<bye>")

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[:2]
    finally:
        stop.set()
        t.join(timeout=5)
        lsock.close()


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.timeout(30)
def test_relay_forwards_both_ways_and_half_close(echo_server: tuple[str, int]) -> None:
    payload = bytes(range(256)) * 4096
    with TcpRelay(echo_server) as relay:
        assert relay.address[0] == "127.0.0.1" and relay.port > 0
        assert _exchange(relay.port, payload) == payload + b"<bye>"
        assert _exchange(relay.port, b"x") == b"x<bye>"
        assert relay.wait_idle(timeout=5)
        assert relay.accepted == 2
        assert relay.active == 0
        assert relay.bytes_up == len(payload) + 1
        assert relay.bytes_down == len(payload) + 1 + 10


@pytest.mark.timeout(30)
def test_relay_transform_hook_can_flip_drop_and_cut(echo_server: tuple[str, int]) -> None:
    def flip_first_byte(conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        if conn.id == 0 and direction == UP:
            return bytes([data[0] ^ 0xFF]) + data[1:]
        if conn.id == 1 and direction == DOWN:
            return b""  # the client gets nothing back
        if conn.id == 2:
            return None  # cut
        return data

    with TcpRelay(echo_server, transform=flip_first_byte) as relay:
        assert _exchange(relay.port, b"\x00abc") == b"\xffabc<bye>"
        assert _exchange(relay.port, b"hello") == b""
        with pytest.raises(OSError):
            got = _exchange(relay.port, b"cut me")
            if not got:  # a clean close instead of a reset also counts as cut
                raise ConnectionResetError
        assert relay.wait_idle(timeout=5)
        conns = relay.snapshot()
        assert [c.cut for c in conns] == [False, False, True]


@pytest.mark.timeout(30)
def test_relay_stop_cuts_open_connections(echo_server: tuple[str, int]) -> None:
    relay = TcpRelay(echo_server).start()
    s = socket.create_connection(relay.address, timeout=10)
    try:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        relay.stop()
        assert relay.wait_idle(timeout=5)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        with pytest.raises(OSError):
            socket.create_connection(relay.address, timeout=2).close()
    finally:
        s.close()
