"""Handshake state machines, two sessions joined in memory (no sockets).

The ``drive`` helper shuttles frames between a ClientHandshake and a ServerHandshake through
FrameBuffers, as the coordinators do over TCP, optionally tampering with frames in transit and
relaying a server failure to the client as an ERROR frame (as the receiver does).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from stxpar import keyschedule as ks
from stxpar.errors import AuthError, ProtocolError, RejectedError, StxError
from stxpar.handshake import (
    AUTH_FAILED,
    DEFAULT_WINDOW_MS,
    ClientHandshake,
    ReplayCache,
    ServerHandshake,
    State,
    handshake_cap,
    keyring_for,
    x25519_shared,
)
from stxpar.wire import (
    HEADER,
    MAX_HANDSHAKE_PAYLOAD,
    Ack,
    ClientHello,
    End,
    ErrorMsg,
    FrameBuffer,
    FrameType,
    Init,
    Join,
    KeyShare,
    MacOnly,
    MetadataAck,
    Receipt,
    encode_frame,
)

NOW = 1_700_000_000_000

FIXED_C_NONCE = bytes(range(0x20, 0x40))
FIXED_S_NONCE = bytes(range(0x40, 0x60))
FIXED_C_EPH = bytes(range(0x60, 0x80))
FIXED_S_EPH = bytes(range(0x80, 0xA0))

HANDSHAKE_ORDER = [
    FrameType.INIT,
    FrameType.SERVER_HELLO,
    FrameType.CLIENT_HELLO,
    FrameType.CLIENT_AUTH,
    FrameType.SERVER_AUTH,
    FrameType.KEY_NEGOTIATION,
    FrameType.KEY_CONFIRMATION,
]

# Low-order / invalid X25519 public keys (Bernstein's list, as used by Wycheproof
# x25519_test.json): 0, 1, the order-8 points, p-1, p, p+1, and non-canonical forms with the
# top bit set. Every one gives an all-zero shared secret.
LOW_ORDER_POINTS = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
    "00" * 31 + "80",
    "01" + "00" * 30 + "80",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7",
    "ec" + "ff" * 31,
    "ed" + "ff" * 31,
    "ee" + "ff" * 31,
]


# ---------------------------------------------------------------- helpers


def make_client(psk: bytes, *, now_ms: int = NOW, fixed: bool = False) -> ClientHandshake:
    if fixed:
        return ClientHandshake(psk=psk, now_ms=now_ms, nonce=FIXED_C_NONCE, ephemeral=FIXED_C_EPH)
    return ClientHandshake(psk=psk, now_ms=now_ms)


def make_server(
    psks: list[bytes],
    *,
    now_ms: int = NOW,
    fixed: bool = False,
    replay_cache: ReplayCache | None = None,
    window_ms: int = DEFAULT_WINDOW_MS,
) -> ServerHandshake:
    return ServerHandshake(
        keyring=keyring_for(psks),
        now_ms=now_ms,
        replay_cache=replay_cache,
        window_ms=window_ms,
        nonce=FIXED_S_NONCE if fixed else None,
        ephemeral=FIXED_S_EPH if fixed else None,
    )


def split(frame: bytes) -> tuple[FrameType, bytes]:
    """One whole frame -> (type, payload)."""
    raw_type, length = HEADER.unpack_from(frame)
    assert length == len(frame) - HEADER.size
    return FrameType(raw_type), frame[HEADER.size :]


def error_frame(exc: StxError) -> bytes:
    """What the receiver sends when its handshake fails (a generic message, as _send_error)."""
    message = AUTH_FAILED if isinstance(exc, AuthError | ProtocolError) else str(exc)
    return encode_frame(FrameType.ERROR, ErrorMsg(exc.wire_code, message).encode())


Tamper = Callable[[int, bytes], bytes]


@dataclass
class Run:
    client: ClientHandshake
    server: ServerHandshake
    #: Every frame as delivered: (destination "c" or "s", bytes after tampering).
    frames: list[tuple[str, bytes]] = field(default_factory=list)
    client_error: StxError | None = None
    server_error: StxError | None = None
    #: Nothing left to deliver, no error, yet not both sides established.
    stalled: bool = False
    client_pending: int = 0
    server_pending: int = 0

    @property
    def error(self) -> StxError | None:
        return self.server_error or self.client_error

    @property
    def ok(self) -> bool:
        return self.client.established and self.server.established and self.error is None


def drive(
    client: ClientHandshake,
    server: ServerHandshake,
    *,
    now_ms: int = NOW,
    tamper: Tamper | None = None,
    relay_errors: bool = True,
) -> Run:
    """Shuttle frames until both sides are established, one raises StxError, or nothing moves.

    Any exception other than StxError propagates and fails the calling test.
    """
    run = Run(client, server)
    bufs = {"c": FrameBuffer(cap=handshake_cap), "s": FrameBuffer(cap=handshake_cap)}
    queue: deque[tuple[str, bytes]] = deque(("s", f) for f in client.start())
    index = 0
    while queue:
        dest, frame = queue.popleft()
        if tamper is not None:
            frame = tamper(index, frame)
        index += 1
        run.frames.append((dest, frame))
        side = server if dest == "s" else client
        other = "c" if dest == "s" else "s"
        bufs[dest].feed(frame)
        try:
            while (got := bufs[dest].next_frame()) is not None:
                for out in side.receive(got[0], got[1], now_ms=now_ms):
                    queue.append((other, out))
        except StxError as exc:
            if dest == "s":
                run.server_error = exc
                if relay_errors:
                    err_type, err_payload = split(error_frame(exc))
                    try:
                        client.receive(err_type, err_payload, now_ms=now_ms)
                    except StxError as client_exc:
                        run.client_error = client_exc
            else:
                run.client_error = exc
            break
    else:
        run.stalled = not (client.established and server.established)
    run.client_pending = bufs["c"].pending
    run.server_pending = bufs["s"].pending
    return run


def handshake(psk: bytes, *, fixed: bool = False) -> Run:
    run = drive(make_client(psk, fixed=fixed), make_server([psk], fixed=fixed))
    assert run.ok, run.error
    return run


def recorded_frames(psk: bytes) -> dict[FrameType, bytes]:
    """Payload of every handshake frame type, from a real handshake."""
    run = handshake(psk)
    return dict(split(frame) for _, frame in run.frames)


# ---------------------------------------------------------------- success


def test_handshake_completes_with_equal_keys(psk: bytes) -> None:
    run = handshake(psk)
    c, s = run.client.session, run.server.session
    assert c is not None and s is not None
    assert c == s
    assert c.session_id == s.session_id and len(c.session_id) == 16
    assert c.master == s.master
    assert c.stream_secret(3) == s.stream_secret(3)
    assert [split(f)[0] for _, f in run.frames] == HANDSHAKE_ORDER
    assert [d for d, _ in run.frames] == ["s", "c", "s", "s", "c", "s", "c"]
    everything = hashlib.sha256(b"".join(f for _, f in run.frames)).digest()
    assert run.client.transcript_hash == run.server.transcript_hash == everything
    assert run.client.state is State.ESTABLISHED and run.server.state is State.ESTABLISHED
    assert all(len(f) - HEADER.size <= MAX_HANDSHAKE_PAYLOAD for _, f in run.frames)


def test_fresh_handshakes_give_fresh_sessions(psk: bytes) -> None:
    a, b = handshake(psk), handshake(psk)
    assert a.client.session is not None and b.client.session is not None
    assert a.client.session.session_id != b.client.session.session_id
    assert a.client.session.master != b.client.session.master


def test_fixed_inputs_are_deterministic(psk: bytes) -> None:
    a, b = handshake(psk, fixed=True), handshake(psk, fixed=True)
    assert a.frames == b.frames
    assert a.client.session == b.client.session


def test_server_ephemeral_feeds_the_master(psk: bytes) -> None:
    a = handshake(psk, fixed=True)
    client = make_client(psk, fixed=True)
    server = ServerHandshake(
        keyring=keyring_for([psk]), now_ms=NOW, nonce=FIXED_S_NONCE, ephemeral=bytes(range(32))
    )
    b = drive(client, server)
    assert b.ok
    # Identical up to KEY_CONFIRMATION; the fresh ephemeral alone changes every session key.
    assert a.frames[:6] == b.frames[:6]
    assert a.client.session is not None and b.client.session is not None
    assert a.client.session.master != b.client.session.master


def test_keyring_with_several_keys(psk: bytes) -> None:
    others = [os.urandom(32) for _ in range(3)]
    run = drive(make_client(psk), make_server([*others, psk]))
    assert run.ok
    run = drive(make_client(others[1]), make_server([*others, psk]))
    assert run.ok


def test_handshake_cap_is_the_handshake_limit() -> None:
    assert {handshake_cap(t) for t in FrameType} == {MAX_HANDSHAKE_PAYLOAD}


# ---------------------------------------------------------------- authentication failures


def test_wrong_psk(psk: bytes) -> None:
    cache = ReplayCache()
    run = drive(make_client(os.urandom(32)), make_server([psk], replay_cache=cache))
    assert isinstance(run.server_error, AuthError)
    assert str(run.server_error) == AUTH_FAILED
    assert isinstance(run.client_error, AuthError)  # from the server's ERROR frame
    assert not run.client.established and not run.server.established
    assert run.server.session is None and run.client.session is None
    assert run.server.state is State.FAILED and run.client.state is State.FAILED
    # The server failed on CLIENT_AUTH and sent nothing back after SERVER_HELLO.
    assert [split(f)[0] for _, f in run.frames] == HANDSHAKE_ORDER[:4]
    assert len(cache) == 0  # the cheap MAC is checked before any state is kept


def test_wrong_psk_without_error_relay_leaves_client_waiting(psk: bytes) -> None:
    run = drive(make_client(os.urandom(32)), make_server([psk]), relay_errors=False)
    assert isinstance(run.server_error, AuthError)
    assert run.client_error is None
    assert run.client.state is State.WAIT_SERVER_AUTH


def test_unknown_key_id_and_wrong_mac_fail_identically(psk: bytes) -> None:
    client_psk = os.urandom(32)
    key_id = ks.derive_psk_keys(psk=client_psk).key_id
    # Known key id, but it maps to different keys: the MAC is wrong.
    wrong_mac = ServerHandshake(keyring={key_id: ks.derive_psk_keys(psk=psk)}, now_ms=NOW)
    # Key id not in the keyring at all.
    unknown = ServerHandshake(keyring=keyring_for([psk]), now_ms=NOW)
    a = drive(make_client(client_psk), wrong_mac)
    b = drive(make_client(client_psk), unknown)
    assert isinstance(a.server_error, AuthError) and isinstance(b.server_error, AuthError)
    assert type(a.server_error) is type(b.server_error)
    assert str(a.server_error) == str(b.server_error) == AUTH_FAILED
    assert [split(f)[0] for _, f in a.frames] == [split(f)[0] for _, f in b.frames]
    assert a.server.state is b.server.state is State.FAILED
    assert str(a.client_error) == str(b.client_error)


def test_unknown_key_id_with_mac_under_the_placeholder_key(psk: bytes) -> None:
    # For an unknown key id the server checks the MAC under an all-zero placeholder key (same
    # work as a known one). An attacker who MACs under that key must still be refused.
    server = make_server([psk])
    (hello,) = server.receive(FrameType.INIT, Init().encode(), now_ms=NOW)
    assert split(hello)[0] is FrameType.SERVER_HELLO
    unknown = ClientHello(key_id=bytes(8), nonce=os.urandom(32), time_ms=NOW)
    assert server.receive(FrameType.CLIENT_HELLO, unknown.encode(), now_ms=NOW) == []
    forged = ks.mac(key=bytes(32), label="client auth", data=server.transcript_hash)
    with pytest.raises(AuthError) as info:
        server.receive(FrameType.CLIENT_AUTH, MacOnly(forged).encode(), now_ms=NOW)
    assert str(info.value) == AUTH_FAILED
    assert server.state is State.FAILED and server.session is None


@pytest.mark.parametrize(
    ("skew", "accepted"),
    [
        (0, True),
        (DEFAULT_WINDOW_MS, True),
        (-DEFAULT_WINDOW_MS, True),
        (DEFAULT_WINDOW_MS + 1, False),
        (-DEFAULT_WINDOW_MS - 1, False),
        (24 * 3600 * 1000, False),
        (-NOW, False),
    ],
)
def test_clock_window(psk: bytes, skew: int, accepted: bool) -> None:
    cache = ReplayCache()
    client = make_client(psk, now_ms=NOW + skew)
    run = drive(client, make_server([psk], replay_cache=cache))
    if accepted:
        assert run.ok
        assert len(cache) == 1
    else:
        assert isinstance(run.server_error, AuthError)
        assert "window" in str(run.server_error)
        assert isinstance(run.client_error, AuthError)
        assert not run.server.established and not run.client.established
        assert len(cache) == 0


def test_clock_window_is_configurable(psk: bytes) -> None:
    run = drive(make_client(psk, now_ms=NOW + 2000), make_server([psk], window_ms=1000))
    assert isinstance(run.server_error, AuthError)
    run = drive(make_client(psk, now_ms=NOW + 1000), make_server([psk], window_ms=1000))
    assert run.ok


def test_replayed_client_nonce_is_refused(psk: bytes) -> None:
    cache = ReplayCache()
    nonce = os.urandom(32)
    first = drive(
        ClientHandshake(psk=psk, now_ms=NOW, nonce=nonce), make_server([psk], replay_cache=cache)
    )
    assert first.ok
    again = drive(
        ClientHandshake(psk=psk, now_ms=NOW + 10, nonce=nonce),
        make_server([psk], replay_cache=cache, now_ms=NOW + 10),
        now_ms=NOW + 10,
    )
    assert isinstance(again.server_error, AuthError)
    assert "replay" in str(again.server_error)
    assert not again.server.established
    other = drive(
        ClientHandshake(psk=psk, now_ms=NOW + 20),
        make_server([psk], replay_cache=cache),
        now_ms=NOW + 20,
    )
    assert other.ok


def test_recorded_client_frames_replayed_on_a_new_connection(psk: bytes) -> None:
    recorded = handshake(psk)
    client_frames = [f for d, f in recorded.frames if d == "s"]
    server = make_server([psk])
    with pytest.raises(AuthError):
        for frame in client_frames:
            server.receive(*split(frame), now_ms=NOW)
    assert server.state is State.FAILED
    assert server.session is None


def test_frame_sent_twice_is_refused(psk: bytes) -> None:
    for repeat in range(3):  # INIT, CLIENT_HELLO, CLIENT_AUTH sent a second time
        client, server = make_client(psk), make_server([psk])
        sent = client.start()
        (hello,) = server.receive(*split(sent[0]), now_ms=NOW)
        sent += client.receive(*split(hello), now_ms=NOW)
        for frame in sent[1 : repeat + 1]:
            server.receive(*split(frame), now_ms=NOW)
        with pytest.raises(ProtocolError):
            server.receive(*split(sent[repeat]), now_ms=NOW)
        assert server.state is State.FAILED
        assert server.session is None


# ---------------------------------------------------------------- reflection


def test_reflection_client_auth_as_server_auth(psk: bytes) -> None:
    client = make_client(psk)
    server = make_server([psk])
    (hello,) = server.receive(*split(client.start()[0]), now_ms=NOW)
    c_hello, c_auth = client.receive(*split(hello), now_ms=NOW)
    ftype, payload = split(c_auth)
    assert ftype is FrameType.CLIENT_AUTH
    with pytest.raises(AuthError):
        client.receive(FrameType.SERVER_AUTH, payload, now_ms=NOW)
    assert client.state is State.FAILED and client.session is None


def test_reflection_key_negotiation_as_key_confirmation(psk: bytes) -> None:
    client, _ = _drive_to_key_negotiation(psk)
    assert client.state is State.WAIT_KEY_CONFIRMATION
    with pytest.raises(AuthError):
        client.receive(FrameType.KEY_CONFIRMATION, _LAST_KEY_NEGOTIATION[0], now_ms=NOW)
    assert client.state is State.FAILED and client.session is None


def test_server_auth_under_client_key_is_refused(psk: bytes) -> None:
    # A "server" that only reuses the client's MAC key and label (no role separation).
    client = make_client(psk)
    server = make_server([psk])
    (hello,) = server.receive(*split(client.start()[0]), now_ms=NOW)
    client.receive(*split(hello), now_ms=NOW)
    th = client.transcript_hash
    keys = ks.derive_psk_keys(psk=psk)
    forged = ks.mac(key=keys.client_auth, label="server auth", data=th)
    with pytest.raises(AuthError):
        client.receive(FrameType.SERVER_AUTH, MacOnly(forged).encode(), now_ms=NOW)
    # Control: the right key and label are accepted (so the forgery failed for the key alone).
    client = make_client(psk)
    server = make_server([psk])
    (hello,) = server.receive(*split(client.start()[0]), now_ms=NOW)
    client.receive(*split(hello), now_ms=NOW)
    good = ks.mac(key=keys.server_auth, label="server auth", data=client.transcript_hash)
    assert len(client.receive(FrameType.SERVER_AUTH, MacOnly(good).encode(), now_ms=NOW)) == 1


# ---------------------------------------------------------------- tampering in transit


def _baseline_lengths(psk: bytes) -> list[int]:
    run = handshake(psk, fixed=True)
    return [len(f) for _, f in run.frames]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "index", range(len(HANDSHAKE_ORDER)), ids=[t.name for t in HANDSHAKE_ORDER]
)
def test_single_byte_flip_in_any_frame_fails(psk: bytes, index: int) -> None:
    lengths = _baseline_lengths(psk)
    outcomes = {"error": 0, "stall": 0}
    for pos in range(lengths[index]):
        for mask in (0x01, 0x80, 0xFF):

            def flip(i: int, frame: bytes, pos: int = pos, mask: int = mask) -> bytes:
                if i != index:
                    return frame
                return frame[:pos] + bytes([frame[pos] ^ mask]) + frame[pos + 1 :]

            run = drive(make_client(psk, fixed=True), make_server([psk], fixed=True), tamper=flip)
            where = f"frame {index} byte {pos} ^ {mask:#x}"
            assert not run.client.established, where
            # The server only ever establishes when the flip hit its own last frame.
            assert not run.server.established or index == len(HANDSHAKE_ORDER) - 1, where
            if run.error is not None:
                assert isinstance(run.error, ProtocolError | AuthError), where
                outcomes["error"] += 1
            else:
                # Only a length field made larger can leave a side waiting for more bytes,
                # which the coordinators' handshake timeout ends.
                assert run.stalled and 1 <= pos <= 4, where
                assert run.client_pending + run.server_pending > 0, where
                outcomes["stall"] += 1
    assert outcomes["error"] >= 3 * (lengths[index] - 4)


def test_truncated_handshake_stalls_without_keys(psk: bytes) -> None:
    for index in range(len(HANDSHAKE_ORDER)):

        def cut(i: int, frame: bytes, index: int = index) -> bytes:
            return frame[: len(frame) // 2] if i == index else frame

        run = drive(make_client(psk), make_server([psk]), tamper=cut)
        assert not run.client.established
        assert run.error is not None or run.stalled


# ---------------------------------------------------------------- X25519


_LAST_KEY_NEGOTIATION: list[bytes] = [b""]


def _drive_to_key_negotiation(psk: bytes) -> tuple[ClientHandshake, ServerHandshake]:
    """Client has just sent KEY_NEGOTIATION (kept in _LAST_KEY_NEGOTIATION); server waits."""
    client, server = make_client(psk), make_server([psk])
    out = server.receive(*split(client.start()[0]), now_ms=NOW)
    out = client.receive(*split(out[0]), now_ms=NOW)
    reply: list[bytes] = []
    for frame in out:
        reply = server.receive(*split(frame), now_ms=NOW)
    assert server.state is State.WAIT_KEY_NEGOTIATION
    (key_neg,) = client.receive(*split(reply[0]), now_ms=NOW)
    ftype, _LAST_KEY_NEGOTIATION[0] = split(key_neg)
    assert ftype is FrameType.KEY_NEGOTIATION
    assert client.state is State.WAIT_KEY_CONFIRMATION
    return client, server


def _key_share(psk: bytes, server: ServerHandshake, public: bytes) -> bytes:
    """A KEY_NEGOTIATION payload with a valid MAC (the sender of it holds the PSK)."""
    keys = ks.derive_psk_keys(psk=psk)
    tag = ks.mac(
        key=keys.client_auth, label="client key share", data=server.transcript_hash + public
    )
    return KeyShare(public, tag).encode()


def test_key_negotiation_with_valid_point_and_forged_mac_control(psk: bytes) -> None:
    # Control for the low-order test: the test's own MAC construction is accepted.
    _, server = _drive_to_key_negotiation(psk)
    public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    out = server.receive(FrameType.KEY_NEGOTIATION, _key_share(psk, server, public), now_ms=NOW)
    assert len(out) == 1 and server.established


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_low_order_point_in_key_negotiation(psk: bytes, point: str) -> None:
    _, server = _drive_to_key_negotiation(psk)
    payload = _key_share(psk, server, bytes.fromhex(point))
    with pytest.raises(AuthError, match="key exchange failed"):
        server.receive(FrameType.KEY_NEGOTIATION, payload, now_ms=NOW)
    assert server.state is State.FAILED and server.session is None


def test_key_negotiation_with_wrong_mac(psk: bytes) -> None:
    _, server = _drive_to_key_negotiation(psk)
    public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(AuthError):
        server.receive(FrameType.KEY_NEGOTIATION, KeyShare(public, bytes(32)).encode(), now_ms=NOW)
    assert server.session is None


@pytest.mark.parametrize("point", LOW_ORDER_POINTS[:7])
def test_low_order_point_in_key_confirmation(psk: bytes, point: str) -> None:
    client, _ = _drive_to_key_negotiation(psk)
    payload = KeyShare(bytes.fromhex(point), bytes(32)).encode()
    with pytest.raises(AuthError):
        client.receive(FrameType.KEY_CONFIRMATION, payload, now_ms=NOW)
    assert client.state is State.FAILED and client.session is None


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_x25519_shared_refuses_low_order(point: str) -> None:
    with pytest.raises(AuthError):
        x25519_shared(X25519PrivateKey.generate(), bytes.fromhex(point))


def test_x25519_shared_agrees() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ab = x25519_shared(a, b.public_key().public_bytes_raw())
    assert ab == x25519_shared(b, a.public_key().public_bytes_raw())
    assert ab != bytes(32)


# ---------------------------------------------------------------- the transition table

CLIENT_TABLE = {
    (State.WAIT_SERVER_HELLO, FrameType.SERVER_HELLO),
    (State.WAIT_SERVER_AUTH, FrameType.SERVER_AUTH),
    (State.WAIT_KEY_CONFIRMATION, FrameType.KEY_CONFIRMATION),
}
SERVER_TABLE = {
    (State.WAIT_INIT, FrameType.INIT),
    (State.WAIT_CLIENT_HELLO, FrameType.CLIENT_HELLO),
    (State.WAIT_CLIENT_AUTH, FrameType.CLIENT_AUTH),
    (State.WAIT_KEY_NEGOTIATION, FrameType.KEY_NEGOTIATION),
}
CLIENT_STATES = [
    State.START,
    State.WAIT_SERVER_HELLO,
    State.WAIT_SERVER_AUTH,
    State.WAIT_KEY_CONFIRMATION,
    State.ESTABLISHED,
    State.FAILED,
]
SERVER_STATES = [
    State.WAIT_INIT,
    State.WAIT_CLIENT_HELLO,
    State.WAIT_CLIENT_AUTH,
    State.WAIT_KEY_NEGOTIATION,
    State.ESTABLISHED,
    State.FAILED,
]

_OTHER_PAYLOADS: dict[FrameType, bytes] = {
    FrameType.METADATA: os.urandom(64),  # sealed on the wire: opaque bytes
    FrameType.MANIFEST: os.urandom(64),  # sealed too: a chunk of the manifest
    FrameType.ROUTES: os.urandom(64),  # sealed too: where data streams go
    FrameType.METADATA_ACK: MetadataAck(b"\x00").encode(),
    FrameType.END: End(1, bytes(32)).encode(),
    FrameType.RECEIPT: Receipt(bytes(32), 1).encode(),
    FrameType.ERROR: ErrorMsg(3, AUTH_FAILED).encode(),
    FrameType.JOIN: Join(bytes(16), 0, bytes(32)).encode(),
    FrameType.BLOCK: bytes(8 + 20),
    FrameType.ACK: Ack((0,), ()).encode(),
}


def valid_payloads(psk: bytes) -> dict[FrameType, bytes]:
    """A well-formed payload for every frame type (handshake ones from a real handshake)."""
    payloads = dict(_OTHER_PAYLOADS)
    payloads.update(recorded_frames(psk))
    assert set(payloads) == set(FrameType)
    return payloads


def reach(side: str, state: State, psk: bytes) -> ClientHandshake | ServerHandshake:
    """A machine of ``side`` in ``state``, reached by driving a real handshake."""
    client, server = make_client(psk), make_server([psk])
    target: ClientHandshake | ServerHandshake = client if side == "client" else server
    if state is State.FAILED:
        # A real failure: the peer holds another key.
        if side == "client":
            wrong = make_server([os.urandom(32)])
            wrong_client = make_client(os.urandom(32))
            run = drive(wrong_client, wrong)
            assert run.client.state is State.FAILED
            return run.client
        run = drive(make_client(os.urandom(32)), server, relay_errors=False)
        assert server.state is State.FAILED
        return server
    if target.state is state:
        return target
    queue: deque[tuple[str, bytes]] = deque(("s", f) for f in client.start())
    while target.state is not state:
        assert queue, f"{side} never reached {state}"
        dest, frame = queue.popleft()
        machine = server if dest == "s" else client
        for out in machine.receive(*split(frame), now_ms=NOW):
            queue.append(("c" if dest == "s" else "s", out))
    return target


def _sweep_cases() -> list[tuple[str, State, FrameType]]:
    cases = []
    for side, states, table in (
        ("client", CLIENT_STATES, CLIENT_TABLE),
        ("server", SERVER_STATES, SERVER_TABLE),
    ):
        for state in states:
            for ftype in FrameType:
                if (state, ftype) not in table:
                    cases.append((side, state, ftype))
    return cases


def test_transition_tables_are_as_documented() -> None:
    assert set(ClientHandshake._table) == CLIENT_TABLE
    assert set(ServerHandshake._table) == SERVER_TABLE


@pytest.mark.parametrize(
    ("side", "state", "ftype"),
    _sweep_cases(),
    ids=[f"{s}-{st.value}-{t.name}" for s, st, t in _sweep_cases()],
)
def test_every_pair_outside_the_table_is_fatal(
    psk: bytes, side: str, state: State, ftype: FrameType
) -> None:
    payloads = valid_payloads(psk)
    machine = reach(side, state, psk)
    assert machine.state is state
    session_before = machine.session
    th_before = machine.transcript_hash
    terminal = state in (State.ESTABLISHED, State.FAILED)
    if ftype is FrameType.ERROR and not terminal:
        # The peer's ERROR frame raises the error it names (code 3: authentication).
        with pytest.raises(AuthError):
            machine.receive(ftype, payloads[ftype], now_ms=NOW)
        assert machine.state is State.FAILED
        return
    with pytest.raises(ProtocolError):
        machine.receive(ftype, payloads[ftype], now_ms=NOW)
    if state is State.ESTABLISHED:
        # Refused, and the established session is left as it was.
        assert machine.session is session_before is not None
        assert machine.transcript_hash == th_before
    else:
        assert machine.state is State.FAILED
        assert machine.session is None
    # And it stays refused.
    with pytest.raises(ProtocolError):
        machine.receive(ftype, payloads[ftype], now_ms=NOW)


@pytest.mark.parametrize("side", ["client", "server"])
def test_states_of_the_other_role_accept_nothing(psk: bytes, side: str) -> None:
    """States a side never enters by itself: forced, every frame type is still refused."""
    payloads = valid_payloads(psk)
    own = CLIENT_STATES if side == "client" else SERVER_STATES
    checked = 0
    for state in set(State) - set(own):
        for ftype in FrameType:
            machine = make_client(psk) if side == "client" else make_server([psk])
            machine.state = state
            with pytest.raises(StxError) as info:
                machine.receive(ftype, payloads[ftype], now_ms=NOW)
            if ftype is not FrameType.ERROR:
                assert isinstance(info.value, ProtocolError)
            assert machine.state is State.FAILED
            assert machine.session is None
            checked += 1
    assert checked == 4 * len(FrameType)


@pytest.mark.parametrize(
    ("code", "cls"), [(1, ProtocolError), (3, AuthError), (2, RejectedError), (6, RejectedError)]
)
def test_error_frame_raises_the_named_error(psk: bytes, code: int, cls: type[StxError]) -> None:
    for state in (State.WAIT_SERVER_HELLO, State.WAIT_SERVER_AUTH, State.WAIT_KEY_CONFIRMATION):
        client = reach("client", state, psk)
        with pytest.raises(cls):
            client.receive(FrameType.ERROR, ErrorMsg(code, "nope").encode(), now_ms=NOW)
        assert client.state is State.FAILED


def test_a_peer_of_the_previous_version_is_refused_naming_both(psk: bytes) -> None:
    # An stx2 INIT at an stx3 server, an stx2 SERVER_HELLO at an stx3 client: refused, and the
    # message says which version each side speaks.
    server = make_server([psk])
    with pytest.raises(ProtocolError, match="'stx2'.*stx3"):
        server.receive(FrameType.INIT, msgpack.packb(["stx2"]), now_ms=NOW)
    assert server.state is State.FAILED
    client = reach("client", State.WAIT_SERVER_HELLO, psk)
    hello = msgpack.unpackb(recorded_frames(psk)[FrameType.SERVER_HELLO])
    assert hello[0] == "stx3"
    hello[0] = "stx2"
    with pytest.raises(ProtocolError, match="'stx2'.*stx3"):
        client.receive(FrameType.SERVER_HELLO, msgpack.packb(hello), now_ms=NOW)
    assert client.state is State.FAILED


def test_malformed_error_frame_is_a_protocol_error(psk: bytes) -> None:
    client = reach("client", State.WAIT_SERVER_AUTH, psk)
    with pytest.raises(ProtocolError):
        client.receive(FrameType.ERROR, b"\xc1", now_ms=NOW)
    assert client.state is State.FAILED


def test_nothing_after_established(psk: bytes) -> None:
    run = handshake(psk)
    payloads = valid_payloads(psk)
    for machine in (run.client, run.server):
        session = machine.session
        for ftype in FrameType:
            with pytest.raises(ProtocolError):
                machine.receive(ftype, payloads[ftype], now_ms=NOW)
        assert machine.session is session
    with pytest.raises(ProtocolError):
        run.client.start()


def test_client_start_only_once(psk: bytes) -> None:
    client = make_client(psk)
    client.start()
    with pytest.raises(ProtocolError):
        client.start()


FRAME_TYPES = st.sampled_from(list(FrameType))
_HYPOTHESIS_PAYLOADS = valid_payloads(bytes(32))


@pytest.mark.timeout(30)
@settings(max_examples=200, deadline=None)
@given(
    side=st.sampled_from(["client", "server"]),
    steps=st.lists(
        st.tuples(FRAME_TYPES, st.booleans(), st.binary(max_size=100)), min_size=1, max_size=8
    ),
)
def test_random_frame_sequences_only_raise_protocol_errors(
    side: str, steps: list[tuple[FrameType, bool, bytes]]
) -> None:
    psk = bytes(32)
    payloads = _HYPOTHESIS_PAYLOADS
    machine: ClientHandshake | ServerHandshake
    if side == "client":
        machine = make_client(psk)
        machine.start()
        table = CLIENT_TABLE
    else:
        machine = make_server([psk])
        table = SERVER_TABLE
    failed = False
    for ftype, use_valid, junk in steps:
        before = machine.state
        payload = payloads[ftype] if use_valid else junk
        try:
            machine.receive(ftype, payload, now_ms=NOW)
        except StxError as exc:
            assert machine.state is State.FAILED
            if failed or (before, ftype) not in table and ftype is not FrameType.ERROR:
                assert isinstance(exc, ProtocolError)
            failed = True
            continue
        assert not failed, "a failed machine accepted a frame"
        assert (before, ftype) in table
        assert machine.state is not State.ESTABLISHED  # nobody completes with foreign frames


# ---------------------------------------------------------------- replay cache


def test_replay_cache_detects_and_forgets_after_ttl() -> None:
    cache = ReplayCache(max_entries=100, ttl_ms=1000)
    cache.check_and_add(b"a", now_ms=0)
    with pytest.raises(AuthError):
        cache.check_and_add(b"a", now_ms=999)
    cache.check_and_add(b"b", now_ms=500)
    cache.check_and_add(b"a", now_ms=1000)  # expired: accepted again
    assert len(cache) == 2  # b (until 1500) and the new a
    with pytest.raises(AuthError):
        cache.check_and_add(b"b", now_ms=1400)


def test_replay_cache_is_bounded() -> None:
    cache = ReplayCache(max_entries=10, ttl_ms=10**9)
    for i in range(1000):
        cache.check_and_add(i.to_bytes(32, "big"), now_ms=i)
        assert len(cache) <= 10
    assert len(cache) == 10
    # The newest entries are still remembered.
    for i in range(991, 1000):
        with pytest.raises(AuthError):
            cache.check_and_add(i.to_bytes(32, "big"), now_ms=1000)


def test_replay_cache_default_bound_holds_under_a_flood(psk: bytes) -> None:
    cache = ReplayCache(max_entries=50)
    for _ in range(120):
        assert drive(make_client(psk), make_server([psk], replay_cache=cache)).ok
    assert len(cache) == 50
