"""Framing and message codecs: round trips, recorded frames, FrameBuffer, malformed input.

METADATA's body is ``stxpar.manifest.Header`` since stx3 (it replaced ``wire.Metadata``): it runs
through the same codec checks as every wire message here; its own field rules (entries against
chunks, the bounds) and the MANIFEST chunk codec are tested in test_manifest.py and
test_manifest_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stxpar import wire
from stxpar.errors import ProtocolError
from stxpar.manifest import Entry, Header, Kind, decode_chunk, encode_chunk
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
    MetadataAck,
    Receipt,
    ServerHello,
    encode_frame,
)

U64 = (1 << 64) - 1
#: ErrorMsg.encode keeps at most this many bytes of UTF-8 text.
ERROR_TEXT_BYTES = 300
FUZZ = settings(max_examples=200, deadline=None)

#: Every message class with a codec.
CODECS: list[type[Any]] = [
    Init,
    ServerHello,
    ClientHello,
    MacOnly,
    KeyShare,
    ErrorMsg,
    Header,
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
    Header: Header(
        entries=5,
        chunks=2,
        block_size=4096,
        streams=4,
        rekey_records=100,
        rekey_bytes=1 << 20,
        run_id=_b(16, 3),
    ),
    MetadataAck: MetadataAck(have=b"\x05\x00", digests=_b(64, 4)),  # blocks 0 and 2 of <= 16
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

block_ints = st.integers(0, wire.MAX_BLOCKS)
#: ERROR texts that survive encoding unchanged (at most ERROR_TEXT_BYTES of UTF-8).
error_texts = st.text(max_size=300).filter(
    lambda s: len(s.encode()) <= ERROR_TEXT_BYTES and s.isprintable()
)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    """Any valid Header: 1 .. 2**32 chunks, each of 1 .. MAX_CHUNK_ENTRIES entries."""
    count = draw(st.integers(1, 1 << 32))
    return Header(
        draw(st.integers(count, min(1 << 32, count * 4096))),
        count,
        draw(st.integers(wire.MIN_BLOCK_SIZE, wire.MAX_BLOCK_SIZE)),
        draw(st.integers(1, wire.MAX_STREAMS)),
        draw(st.integers(1, 1 << 24)),
        draw(st.integers(1, 1 << 36)),
        draw(st.binary(min_size=16, max_size=16)),
    )


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
    ErrorMsg: st.builds(ErrorMsg, st.integers(0, 255), error_texts),
    Header: headers(),
    MetadataAck: st.builds(MetadataAck, st.binary(max_size=1000), st.binary(max_size=1000)),
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
    ErrorMsg(code=0, message="\U0001f600" * (ERROR_TEXT_BYTES // 4)),
    ErrorMsg(code=0, message="x" * ERROR_TEXT_BYTES),
    Header(
        entries=1 << 32,
        chunks=1 << 32,
        block_size=wire.MIN_BLOCK_SIZE,
        streams=wire.MAX_STREAMS,
        rekey_records=1 << 24,
        rekey_bytes=1 << 36,
        run_id=b"\xff" * 16,
    ),
    Header(
        entries=1 << 32,
        chunks=(1 << 32) // 4096,  # every chunk full
        block_size=wire.MAX_BLOCK_SIZE,
        streams=1,
        rekey_records=1,
        rekey_bytes=1,
        run_id=bytes(16),
    ),
    Header(
        entries=1,
        chunks=1,
        block_size=wire.MAX_BLOCK_SIZE,
        streams=1,
        rekey_records=1,
        rekey_bytes=1,
        run_id=bytes(16),
    ),
    End(total_blocks=wire.MAX_BLOCKS, digest=bytes(32)),
    Receipt(digest=bytes(32), size=1 << 62),
    Join(session_id=bytes(16), stream=wire.MAX_STREAMS - 1, mac=bytes(32)),
    Ack(durable=(), resend=()),
    Ack(durable=(wire.MAX_BLOCKS,), resend=(0,)),
    MetadataAck(have=b""),
    MetadataAck(have=b"\xff" * ((wire.MAX_BLOCKS + 7) // 8), digests=b""),
    MetadataAck(have=b"", digests=bytes(wire.BLOCK_DIGEST_LEN * 1000)),
]


@pytest.mark.parametrize("msg", BOUNDARY_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_at_the_limits(msg: Any) -> None:
    assert type(msg).decode(msg.encode()) == msg


def test_error_message_is_truncated_on_encode() -> None:
    decoded = ErrorMsg.decode(ErrorMsg(code=1, message="x" * 1000).encode())
    assert decoded.message == "x" * ERROR_TEXT_BYTES


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("\U0001f600" * 200, "\U0001f600" * 75),  # 4-byte characters: exactly 300 bytes
        ("x" + "\U0001f600" * 100, "x" + "\U0001f600" * 74),  # the 75th would need 301 bytes
        ("xy" + "\u00e9" * 200, "xy" + "\u00e9" * 149),  # 2-byte: 302 -> drop the split one
        ("\u20ac" * 101, "\u20ac" * 100),  # 3-byte: exactly 300 bytes
        ("x" + "\u20ac" * 100, "x" + "\u20ac" * 99),
        ("\u20ac" * 100, "\u20ac" * 100),  # already fits: unchanged
        ("", ""),
    ],
    ids=["emoji", "emoji-split", "2-byte-split", "3-byte", "3-byte-split", "fits", "empty"],
)
def test_error_message_is_truncated_by_bytes_on_a_character_boundary(
    message: str, expected: str
) -> None:
    payload = ErrorMsg(code=255, message=message).encode()
    assert ErrorMsg.decode(payload) == ErrorMsg(code=255, message=expected)
    assert len(payload) <= wire.MAX_HANDSHAKE_PAYLOAD


@pytest.mark.timeout(30)
@FUZZ
@given(st.integers(0, 255), st.text(max_size=1000).filter(str.isprintable))
def test_error_message_truncation_property(code: int, message: str) -> None:
    payload = ErrorMsg(code=code, message=message).encode()
    # An ERROR frame is read under the handshake cap in every state: it always fits.
    assert len(payload) <= wire.MAX_HANDSHAKE_PAYLOAD
    frame = encode_frame(FrameType.ERROR, payload)
    buf = FrameBuffer(cap=lambda t: wire.MAX_HANDSHAKE_PAYLOAD)
    buf.feed(frame)
    assert buf.next_frame() == (FrameType.ERROR, payload)
    got = ErrorMsg.decode(payload).message
    # The longest prefix (in whole characters) of the text that fits in 300 bytes of UTF-8.
    assert message.startswith(got)
    assert len(got.encode()) <= ERROR_TEXT_BYTES
    if got != message:
        assert len((got + message[len(got)]).encode()) > ERROR_TEXT_BYTES


# ---------------------------------------------------------------- metadata: run id, block count


def test_limits_are_as_documented() -> None:
    assert wire.MAX_BLOCKS == 1 << 22
    assert wire.MAX_CONTROL_PAYLOAD == 72 << 20
    assert wire.MAX_HANDSHAKE_PAYLOAD == 512


def test_header_is_the_metadata_body() -> None:
    # METADATA carries nine fields: the run id (no default: every sender run draws one), then
    # --to's subdirectory ("" for none) and whether --as renamed the top-level entry.
    h = SAMPLES[Header]
    fields = _fields(h)
    assert fields == [5, 2, 4096, 4, 100, 1 << 20, _b(16, 3), "", False]
    assert Header.decode(h.encode()) == h
    for run_id in (bytes(16), b"\xff" * 16, bytes(range(16))):
        again = Header.decode(dataclasses.replace(h, run_id=run_id).encode())
        assert again.run_id == run_id
        assert again == dataclasses.replace(h, run_id=run_id)
    assert not hasattr(wire, "Metadata")


def test_stx2_metadata_is_refused() -> None:
    # The nine-field stx2 Metadata (name, size, mtime, block size, file id, streams, rekey
    # records, rekey bytes, run id) is not a Header.
    old = ["a.bin", 12345, -5, 4096, _b(16), 4, 100, 1 << 20, _b(16, 3)]
    with pytest.raises(ProtocolError):
        Header.decode(msgpack.packb(old, use_bin_type=True))


# ---------------------------------------------------------------- METADATA_ACK: bitmap, digests


def _digests(indices: list[int]) -> bytes:
    return b"".join(bytes([i % 251]) * wire.BLOCK_DIGEST_LEN for i in indices)


@pytest.mark.parametrize(
    ("have", "expected"),
    [
        ([], b""),
        ([0], b"\x00"),
        ([1], b"\x01"),
        ([0, 1], b"\x02"),
        ([1, 0, 1], b"\x05"),
        ([0] * 7 + [1], b"\x80"),  # bit 7 of byte 0
        ([0] * 8 + [1], b"\x00\x01"),  # block 8: bit 0 of byte 1
        ([1] * 8, b"\xff"),
        ([1] * 9, b"\xff\x01"),
        ([1, 0] * 8, b"\x55\x55"),
        ([0, 1] * 8 + [0, 0, 1], b"\xaa\xaa\x04"),
    ],
)
def test_bitmap_packs_least_significant_bit_first(have: list[int], expected: bytes) -> None:
    assert wire.bitmap(bytes(have)) == expected
    assert wire.bitmap(bytearray(have)) == expected
    assert len(expected) == (len(have) + 7) // 8


def test_bitmap_treats_any_nonzero_byte_as_held() -> None:
    assert wire.bitmap(bytes([0, 2, 0xFF, 0])) == b"\x06"


@pytest.mark.timeout(30)
@FUZZ
@given(st.lists(st.booleans(), max_size=300))
def test_bitmap_and_held_agree(flags: list[bool]) -> None:
    held = [i for i, v in enumerate(flags) if v]
    ack = MetadataAck(have=wire.bitmap(bytes(flags)), digests=_digests(held))
    assert ack.held(len(flags)) == held
    decoded = MetadataAck.decode(ack.encode())
    assert decoded == ack
    assert decoded.held(len(flags)) == held


@pytest.mark.parametrize(
    ("have", "total", "expected"),
    [
        (b"", 0, []),
        (b"\x00", 1, []),
        (b"\x01", 1, [0]),
        (b"\x05", 3, [0, 2]),
        (b"\x80", 8, [7]),
        (b"\xff\x01", 9, list(range(9))),
        (b"\x00\x00\x80", 24, [23]),
        (b"\x00\x00\x40", 23, [22]),  # last valid bit of a partial byte
    ],
)
def test_held_returns_the_indices(have: bytes, total: int, expected: list[int]) -> None:
    assert MetadataAck(have=have, digests=_digests(expected)).held(total) == expected


@pytest.mark.parametrize(
    ("have", "total"),
    [
        (b"", 1),  # too short
        (b"\x00", 0),  # too long
        (b"\x00", 9),
        (b"\x00\x00", 8),
        (b"\x00" * 3, 9),
        (b"\x01" * 2, 1),
    ],
)
def test_held_refuses_a_bitmap_of_the_wrong_length(have: bytes, total: int) -> None:
    ack = MetadataAck(have=have, digests=b"")
    with pytest.raises(ProtocolError, match="wrong length"):
        ack.held(total)


@pytest.mark.parametrize(
    ("have", "total"),
    [
        (b"\x02", 1),  # block 1 of a one-block file
        (b"\x80", 7),
        (b"\x08", 3),
        (b"\x01\x02", 9),  # block 9 of nine
        (b"\xff", 5),
        (b"\x00\x00\x80", 23),
    ],
)
def test_held_refuses_bits_past_the_end(have: bytes, total: int) -> None:
    # The digests match the set bits (past the end included), so only the range check refuses.
    n = sum(bin(b).count("1") for b in have)
    ack = MetadataAck(have=have, digests=bytes(wire.BLOCK_DIGEST_LEN * n))
    with pytest.raises(ProtocolError, match="past the end"):
        ack.held(total)


@pytest.mark.parametrize(
    ("have", "total", "n_digests"),
    [
        (b"\x00", 8, 1),  # digests but nothing held
        (b"\x01", 1, 0),  # held but no digest
        (b"\x05", 3, 1),
        (b"\x05", 3, 3),
        (b"\xff\x01", 9, 8),
    ],
)
def test_held_refuses_a_digest_count_mismatch(have: bytes, total: int, n_digests: int) -> None:
    ack = MetadataAck(have=have, digests=bytes(wire.BLOCK_DIGEST_LEN * n_digests))
    with pytest.raises(ProtocolError, match="digests"):
        ack.held(total)


@pytest.mark.parametrize("extra", [1, -1, wire.BLOCK_DIGEST_LEN // 2])
def test_held_refuses_digests_that_are_not_whole(extra: int) -> None:
    ack = MetadataAck(have=b"\x05", digests=bytes(2 * wire.BLOCK_DIGEST_LEN + extra))
    with pytest.raises(ProtocolError):
        ack.held(3)


@pytest.mark.timeout(60)
def test_largest_metadata_ack_fits_the_control_cap() -> None:
    # Every block of a MAX_BLOCKS file held: the bitmap plus a digest per block, sealed (+16
    # bytes of tag), must fit MAX_CONTROL_PAYLOAD; and it decodes and validates.
    total = wire.MAX_BLOCKS
    ack = MetadataAck(have=b"\xff" * (total // 8), digests=bytes(wire.BLOCK_DIGEST_LEN * total))
    payload = ack.encode()
    assert len(payload) + wire.TAG_LEN <= wire.MAX_CONTROL_PAYLOAD
    decoded = MetadataAck.decode(payload)
    assert decoded == ack
    held = decoded.held(total)
    assert len(held) == total and held[0] == 0 and held[-1] == total - 1


def test_metadata_ack_digests_longer_than_the_cap_are_refused() -> None:
    fields = [b"", bytes(wire.MAX_CONTROL_PAYLOAD + 1)]
    with pytest.raises(ProtocolError):
        MetadataAck.decode(msgpack.packb(fields, use_bin_type=True))


# ---------------------------------------------------------------- recorded frames

# Generated once with the codecs above and pinned: any change to the framing or to a message's
# field order or encoding makes these fail.
RECORDED_CLIENT_HELLO = bytes.fromhex(
    "020000005895a473747833bc7832353531392d686b64662d7368613235362d61657332353667636dc4080001"
    "020304050607c420202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3fcf000001"
    "8bcfe56800"
)
# stx3: the Header, seven fields (array 0x97: entries, chunks, block size, streams, rekey
# records, rekey bytes, run id as bin8 of 16 bytes).
RECORDED_METADATA = bytes.fromhex(
    "070000002b990301ce0040000004ce01000000cf0000001000000000c410c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
    "a0c2"
)
# A MANIFEST frame (type 0x0B): [index 0, [entry, entry, entry]], each entry
# [kind, path, size, mode, mtime_ns, link, extents, file_id].
RECORDED_MANIFEST = bytes.fromhex(
    "0b0000005d9200939801a16400cd01edffa090c4009800a7642f612e62696ece00989680cd01a4cf17979cfe"
    "3d85cd15a09400cd1000cd2000cd1000c410a0a1a2a3a4a5a6a7a8a9aaabacadaeaf9802a3642f6c00cd01ff"
    "00a5612e62696e90c400"
)
RECORDED_MANIFEST_ENTRIES = (
    Entry(Kind.DIR, "d", 0, 0o755, -1),
    Entry(
        Kind.FILE,
        "d/a.bin",
        10_000_000,
        0o644,
        1_700_000_000_123_456_789,
        extents=(0, 4096, 8192, 4096),
        file_id=bytes(range(0xA0, 0xB0)),
    ),
    Entry(Kind.SYMLINK, "d/l", 0, 0o777, 0, link="a.bin"),
)
# [bitmap 0x05 (blocks 0 and 2), digests: 2 x 16 bytes], written by hand from the layout.
RECORDED_METADATA_ACK = bytes.fromhex("080000002692c40105c420" + bytes(range(32)).hex())
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
        Header(
            entries=3,
            chunks=1,
            block_size=4 << 20,
            streams=4,
            rekey_records=1 << 24,
            rekey_bytes=1 << 36,
            run_id=bytes(range(0xC0, 0xD0)),
        ),
        id="metadata",
    ),
    pytest.param(
        RECORDED_METADATA_ACK,
        FrameType.METADATA_ACK,
        MetadataAck(have=b"\x05", digests=bytes(range(32))),
        id="metadata-ack",
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


def test_recorded_manifest_frame_parse_and_reserialise() -> None:
    assert FrameType.MANIFEST == 0x0B
    buf = FrameBuffer(cap=lambda t: 1 << 20)
    buf.feed(RECORDED_METADATA + RECORDED_MANIFEST)
    assert buf.next_frame() == (FrameType.METADATA, RECORDED_METADATA[5:])
    frame = buf.next_frame()
    assert frame is not None and buf.pending == 0
    got_type, payload = frame
    assert got_type is FrameType.MANIFEST
    assert decode_chunk(payload) == (0, RECORDED_MANIFEST_ENTRIES)
    assert encode_frame(got_type, encode_chunk(0, RECORDED_MANIFEST_ENTRIES)) == RECORDED_MANIFEST


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
        return [*common, 0, 1, "true", b"\x01", [value]]
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
    (Header, 6, 16),
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
    (Init, 0, "stx2"),  # the previous version
    (Init, 0, "stx1"),
    (Init, 0, "STX1"),
    (ServerHello, 0, "stx0"),
    (ServerHello, 1, "x25519-hkdf-sha256-aes128gcm"),
    (ServerHello, 3, -1),
    (ClientHello, 1, ""),
    (ClientHello, 4, -1),
    (ErrorMsg, 0, 256),
    (ErrorMsg, 0, -1),
    (ErrorMsg, 1, "x" * 801),
    (Header, 0, 0),
    (Header, 0, -1),
    (Header, 0, (1 << 32) + 1),
    (Header, 0, 1),  # fewer entries than chunks (2)
    (Header, 0, 2 * 4096 + 1),  # more entries than 2 chunks can hold
    (Header, 1, 0),
    (Header, 1, 6),  # more chunks than entries (5)
    (Header, 1, (1 << 32) + 1),
    (Header, 2, wire.MIN_BLOCK_SIZE - 1),
    (Header, 2, wire.MAX_BLOCK_SIZE + 1),
    (Header, 3, 0),
    (Header, 3, wire.MAX_STREAMS + 1),
    (Header, 4, 0),
    (Header, 4, (1 << 24) + 1),
    (Header, 5, 0),
    (Header, 5, (1 << 36) + 1),
    (MetadataAck, 0, bytes((wire.MAX_BLOCKS + 7) // 8 + 1)),  # a bitmap for too many blocks
    (End, 0, wire.MAX_BLOCKS + 1),
    (End, 0, -1),
    (Receipt, 1, (1 << 62) + 1),
    (Join, 0, "stx1"),
    (Join, 2, wire.MAX_STREAMS),
    (Join, 2, -1),
    (Ack, 0, [wire.MAX_BLOCKS + 1]),
    (Ack, 1, [-1]),
    (Ack, 0, [1, "2"]),
    (Ack, 1, [None]),
    (Ack, 0, [True]),
]


def test_an_older_version_is_named_in_the_refusal() -> None:
    with pytest.raises(ProtocolError, match="unsupported protocol version 'stx2'.* speaks stx3"):
        Init.decode(msgpack.packb(["stx2"]))
    with pytest.raises(ProtocolError, match="unsupported protocol version$"):  # not echoed
        Init.decode(msgpack.packb(["x" * 17]))


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
    msgpack.packb([wire.VERSION]) + b"\x00",  # trailing bytes
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
@example(msgpack.packb([wire.VERSION]))
def test_fuzz_arbitrary_bytes(payload: bytes) -> None:
    _decode_all(payload)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40)
    | st.sampled_from([wire.VERSION, wire.SUITE]),
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


@pytest.mark.timeout(30)
@FUZZ
@given(st.text(max_size=200))
def test_error_text_from_a_peer_is_made_printable(message: str) -> None:
    """An ERROR's text reaches terminals and logs: control characters (newlines, escape
    sequences) become '?', everything printable stays."""
    got = ErrorMsg.decode(ErrorMsg(code=1, message=message).encode()).message
    assert got.isprintable()
    assert len(got) == len(message)
    for sent, shown in zip(message, got, strict=True):
        assert shown == (sent if sent.isprintable() else "?")


def test_error_text_with_escape_codes_cannot_forge_log_lines() -> None:
    evil = "ok\nreceived /etc/passwd: 1 GiB\x1b[2K\r"
    got = ErrorMsg.decode(ErrorMsg(code=1, message=evil).encode()).message
    assert "\n" not in got and "\x1b" not in got and "\r" not in got
    assert got == "ok?received /etc/passwd: 1 GiB?[2K?"
