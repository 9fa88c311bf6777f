"""Framing and message codecs: round trips, recorded frames, FrameBuffer, malformed input."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stxpar import wire
from stxpar.errors import ProtocolError
from stxpar.wire import (
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
    Metadata,
    MetadataAck,
    Receipt,
    ServerHello,
    encode_frame,
)

U64 = (1 << 64) - 1
FUZZ = settings(max_examples=200, deadline=None)

#: Every message class with a codec.
CODECS: list[type[Any]] = [
    Init,
    ServerHello,
    ClientHello,
    MacOnly,
    KeyShare,
    ErrorMsg,
    Metadata,
    MetadataAck,
    End,
    Receipt,
    Join,
    Ack,
]


def _b(n: int, fill: int = 0x5A) -> bytes:
    return bytes([fill]) * n


#: One valid instance of every message (used to build malformed variants).
SAMPLES: dict[type[Any], Any] = {
    Init: Init(),
    ServerHello: ServerHello(nonce=_b(32), time_ms=1_700_000_000_000),
    ClientHello: ClientHello(key_id=_b(8), nonce=_b(32, 1), time_ms=5),
    MacOnly: MacOnly(mac=_b(32)),
    KeyShare: KeyShare(public=_b(32), mac=_b(32, 2)),
    ErrorMsg: ErrorMsg(code=3, message="authentication failed"),
    Metadata: Metadata(
        name="a.bin",
        size=12345,
        mtime_ns=-5,
        block_size=4096,
        file_id=_b(16),
        streams=4,
        rekey_records=100,
        rekey_bytes=1 << 20,
    ),
    MetadataAck: MetadataAck(have=b"\x01\x00"),
    End: End(total_blocks=4, digest=_b(32)),
    Receipt: Receipt(digest=_b(32), size=12345),
    Join: Join(session_id=_b(16), stream=3, mac=_b(32)),
    Ack: Ack(durable=(0, 1, 2), resend=(7,)),
}


def _fields(msg: Any) -> list[Any]:
    """The plain msgpack list a message encodes to."""
    obj = msgpack.unpackb(msg.encode(), raw=False)
    assert isinstance(obj, list)
    return obj


# ---------------------------------------------------------------- round trips

names = st.text(max_size=200).filter(lambda s: len(s.encode()) <= wire.MAX_NAME_BYTES)
block_ints = st.integers(0, wire.MAX_BLOCKS)

STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Init: st.just(Init()),
    ServerHello: st.builds(ServerHello, st.binary(min_size=32, max_size=32), st.integers(0, U64)),
    ClientHello: st.builds(
        ClientHello,
        st.binary(min_size=8, max_size=8),
        st.binary(min_size=32, max_size=32),
        st.integers(0, U64),
    ),
    MacOnly: st.builds(MacOnly, st.binary(min_size=32, max_size=32)),
    KeyShare: st.builds(
        KeyShare, st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32)
    ),
    ErrorMsg: st.builds(ErrorMsg, st.integers(0, 255), st.text(max_size=200)),
    Metadata: st.builds(
        Metadata,
        names,
        st.integers(0, 1 << 43),
        st.integers(-(1 << 63), (1 << 63) - 1),
        st.integers(wire.MIN_BLOCK_SIZE, wire.MAX_BLOCK_SIZE),
        st.binary(min_size=16, max_size=16),
        st.integers(1, wire.MAX_STREAMS),
        st.integers(1, 1 << 24),
        st.integers(1, 1 << 36),
    ),
    MetadataAck: st.builds(MetadataAck, st.binary(max_size=1000)),
    End: st.builds(End, block_ints, st.binary(min_size=32, max_size=32)),
    Receipt: st.builds(Receipt, st.binary(min_size=32, max_size=32), st.integers(0, 1 << 62)),
    Join: st.builds(
        Join,
        st.binary(min_size=16, max_size=16),
        st.integers(0, wire.MAX_STREAMS - 1),
        st.binary(min_size=32, max_size=32),
    ),
    Ack: st.builds(
        Ack,
        st.lists(block_ints, max_size=50).map(tuple),
        st.lists(block_ints, max_size=50).map(tuple),
    ),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_round_trip(cls: type[Any]) -> None:
    @settings(max_examples=100, deadline=None)
    @given(STRATEGIES[cls])
    def check(msg: Any) -> None:
        payload = msg.encode()
        assert cls.decode(payload) == msg
        assert cls.decode(payload).encode() == payload

    check()


BOUNDARY_MESSAGES = [
    ServerHello(nonce=bytes(32), time_ms=0),
    ServerHello(nonce=bytes(32), time_ms=U64),
    ErrorMsg(code=255, message=""),
    ErrorMsg(code=0, message="\U0001f600" * 200),
    Metadata(
        name="n" * wire.MAX_NAME_BYTES,
        size=wire.MAX_BLOCKS * wire.MIN_BLOCK_SIZE,
        mtime_ns=(1 << 63) - 1,
        block_size=wire.MIN_BLOCK_SIZE,
        file_id=bytes(16),
        streams=wire.MAX_STREAMS,
        rekey_records=1 << 24,
        rekey_bytes=1 << 36,
    ),
    Metadata(
        name="",
        size=0,
        mtime_ns=-(1 << 63),
        block_size=wire.MAX_BLOCK_SIZE,
        file_id=bytes(16),
        streams=1,
        rekey_records=1,
        rekey_bytes=1,
    ),
    End(total_blocks=wire.MAX_BLOCKS, digest=bytes(32)),
    Receipt(digest=bytes(32), size=1 << 62),
    Join(session_id=bytes(16), stream=wire.MAX_STREAMS - 1, mac=bytes(32)),
    Ack(durable=(), resend=()),
    Ack(durable=(wire.MAX_BLOCKS,), resend=(0,)),
    MetadataAck(have=b""),
]


@pytest.mark.parametrize("msg", BOUNDARY_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_at_the_limits(msg: Any) -> None:
    assert type(msg).decode(msg.encode()) == msg


def test_error_message_is_truncated_on_encode() -> None:
    decoded = ErrorMsg.decode(ErrorMsg(code=1, message="x" * 1000).encode())
    assert decoded.message == "x" * 200


# ---------------------------------------------------------------- recorded frames

# Generated once with the codecs above and pinned: any change to the framing or to a message's
# field order or encoding makes these fail.
RECORDED_CLIENT_HELLO = bytes.fromhex(
    "020000005895a473747831bc7832353531392d686b64662d7368613235362d61657332353667636dc4080001"
    "020304050607c420202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3fcf000001"
    "8bcfe56800"
)
RECORDED_METADATA = bytes.fromhex(
    "070000004098aa7265706f72742e62696ece00989680cf17979cfe3d85cd15ce00400000c410a0a1a2a3a4a5"
    "a6a7a8a9aaabacadaeaf04ce01000000cf0000001000000000"
)
RECORDED_ACK = bytes.fromhex("120000000d92930001cd012c91ce00011170")

RECORDED = [
    pytest.param(
        RECORDED_CLIENT_HELLO,
        FrameType.CLIENT_HELLO,
        ClientHello(
            key_id=bytes(range(8)), nonce=bytes(range(0x20, 0x40)), time_ms=1_700_000_000_000
        ),
        id="client-hello",
    ),
    pytest.param(
        RECORDED_METADATA,
        FrameType.METADATA,
        Metadata(
            name="report.bin",
            size=10_000_000,
            mtime_ns=1_700_000_000_123_456_789,
            block_size=4 << 20,
            file_id=bytes(range(0xA0, 0xB0)),
            streams=4,
            rekey_records=1 << 24,
            rekey_bytes=1 << 36,
        ),
        id="metadata",
    ),
    pytest.param(RECORDED_ACK, FrameType.ACK, Ack(durable=(0, 1, 300), resend=(70000,)), id="ack"),
]


@pytest.mark.parametrize(("raw", "ftype", "expected"), RECORDED)
def test_recorded_frame_parse_and_reserialise(raw: bytes, ftype: FrameType, expected: Any) -> None:
    buf = FrameBuffer(cap=lambda t: 1 << 20)
    buf.feed(raw)
    frame = buf.next_frame()
    assert frame is not None
    got_type, payload = frame
    assert got_type is ftype
    assert buf.pending == 0
    msg = type(expected).decode(payload)
    assert msg == expected
    assert encode_frame(got_type, msg.encode()) == raw


def test_frame_header_layout() -> None:
    frame = encode_frame(FrameType.JOIN, b"abc")
    assert frame == b"\x10\x00\x00\x00\x03abc"
    assert encode_frame(FrameType.INIT, b"") == b"\x00" * 5


# ---------------------------------------------------------------- FrameBuffer

BIG = 1 << 20


def _cap(limit: int) -> Callable[[FrameType], int]:
    return lambda ftype: limit


def test_framebuffer_byte_at_a_time() -> None:
    frames = [
        (FrameType.INIT, Init().encode()),
        (FrameType.SERVER_HELLO, SAMPLES[ServerHello].encode()),
        (FrameType.END, b""),
        (FrameType.ACK, RECORDED_ACK[5:]),
    ]
    stream = b"".join(encode_frame(t, p) for t, p in frames)
    buf = FrameBuffer(cap=_cap(BIG))
    got: list[tuple[FrameType, bytes]] = []
    ends = set()
    pos = 0
    for _, p in frames:
        pos += 5 + len(p)
        ends.add(pos)
    for i in range(len(stream)):
        buf.feed(stream[i : i + 1])
        frame = buf.next_frame()
        if i + 1 in ends:
            assert frame is not None, f"frame not complete at byte {i + 1}"
            got.append(frame)
            assert buf.next_frame() is None
        else:
            assert frame is None, f"frame returned early at byte {i + 1}"
    assert got == frames
    assert buf.pending == 0


def test_framebuffer_several_frames_in_one_feed() -> None:
    buf = FrameBuffer(cap=_cap(BIG))
    buf.feed(RECORDED_ACK + RECORDED_METADATA + RECORDED_ACK[:3])
    assert buf.next_frame() == (FrameType.ACK, RECORDED_ACK[5:])
    assert buf.next_frame() == (FrameType.METADATA, RECORDED_METADATA[5:])
    assert buf.next_frame() is None
    assert buf.pending == 3


@pytest.mark.parametrize("cut", range(len(RECORDED_CLIENT_HELLO)))
def test_framebuffer_truncated_frame_returns_none(cut: int) -> None:
    buf = FrameBuffer(cap=_cap(512))
    buf.feed(RECORDED_CLIENT_HELLO[:cut])
    assert buf.next_frame() is None
    assert buf.next_frame() is None
    assert buf.pending == cut
    buf.feed(RECORDED_CLIENT_HELLO[cut:])
    assert buf.next_frame() == (FrameType.CLIENT_HELLO, RECORDED_CLIENT_HELLO[5:])


@pytest.mark.parametrize("length", [513, 1 << 16, (1 << 32) - 1])
def test_framebuffer_oversized_rejected_before_payload(length: int) -> None:
    buf = FrameBuffer(cap=_cap(512))
    buf.feed(struct.pack(">BI", FrameType.CLIENT_HELLO, length))  # header only, no payload
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        buf.next_frame()


def test_framebuffer_length_at_cap_waits_for_payload() -> None:
    buf = FrameBuffer(cap=_cap(512))
    buf.feed(struct.pack(">BI", FrameType.CLIENT_HELLO, 512))
    assert buf.next_frame() is None
    buf.feed(bytes(512))
    assert buf.next_frame() == (FrameType.CLIENT_HELLO, bytes(512))


def test_framebuffer_cap_is_per_type() -> None:
    def cap(ftype: FrameType) -> int:
        return 100 if ftype is FrameType.BLOCK else -1  # -1: this type is not allowed at all

    buf = FrameBuffer(cap=cap)
    buf.feed(encode_frame(FrameType.BLOCK, bytes(100)))
    assert buf.next_frame() == (FrameType.BLOCK, bytes(100))
    buf.feed(encode_frame(FrameType.ACK, b""))
    with pytest.raises(ProtocolError):
        buf.next_frame()


UNKNOWN_TYPES = sorted(set(range(256)) - {int(t) for t in FrameType})


@pytest.mark.parametrize("raw_type", UNKNOWN_TYPES)
def test_framebuffer_unknown_type_rejected(raw_type: int) -> None:
    buf = FrameBuffer(cap=_cap(BIG))
    buf.feed(struct.pack(">BI", raw_type, 0))
    with pytest.raises(ProtocolError, match="unknown frame type"):
        buf.next_frame()


def test_parse_header_direct() -> None:
    assert wire.parse_header(b"\x11\x00\x00\x01\x00", cap=_cap(256)) == (FrameType.BLOCK, 256)
    with pytest.raises(ProtocolError):
        wire.parse_header(b"\x11\x00\x00\x01\x01", cap=_cap(256))
    with pytest.raises(ProtocolError):
        wire.parse_header(b"\xff\x00\x00\x00\x00", cap=_cap(256))


@pytest.mark.timeout(30)
@FUZZ
@given(st.lists(st.binary(max_size=700), max_size=8))
def test_framebuffer_garbage_only_protocol_errors(chunks: list[bytes]) -> None:
    buf = FrameBuffer(cap=_cap(512))
    for chunk in chunks:
        buf.feed(chunk)
        try:
            while (frame := buf.next_frame()) is not None:
                ftype, payload = frame
                assert isinstance(ftype, FrameType)
                assert len(payload) <= 512
        except ProtocolError:
            return
        # Once drained, what stays buffered is less than one header plus one capped payload.
        assert buf.pending < 5 + 512


# ---------------------------------------------------------------- malformed messages


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_truncated_and_extended_payloads(cls: type[Any]) -> None:
    payload = SAMPLES[cls].encode()
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            cls.decode(payload[:cut])
    for extra in (b"\x00", b"\xc0", payload):
        with pytest.raises(ProtocolError):
            cls.decode(payload + extra)


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_wrong_number_of_fields(cls: type[Any]) -> None:
    fields = _fields(SAMPLES[cls])
    for variant in (fields[:-1], [*fields, 0], [*fields, *fields], []):
        with pytest.raises(ProtocolError):
            cls.decode(msgpack.packb(variant, use_bin_type=True))


NOT_AN_ARRAY = [None, 0, "stx1", b"stx1", {"a": 1}, 1.5, True]


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_top_level_not_an_array(cls: type[Any]) -> None:
    for obj in NOT_AN_ARRAY:
        with pytest.raises(ProtocolError):
            cls.decode(msgpack.packb(obj, use_bin_type=True))
    fields = _fields(SAMPLES[cls])
    as_map = {str(i): v for i, v in enumerate(fields)}
    with pytest.raises(ProtocolError):
        cls.decode(msgpack.packb(as_map, use_bin_type=True))


def _wrong_types(value: Any) -> list[Any]:
    """Values of a different msgpack type than ``value`` (never valid in its place)."""
    common: list[Any] = [None, 1.5, {"k": 1}]
    if isinstance(value, bool):
        raise AssertionError("no bool fields")
    if isinstance(value, int):
        return [*common, True, False, str(value), str(value).encode(), [value]]
    if isinstance(value, bytes):
        return [*common, value.decode("latin-1"), int.from_bytes(value[:8] or b"\x00"), [value]]
    if isinstance(value, str):
        return [*common, value.encode(), 1, [value]]
    if isinstance(value, list):
        return [*common, b"", "", 0]
    raise AssertionError(type(value))


@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_wrong_field_types(cls: type[Any]) -> None:
    fields = _fields(SAMPLES[cls])
    checked = 0
    for i, value in enumerate(fields):
        for bad in _wrong_types(value):
            variant = list(fields)
            variant[i] = bad
            with pytest.raises(ProtocolError):
                cls.decode(msgpack.packb(variant, use_bin_type=True))
            checked += 1
    assert checked >= len(fields) * 4


#: (class, field index) of every fixed-length bytes field.
FIXED_LENGTH_FIELDS = [
    (ServerHello, 2, 32),
    (ClientHello, 2, 8),
    (ClientHello, 3, 32),
    (MacOnly, 0, 32),
    (KeyShare, 0, 32),
    (KeyShare, 1, 32),
    (Metadata, 4, 16),
    (End, 1, 32),
    (Receipt, 0, 32),
    (Join, 1, 16),
    (Join, 3, 32),
]


@pytest.mark.parametrize(
    ("cls", "index", "size"), FIXED_LENGTH_FIELDS, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_wrong_field_lengths(cls: type[Any], index: int, size: int) -> None:
    fields = _fields(SAMPLES[cls])
    assert isinstance(fields[index], bytes) and len(fields[index]) == size
    for n in (0, size - 1, size + 1, 2 * size):
        variant = list(fields)
        variant[index] = bytes(n)
        with pytest.raises(ProtocolError):
            cls.decode(msgpack.packb(variant, use_bin_type=True))


#: (class, field index, value) that are of the right type but out of range or unsupported.
OUT_OF_RANGE = [
    (Init, 0, "stx2"),
    (Init, 0, "STX1"),
    (ServerHello, 0, "stx0"),
    (ServerHello, 1, "x25519-hkdf-sha256-aes128gcm"),
    (ServerHello, 3, -1),
    (ClientHello, 1, ""),
    (ClientHello, 4, -1),
    (ErrorMsg, 0, 256),
    (ErrorMsg, 0, -1),
    (ErrorMsg, 1, "x" * 801),
    (Metadata, 0, "n" * (wire.MAX_NAME_BYTES + 1)),
    (Metadata, 1, -1),
    (Metadata, 1, (1 << 62) + 1),
    (Metadata, 1, 1 << 62),  # fits the size range but gives more than MAX_BLOCKS blocks
    (Metadata, 2, 1 << 63),
    (Metadata, 3, wire.MIN_BLOCK_SIZE - 1),
    (Metadata, 3, wire.MAX_BLOCK_SIZE + 1),
    (Metadata, 5, 0),
    (Metadata, 5, wire.MAX_STREAMS + 1),
    (Metadata, 6, 0),
    (Metadata, 6, (1 << 24) + 1),
    (Metadata, 7, 0),
    (Metadata, 7, (1 << 36) + 1),
    (End, 0, wire.MAX_BLOCKS + 1),
    (End, 0, -1),
    (Receipt, 1, (1 << 62) + 1),
    (Join, 0, "stx2"),
    (Join, 2, wire.MAX_STREAMS),
    (Join, 2, -1),
    (Ack, 0, [wire.MAX_BLOCKS + 1]),
    (Ack, 1, [-1]),
    (Ack, 0, [1, "2"]),
    (Ack, 1, [None]),
    (Ack, 0, [True]),
]


@pytest.mark.parametrize(
    ("cls", "index", "value"), OUT_OF_RANGE, ids=lambda v: getattr(v, "__name__", None)
)
def test_out_of_range_fields(cls: type[Any], index: int, value: Any) -> None:
    variant = _fields(SAMPLES[cls])
    variant[index] = value
    with pytest.raises(ProtocolError):
        cls.decode(msgpack.packb(variant, use_bin_type=True))


MALFORMED_MSGPACK = [
    b"",
    b"\xc1",  # the one byte msgpack never uses
    b"\x91",  # array of one, element missing
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 2^32-1 elements, none present
    b"\x91\xc6\x7f\xff\xff\xff",  # bin32 claiming 2 GiB
    b"\x91\xdb\x7f\xff\xff\xff",  # str32 claiming 2 GiB
    b"\x91" * 5000 + b"\xc0",  # nesting far deeper than any message
    b"\x91\xa2\xff\xfe",  # invalid UTF-8 in a str
    msgpack.packb([{1: 2}]),  # non-string map key
    msgpack.packb([msgpack.ExtType(1, b"x")]),  # ext types are refused
    msgpack.packb([msgpack.Timestamp(0)]),
    msgpack.packb(["stx1"]) + b"\x00",  # trailing bytes
]


@pytest.mark.parametrize("payload", MALFORMED_MSGPACK, ids=range(len(MALFORMED_MSGPACK)))
@pytest.mark.parametrize("cls", CODECS, ids=lambda c: c.__name__)
def test_malformed_msgpack(cls: type[Any], payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        cls.decode(payload)


# ---------------------------------------------------------------- fuzz: only ProtocolError


def _decode_all(payload: bytes) -> None:
    for cls in CODECS:
        try:
            msg = cls.decode(payload)
        except ProtocolError:
            continue
        assert isinstance(msg, cls)
        assert cls.decode(msg.encode()) == msg


@pytest.mark.timeout(30)
@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(msgpack.packb(["stx1"]))
def test_fuzz_arbitrary_bytes(payload: bytes) -> None:
    _decode_all(payload)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.sampled_from(["stx1", wire.SUITE]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)


@pytest.mark.timeout(30)
@FUZZ
@given(st.lists(msgpack_values, min_size=0, max_size=9))
def test_fuzz_structured_arrays(fields: list[Any]) -> None:
    _decode_all(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.timeout(30)
@FUZZ
@given(st.sampled_from(CODECS), st.data())
def test_fuzz_mutated_valid_payloads(cls: type[Any], data: st.DataObject) -> None:
    payload = bytearray(SAMPLES[cls].encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    _decode_all(bytes(payload))
