"""Attacks on the handshake of a live receiver, over real loopback sockets.

Each test plays one attacker (see ``attacker.py``) against the module's ``stxpar.Receiver`` and
then checks the three things every attack must leave behind: the documented error (or a plain
close), nothing written anywhere, and a receiver that still serves a legitimate sender.

Who can do what: every attack here is open to a network attacker **without** the key (an
on-path attacker rewriting an honest client's frames, or anyone connecting), except where a
test says it needs the key: those show that even a key holder cannot get past the check
(replayed nonce, stale clock, a low-order key share with a valid MAC).
"""

from __future__ import annotations

import os
import socket
import time

import msgpack
import pytest
from attacker import (
    Arena,
    Peer,
    client_handshake,
    expect_refused,
    flip_field,
    key_share,
    make_metadata,
    now_ms,
    open_session,
    raw_frame,
    split_frame,
)

import stxpar
from stxpar import keyschedule as ks
from stxpar.errors import AuthError, ProtocolError, StxError
from stxpar.handshake import ClientHandshake
from stxpar.recv_session import MAX_METADATA_PAYLOAD
from stxpar.wire import (
    ClientHello,
    FrameType,
    Init,
    KeyShare,
    MacOnly,
    encode_frame,
)

AUTH = "authentication failed"
T = FrameType

#: Wycheproof x25519_test.json, every public key flagged "ZeroSharedSecret" (low order, their
#: non-canonical encodings with the top bit set, and 0, 1, p-1, p, p+1).
LOW_ORDER_POINTS = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000080",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
]


def _hello(arena: Arena) -> bytes:
    """A well-formed CLIENT_HELLO payload naming the receiver's key id (sent in the clear by
    every honest sender, so any observer has it)."""
    key_id = ks.derive_psk_keys(psk=arena.psk).key_id
    return ClientHello(key_id=key_id, nonce=os.urandom(32), time_ms=now_ms()).encode()


def _sample(ftype: FrameType, arena: Arena) -> bytes:
    """A well-formed payload of each client handshake message, made without the key."""
    if ftype is T.INIT:
        return Init().encode()
    if ftype is T.CLIENT_HELLO:
        return _hello(arena)
    if ftype is T.CLIENT_AUTH:
        return MacOnly(os.urandom(32)).encode()
    if ftype is T.KEY_NEGOTIATION:
        return KeyShare(os.urandom(32), os.urandom(32)).encode()
    if ftype is T.SERVER_HELLO:
        return msgpack.packb(
            ["stx2", "x25519-hkdf-sha256-aes256gcm", os.urandom(32), now_ms()], use_bin_type=True
        )
    return os.urandom(64)


# ---------------------------------------------------------------- wrong key, unknown key id


@pytest.mark.timeout(60)
def test_wrong_psk_and_unknown_key_id_get_the_same_error(arena: Arena) -> None:
    wrong = os.urandom(32)
    # 1. A wrong PSK: its key id is unknown to the receiver.
    with Peer(arena.addr) as unknown:
        with pytest.raises(AuthError, match="^receiver: authentication failed$"):
            client_handshake(unknown, wrong)
        expect_refused(unknown, 3, AUTH)
        unknown_error = [p for t, p in unknown.received if t is T.ERROR]

    # 2. The receiver's real key id (observed on the wire) with a MAC made without the key.
    real_id = ks.derive_psk_keys(psk=arena.psk).key_id

    def claim_real_id(ftype: FrameType, payload: bytes) -> list[tuple[FrameType, bytes]]:
        if ftype is T.CLIENT_HELLO:
            fields = msgpack.unpackb(payload, raw=False)
            fields[2] = real_id
            payload = msgpack.packb(fields, use_bin_type=True)
        return [(ftype, payload)]

    with Peer(arena.addr) as known:
        with pytest.raises(AuthError, match="^receiver: authentication failed$"):
            client_handshake(known, wrong, out=claim_real_id)
        expect_refused(known, 3, AUTH)
        known_error = [p for t, p in known.received if t is T.ERROR]

    assert unknown_error == known_error  # byte for byte
    # Through the API a wrong key reads the same, and exits 3.
    src = arena.src / "wrong-key.bin"
    src.write_bytes(b"x" * 100)
    with pytest.raises(AuthError, match="^receiver: authentication failed$") as err:
        stxpar.send(src, *arena.addr, psk=wrong, workers=1)
    assert err.value.exit_code == 3
    src.unlink()
    arena.settle()
    assert len(arena.kinds("rejected")) == 3
    arena.unharmed()


# ---------------------------------------------------------------- replay


@pytest.mark.timeout(60)
def test_replayed_handshake_on_a_new_connection(arena: Arena) -> None:
    # Record an honest client's whole handshake (the on-path attacker's capture).
    with Peer(arena.addr) as honest:
        hs = client_handshake(honest, arena.psk)
        assert hs.established
        recorded = list(honest.sent)  # INIT, CLIENT_HELLO, CLIENT_AUTH, KEY_NEGOTIATION
    assert [split_frame(f)[0] for f in recorded] == [
        T.INIT,
        T.CLIENT_HELLO,
        T.CLIENT_AUTH,
        T.KEY_NEGOTIATION,
    ]
    # Replay it blind, all at once, on a new connection: the fresh server nonce breaks it.
    with Peer(arena.addr) as replay:
        replay.send_bytes(b"".join(recorded))
        seen = expect_refused(replay, 3, AUTH)
        assert [t for t, _ in seen] == [T.SERVER_HELLO]
    # And in step with the receiver, waiting for each answer.
    with Peer(arena.addr) as replay:
        replay.send_bytes(recorded[0])
        assert replay.recv_frame() is not None
        replay.send_bytes(recorded[1] + recorded[2])
        expect_refused(replay, 3, AUTH)
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["same client nonce", "stale clock", "future clock"])
def test_key_holder_cannot_replay_or_skew_the_clock(arena: Arena, what: str) -> None:
    """Needs the key (the replay cache and clock window are checked after the MAC): a key holder
    reusing a nonce gets the generic error; one whose clock is far off is told "clock skew"
    (only a key holder can get that far, so it tells nobody else anything)."""
    nonce = os.urandom(32)
    if what == "same client nonce":
        with Peer(arena.addr) as first:
            assert client_handshake(first, arena.psk, nonce=nonce).established
        time_ms = None
    else:
        time_ms = now_ms() + (-1 if what == "stale clock" else 1) * (
            arena.receiver.window_ms + 60_000
        )
    expected = AUTH if time_ms is None else "clock skew: the sender's clock differs"
    with Peer(arena.addr) as again:
        with pytest.raises(AuthError, match=f"^receiver: {expected}"):
            client_handshake(again, arena.psk, nonce=nonce, time_ms=time_ms)
        got = expect_refused(again, 3, AUTH if time_ms is None else None)
        assert not got or again.errors[0].message.startswith(expected)
    arena.settle()
    reasons = {f["error"].split(" by ")[0] for f in arena.kinds("rejected")}
    assert reasons & {
        "replayed handshake",
        "clock skew: the sender's clock differs from the receiver's",
    }
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("twice", "message"),
    [
        (T.INIT, AUTH),
        (T.CLIENT_HELLO, AUTH),
        (T.CLIENT_AUTH, AUTH),
        (T.KEY_NEGOTIATION, "KEY_NEGOTIATION frame of 69 bytes exceeds the limit of -1"),
    ],
    ids=lambda v: getattr(v, "name", "msg"),
)
def test_a_message_twice_on_one_connection(arena: Arena, twice: FrameType, message: str) -> None:
    """An on-path attacker duplicates one of an honest client's messages."""

    def duplicate(ftype: FrameType, payload: bytes) -> list[tuple[FrameType, bytes]]:
        return [(ftype, payload)] * (2 if ftype is twice else 1)

    with Peer(arena.addr) as peer:
        if twice is T.KEY_NEGOTIATION:
            assert client_handshake(peer, arena.psk, out=duplicate).established
        else:
            with pytest.raises(ProtocolError, match="^receiver: authentication failed$"):
                client_handshake(peer, arena.psk, out=duplicate)
        expect_refused(peer, 1, message)
    arena.unharmed()


# ---------------------------------------------------------------- tampering with fields

CLIENT_FIELDS = [
    # (message, field index, field name, wire code of the ERROR, or None: closed silently)
    (T.INIT, 0, "version", 1),
    (T.CLIENT_HELLO, 0, "version", 1),
    (T.CLIENT_HELLO, 1, "suite", 1),
    (T.CLIENT_HELLO, 2, "key_id", 3),
    (T.CLIENT_HELLO, 3, "nonce", 3),
    (T.CLIENT_HELLO, 4, "time", 3),
    (T.CLIENT_AUTH, 0, "mac", 3),
    (T.KEY_NEGOTIATION, 0, "public", 3),
    (T.KEY_NEGOTIATION, 1, "mac", 3),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("msg", "index", "name", "code"),
    CLIENT_FIELDS,
    ids=[f"{m.name}.{n}" for m, _, n, _ in CLIENT_FIELDS],
)
def test_flipped_field_of_a_client_message(
    arena: Arena, msg: FrameType, index: int, name: str, code: int | None
) -> None:
    """An on-path attacker flips one bit of one field of an honest client's message."""

    def flip(ftype: FrameType, payload: bytes) -> list[tuple[FrameType, bytes]]:
        return [(ftype, flip_field(payload, index) if ftype is msg else payload)]

    with Peer(arena.addr) as peer:
        with pytest.raises((StxError, ConnectionError)) as err:
            client_handshake(peer, arena.psk, out=flip)
        if code is None:
            assert isinstance(err.value, ConnectionError)
            expect_refused(peer, None)
        elif name == "version":
            # Another version is told as such, even before authentication (it reveals nothing
            # of the key): an older or newer peer learns why it is refused.
            text = str(err.value)
            assert text.startswith("receiver: unsupported protocol version '"), text
            assert "this side speaks stx3" in text, text
            expect_refused(peer, code, text.removeprefix("receiver: "))
        else:
            assert str(err.value) == f"receiver: {AUTH}"
            expect_refused(peer, code, AUTH)
    arena.unharmed()


SERVER_FIELDS = [
    # (message, field index, field name, what the honest client raises)
    (T.SERVER_HELLO, 0, "version", "^unsupported protocol version( |$)"),
    (T.SERVER_HELLO, 1, "suite", "^unsupported cipher suite$"),
    (T.SERVER_HELLO, 2, "nonce", "^receiver: authentication failed$"),
    (T.SERVER_HELLO, 3, "time", "^receiver: authentication failed$"),
    (T.SERVER_AUTH, 0, "mac", r"^authentication failed \(the receiver does not hold this key\)$"),
    (T.KEY_CONFIRMATION, 0, "public", "^(authentication failed|key exchange failed)"),
    (T.KEY_CONFIRMATION, 1, "mac", r"^authentication failed \(bad key confirmation\)$"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("msg", "index", "name", "raised"),
    SERVER_FIELDS,
    ids=[f"{m.name}.{n}" for m, _, n, _ in SERVER_FIELDS],
)
def test_flipped_field_of_a_receiver_message(
    arena: Arena, msg: FrameType, index: int, name: str, raised: str
) -> None:
    """An on-path attacker flips one bit of one field of the receiver's message: the honest
    client (or, for what only enters the transcript, the receiver) notices, and no session
    ever reaches the point where data is accepted."""

    def flip(ftype: FrameType, payload: bytes) -> tuple[FrameType, bytes]:
        return ftype, flip_field(payload, index) if ftype is msg else payload

    with Peer(arena.addr) as peer:
        with pytest.raises(StxError, match=raised):
            client_handshake(peer, arena.psk, inn=flip)
    arena.unharmed()


# ---------------------------------------------------------------- order of messages

ORDER_CASES = {
    # name: (frames sent, wire code of the ERROR or None for a silent close)
    "CLIENT_HELLO first": ([T.CLIENT_HELLO], None),
    "CLIENT_AUTH first": ([T.CLIENT_AUTH], None),
    "KEY_NEGOTIATION first": ([T.KEY_NEGOTIATION], None),
    "SERVER_HELLO first": ([T.SERVER_HELLO], None),
    "missing CLIENT_HELLO": ([T.INIT, T.CLIENT_AUTH], 1),
    "missing CLIENT_HELLO and CLIENT_AUTH": ([T.INIT, T.KEY_NEGOTIATION], 1),
    "missing CLIENT_AUTH": ([T.INIT, T.CLIENT_HELLO, T.KEY_NEGOTIATION], 1),
    "CLIENT_AUTH before CLIENT_HELLO": ([T.INIT, T.CLIENT_AUTH, T.CLIENT_HELLO], 1),
    "a server message from the client": ([T.INIT, T.SERVER_HELLO], 1),
    "INIT after CLIENT_HELLO": ([T.INIT, T.CLIENT_HELLO, T.INIT], 1),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_out_of_order_and_missing_messages(arena: Arena, case: str) -> None:
    frames, code = ORDER_CASES[case]
    with Peer(arena.addr) as peer:
        peer.send_bytes(b"".join(encode_frame(f, _sample(f, arena)) for f in frames))
        seen = expect_refused(peer, code, AUTH if code else None)
        assert [t for t, _ in seen] == ([T.SERVER_HELLO] if frames[0] is T.INIT else [])
    arena.unharmed()


@pytest.mark.timeout(60)
def test_a_message_that_never_comes_is_cut_at_the_deadline(arena: Arena) -> None:
    """CLIENT_AUTH never follows CLIENT_HELLO: the receiver gives up at its handshake timeout."""
    with Peer(arena.addr) as peer:
        started = time.monotonic()
        peer.send_bytes(encode_frame(T.INIT, Init().encode()))
        peer.send_bytes(encode_frame(T.CLIENT_HELLO, _hello(arena)))
        expect_refused(peer, 4)
        took = time.monotonic() - started
    assert arena.receiver.handshake_timeout - 0.2 <= took <= arena.receiver.handshake_timeout + 2
    arena.unharmed()


# ---------------------------------------------------------------- data before confirmation

DATA_TYPES = [T.METADATA, T.JOIN, T.BLOCK, T.END]
#: a JOIN as the first frame opens a data stream: that is test_live_data's subject
EARLY_DATA = [
    (stage, data)
    for stage in ("first frame", "after INIT", "after CLIENT_AUTH")
    for data in DATA_TYPES
    if not (stage == "first frame" and data is T.JOIN)
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("stage", "data"), EARLY_DATA, ids=[f"{d.name}-{s}" for s, d in EARLY_DATA]
)
def test_data_before_key_confirmation(arena: Arena, stage: str, data: FrameType) -> None:
    """METADATA, JOIN, BLOCK or END before the handshake is done. 'after CLIENT_AUTH' needs the
    key to get there (an on-path attacker could insert the frame after an honest client's
    CLIENT_AUTH just the same)."""
    payload = os.urandom(60)
    if data is T.JOIN:
        payload = msgpack.packb(["stx2", os.urandom(16), 0, os.urandom(32)], use_bin_type=True)
    with Peer(arena.addr) as peer:
        if stage == "after INIT":
            peer.send_frame(T.INIT, Init().encode())
            assert peer.recv_frame() is not None
        elif stage == "after CLIENT_AUTH":
            client_handshake(peer, arena.psk, until=T.SERVER_AUTH)
        peer.send_frame(data, payload)
        expect_refused(
            peer, None if stage == "first frame" else 1, None if stage == "first frame" else AUTH
        )
    arena.unharmed()


@pytest.mark.timeout(60)
def test_forged_metadata_after_an_honest_handshake(arena: Arena) -> None:
    """An on-path attacker lets an honest handshake through and slips in its own METADATA
    before the client's: it cannot seal one."""
    with Peer(arena.addr) as peer:
        assert client_handshake(peer, arena.psk).established
        peer.send_frame(T.METADATA, os.urandom(120))
        expect_refused(peer, 3, "METADATA failed authentication")
    arena.unharmed()


@pytest.mark.timeout(60)
def test_metadata_replayed_from_an_earlier_session(arena: Arena) -> None:
    """The attacker recorded an earlier session's METADATA and replays it in place of a new
    session's: the keys and the session id differ, so it does not open."""
    md = make_metadata("replayed.bin", 3 * 4096)
    first = open_session(arena.addr, arena.psk, md)
    # the METADATA frame (the MANIFEST chunks follow it)
    (recorded,) = [f for f in first.peer.sent if split_frame(f)[0] is T.METADATA]
    first.close()
    arena.nothing_marked("replayed.bin")
    with Peer(arena.addr) as peer:
        assert client_handshake(peer, arena.psk).established
        peer.send_bytes(recorded)
        expect_refused(peer, 3, "METADATA failed authentication")
    arena.nothing_marked("replayed.bin")
    arena.clean()
    arena.unharmed()


# ---------------------------------------------------------------- reflection


@pytest.mark.timeout(60)
def test_client_auth_reflected_back_as_server_auth(arena: Arena) -> None:
    """The on-path attacker bounces the honest client's CLIENT_AUTH back as SERVER_AUTH
    (and never forwards it): the client's MAC key and label differ from the server's."""
    hs = ClientHandshake(psk=arena.psk, now_ms=now_ms())
    with Peer(arena.addr) as peer:
        peer.send_frames(hs.start())
        got = peer.recv_frame()
        assert got is not None and got[0] is T.SERVER_HELLO
        hello, auth = (split_frame(f) for f in hs.receive(*got, now_ms=now_ms()))
        peer.send_frame(*hello)  # CLIENT_HELLO goes through, CLIENT_AUTH is kept back
        with pytest.raises(AuthError, match="does not hold this key"):
            hs.receive(T.SERVER_AUTH, auth[1], now_ms=now_ms())
        assert hs.session is None
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "reflected", ["SERVER_AUTH as CLIENT_AUTH", "KEY_CONFIRMATION as KEY_NEGOTIATION"]
)
def test_receiver_messages_reflected_back_to_it(arena: Arena, reflected: str) -> None:
    """The attacker records the receiver's SERVER_AUTH / KEY_CONFIRMATION from one honest
    handshake and bounces it back to the receiver in the client's place on another."""
    with Peer(arena.addr) as first:
        assert client_handshake(first, arena.psk).established
        captured = {t: p for t, p in first.received}
        sent = {split_frame(f)[0]: split_frame(f)[1] for f in first.sent}
    if reflected.startswith("SERVER_AUTH"):
        with Peer(arena.addr) as peer:
            peer.send_frame(T.INIT, Init().encode())
            assert peer.recv_frame() is not None
            peer.send_frame(T.CLIENT_HELLO, sent[T.CLIENT_HELLO])
            peer.send_frame(T.CLIENT_AUTH, captured[T.SERVER_AUTH])
            expect_refused(peer, 3, AUTH)
    else:

        def swap(ftype: FrameType, payload: bytes) -> list[tuple[FrameType, bytes]]:
            if ftype is T.KEY_NEGOTIATION:
                return [(ftype, captured[T.KEY_CONFIRMATION])]
            return [(ftype, payload)]

        with Peer(arena.addr) as peer:
            with pytest.raises(AuthError, match="^receiver: authentication failed$"):
                client_handshake(peer, arena.psk, out=swap)
            expect_refused(peer, 3, AUTH)
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("retype", [False, True], ids=["as-is", "retyped"])
def test_receiver_talking_to_itself(arena: Arena, retype: bool) -> None:
    """Two connections to the receiver, each fed what the receiver said on the other (as it
    was, or re-typed as the client message expected next)."""
    a, b = Peer(arena.addr), Peer(arena.addr)
    try:
        for p in (a, b):
            p.send_frame(T.INIT, Init().encode())
        got_a, got_b = a.recv_frame(), b.recv_frame()
        assert got_a is not None and got_b is not None
        as_type = T.CLIENT_HELLO if retype else T.SERVER_HELLO
        b.send_frame(as_type, got_a[1])
        a.send_frame(as_type, got_b[1])
        for p in (a, b):
            expect_refused(p, 1, AUTH)
    finally:
        a.close()
        b.close()
    arena.unharmed()


# ---------------------------------------------------------------- X25519


@pytest.mark.timeout(60)
def test_low_order_key_shares_with_a_valid_mac(arena: Arena) -> None:
    """Needs the key to build the MAC (so that the X25519 check is what is reached): each key
    share that is a low-order point gives an AuthError-coded ERROR and no session."""
    for point in LOW_ORDER_POINTS:
        with Peer(arena.addr) as peer:
            client_handshake(peer, arena.psk, until=T.SERVER_AUTH)
            th = peer.transcript.digest()  # INIT .. SERVER_AUTH, as the receiver hashed them
            peer.send_frame(T.KEY_NEGOTIATION, key_share(arena.psk, th, bytes.fromhex(point)))
            seen = expect_refused(peer, 3, AUTH)
            assert T.KEY_CONFIRMATION not in [t for t, _ in seen], point
        arena.settle()
        assert "low-order" in arena.kinds("rejected")[-1]["error"], point
        arena.nothing_written()
    arena.unharmed()


@pytest.mark.timeout(60)
def test_a_valid_key_share_built_the_same_way_is_accepted(arena: Arena) -> None:
    """Control for the test above: the same hand-built KEY_NEGOTIATION with a real public key
    is answered with KEY_CONFIRMATION (so the refusal above is the X25519 check)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    with Peer(arena.addr) as peer:
        client_handshake(peer, arena.psk, until=T.SERVER_AUTH)
        th = peer.transcript.digest()
        public = X25519PrivateKey.generate().public_key().public_bytes_raw()
        peer.send_frame(T.KEY_NEGOTIATION, key_share(arena.psk, th, public))
        got = peer.recv_frame()
        assert got is not None and got[0] is T.KEY_CONFIRMATION
    arena.unharmed()


# ---------------------------------------------------------------- length fields

LENGTH_CASES = {
    # name: (bytes sent, INIT first?, wire code of the ERROR or None for a silent close)
    "INIT length 0": (raw_frame(T.INIT, b""), False, None),
    "INIT length max, garbage": (raw_frame(T.INIT, os.urandom(512)), False, None),
    "INIT length max+1": (raw_frame(T.INIT, b"", length=513), False, None),
    "INIT length 2^32-1": (raw_frame(T.INIT, b"", length=2**32 - 1), False, None),
    "JOIN length 2^32-1": (raw_frame(T.JOIN, b"", length=2**32 - 1), False, None),
    "BLOCK length 2^32-1": (raw_frame(T.BLOCK, b"", length=2**32 - 1), False, None),
    "unknown type 0xff": (raw_frame(0xFF, b"\x00" * 8), False, None),
    "INIT trailing byte": (raw_frame(T.INIT, Init().encode() + b"\x00"), False, None),
    "CLIENT_HELLO length 0": (raw_frame(T.CLIENT_HELLO, b""), True, 1),
    "CLIENT_HELLO length max": (raw_frame(T.CLIENT_HELLO, os.urandom(512)), True, 1),
    "CLIENT_HELLO length max+1": (raw_frame(T.CLIENT_HELLO, b"", length=513), True, 1),
    "CLIENT_HELLO length 2^32-1": (
        raw_frame(T.CLIENT_HELLO, b"", length=2**32 - 1),
        True,
        1,
    ),
    "CLIENT_AUTH length 2^32-1": (raw_frame(T.CLIENT_AUTH, b"", length=2**32 - 1), True, 1),
    "unknown type mid-handshake": (raw_frame(0x7F, b""), True, 1),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(LENGTH_CASES))
def test_length_fields(arena: Arena, case: str) -> None:
    """Caps are checked on the header, before anything is allocated or waited for: an
    oversized length is refused at once, not after the handshake timeout."""
    data, init_first, code = LENGTH_CASES[case]
    with Peer(arena.addr) as peer:
        if init_first:
            peer.send_frame(T.INIT, Init().encode())
            assert peer.recv_frame() is not None
        started = time.monotonic()
        peer.send_bytes(data)
        expect_refused(peer, code, AUTH if code else None)
        assert time.monotonic() - started < arena.receiver.handshake_timeout * 0.8
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("closes", [True, False], ids=["then-eof", "then-silence"])
def test_truncated_frame(arena: Arena, closes: bool) -> None:
    """CLIENT_HELLO cut short: the receiver ends the connection (at EOF, or at its deadline),
    saying so with a connection-failure ERROR."""
    frame = encode_frame(T.CLIENT_HELLO, _hello(arena))
    with Peer(arena.addr) as peer:
        peer.send_frame(T.INIT, Init().encode())
        assert peer.recv_frame() is not None
        peer.send_bytes(frame[: len(frame) // 2])
        if closes:
            peer.sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        expect_refused(peer, 4)
        took = time.monotonic() - started
    timeout = arena.receiver.handshake_timeout
    assert took < (timeout * 0.8 if closes else timeout + 2)
    arena.unharmed()


@pytest.mark.timeout(60)
def test_trailing_bytes_in_a_handshake_frame(arena: Arena) -> None:
    """An honest CLIENT_HELLO with one byte too many inside its frame."""

    def pad(ftype: FrameType, payload: bytes) -> list[tuple[FrameType, bytes]]:
        return [(ftype, payload + b"\xc0" if ftype is T.CLIENT_HELLO else payload)]

    with Peer(arena.addr) as peer:
        with pytest.raises(ProtocolError, match="^receiver: authentication failed$"):
            client_handshake(peer, arena.psk, out=pad)
        expect_refused(peer, 1, AUTH)
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (
            raw_frame(T.METADATA, b"", length=MAX_METADATA_PAYLOAD + 1),
            f"METADATA frame of {MAX_METADATA_PAYLOAD + 1} bytes exceeds the limit of "
            f"{MAX_METADATA_PAYLOAD}",
        ),
        (
            raw_frame(T.METADATA, b"", length=2**32 - 1),
            f"METADATA frame of 4294967295 bytes exceeds the limit of {MAX_METADATA_PAYLOAD}",
        ),
        (b"\xff" * 5, "unknown frame type 0xff"),
        (raw_frame(T.METADATA, b""), "METADATA failed authentication"),
    ],
    ids=["metadata-max+1", "metadata-2^32-1", "trailing-garbage", "metadata-length-0"],
)
def test_length_fields_right_after_the_handshake(arena: Arena, tail: bytes, message: str) -> None:
    """After an honest handshake, an on-path attacker appends a frame header of its own."""
    with Peer(arena.addr) as peer:
        assert client_handshake(peer, arena.psk).established
        peer.send_bytes(tail)
        expect_refused(peer, 3 if "authentication" in message else 1, message)
    arena.unharmed()


@pytest.mark.timeout(60)
def test_init_in_single_bytes_is_reassembled(arena: Arena) -> None:
    """Control for the length tests: INIT is fixed bytes, and sent one byte per write it is
    still reassembled (the receiver does not depend on write boundaries)."""
    init = encode_frame(T.INIT, Init().encode())
    assert init == bytes.fromhex("0000000006") + b"\x91\xa4stx3"
    with Peer(arena.addr) as peer:
        for byte in init:
            peer.send_bytes(bytes([byte]))
        got = peer.recv_frame()
        assert got is not None and got[0] is T.SERVER_HELLO
    arena.unharmed()
