"""Record protection: data blocks (CRC vs tag), epochs and nonces, acks, control, joins."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from transfers import one_file

from stxpar import keyschedule as ks
from stxpar import records
from stxpar.blocks import BlockRef, BlockSpace
from stxpar.errors import AuthError, ProtocolError
from stxpar.records import (
    BLOCK_PREFIX,
    BLOCK_SUFFIX,
    AckChannel,
    BlockContext,
    BlockOpener,
    BlockSealer,
    ControlChannel,
    CrcMismatch,
    join_mac,
    verify_join,
)
from stxpar.wire import BLOCK_HEADER, HEADER, TAG_LEN, FrameType

BS = 4096
SID = bytes(range(16))
MID = bytes(range(0xA0, 0xB0))  # the manifest's id
SIZE = 3 * BS + 100  # three full blocks and a short last one


def make_ctx(*, file_size: int = SIZE, **changes: Any) -> BlockContext:
    """The context of a one-file transfer of ``file_size`` bytes (one extent, entry 0)."""
    fields: dict[str, Any] = dict(
        session_id=SID,
        stream=2,
        space=BlockSpace([file_size], block_size=BS),
        manifest_id=MID,
    )
    fields.update(changes)
    return BlockContext(**fields)


def extents_ctx(*extents: tuple[int, ...], **changes: Any) -> BlockContext:
    """The context of a transfer whose entries have these extents (``()``: no data)."""
    return make_ctx(space=BlockSpace.of_extents(extents, block_size=BS), **changes)


def pair(secret: bytes, ctx: BlockContext) -> tuple[BlockSealer, BlockOpener]:
    return BlockSealer(stream_secret=secret, ctx=ctx), BlockOpener(stream_secret=secret, ctx=ctx)


def block(seq: int, size: int = SIZE) -> bytes:
    n = min(BS, size - seq * BS)
    return hashlib.shake_256(seq.to_bytes(4, "big")).digest(n)


def seal(sealer: BlockSealer, seq: int, data: bytes | None = None) -> bytes:
    """A copy of the sealed BLOCK frame (the sealer reuses its buffer)."""
    return bytes(sealer.seal(seq, block(seq) if data is None else data))


def open_frame(opener: BlockOpener, frame: bytes) -> bytes:
    """What a receiver worker does with one BLOCK frame; returns a copy of the plaintext.

    The opener gets the whole BLOCK payload (``seq | size | ct | tag | crc``) and reports the
    index it found in the (CRC-checked) header, which must be the one the frame carries, with
    where that block lies in the opener's block space.
    """
    raw_type, length = HEADER.unpack_from(frame)
    assert raw_type == FrameType.BLOCK and length == len(frame) - HEADER.size
    header_seq, header_size = BLOCK_HEADER.unpack_from(frame, HEADER.size)
    where, plain = opener.open(memoryview(frame)[HEADER.size :])
    assert where.block == header_seq
    assert where.length == header_size
    assert len(plain) == header_size
    return bytes(plain)


def flip(frame: bytes, pos: int, mask: int = 0x01) -> bytes:
    return frame[:pos] + bytes([frame[pos] ^ mask]) + frame[pos + 1 :]


def crc_of(frame: bytes) -> int:
    """The documented CRC-32 (zlib's, independent of the fast one): over ``seq | size | ct |
    tag``, i.e. everything in the BLOCK payload before the CRC itself."""
    return zlib.crc32(frame[HEADER.size : -4])


def recrc(frame: bytes) -> bytes:
    """What an attacker does after changing the header, ciphertext or tag: fix the CRC."""
    return frame[:-4] + struct.pack(">I", crc_of(frame))


def body_frame(seq: int, size: int, ct_len: int, *, good_crc: bool = True) -> bytes:
    """A BLOCK frame with an arbitrary header and ``ct_len`` random ciphertext bytes plus a
    random tag; the CRC is right unless ``good_crc`` is false."""
    payload = BLOCK_HEADER.pack(seq, size) + os.urandom(ct_len + TAG_LEN)
    crc = zlib.crc32(payload) ^ (0 if good_crc else 0xFFFFFFFF)
    payload += struct.pack(">I", crc)
    return HEADER.pack(FrameType.BLOCK, len(payload)) + payload


# ---------------------------------------------------------------- round trips


def test_round_trip_full_and_short_blocks() -> None:
    secret = os.urandom(32)
    sealer, opener = pair(secret, make_ctx())
    for seq in range(4):
        frame = seal(sealer, seq)
        size = len(block(seq))
        assert size == (BS if seq < 3 else 100)
        assert len(frame) == BLOCK_PREFIX + size + BLOCK_SUFFIX
        assert HEADER.unpack_from(frame) == (FrameType.BLOCK, 8 + size + TAG_LEN + 4)
        assert BLOCK_HEADER.unpack_from(frame, HEADER.size) == (seq, size)
        # CRC-32 over the block header, ciphertext and tag (not the frame header).
        assert struct.unpack(">I", frame[-4:])[0] == zlib.crc32(frame[HEADER.size : -4])
        assert block(seq)[:64] not in frame
        assert open_frame(opener, frame) == block(seq)


def test_open_returns_the_index_and_a_plaintext_view() -> None:
    secret = os.urandom(32)
    sealer, opener = pair(secret, make_ctx())
    for seq in (2, 0, 3):  # any order of indices (one record counter)
        where, plain = opener.open(memoryview(seal(sealer, seq))[HEADER.size :])
        assert isinstance(where, BlockRef)
        assert where == BlockRef(block=seq, entry=0, offset=seq * BS, length=len(block(seq)))
        assert isinstance(plain, memoryview)
        assert bytes(plain) == block(seq)


def test_same_plaintext_never_gives_the_same_ciphertext() -> None:
    sealer = BlockSealer(stream_secret=os.urandom(32), ctx=make_ctx())
    frames = {seal(sealer, 0) for _ in range(20)}  # e.g. a block sent again
    assert len(frames) == 20


def test_oversized_plaintext_refused() -> None:
    sealer = BlockSealer(stream_secret=os.urandom(32), ctx=make_ctx())
    with pytest.raises(ValueError):
        sealer.seal(0, bytes(BS + 1))


# ---------------------------------------------------------------- damage vs forgery


def _regions(frame: bytes) -> dict[str, list[int]]:
    size = len(frame) - BLOCK_PREFIX - BLOCK_SUFFIX
    ct = list(range(BLOCK_PREFIX, BLOCK_PREFIX + size))
    tag = list(range(BLOCK_PREFIX + size, BLOCK_PREFIX + size + TAG_LEN))
    crc = list(range(len(frame) - 4, len(frame)))
    return {"ciphertext": [ct[0], ct[len(ct) // 2], ct[-1]], "tag": [tag[0], tag[-1]], "crc": crc}


@pytest.mark.parametrize("seq", [0, 3])
@pytest.mark.parametrize("region", ["ciphertext", "tag", "crc"])
def test_bit_flip_is_a_crc_mismatch(seq: int, region: str) -> None:
    secret = os.urandom(32)
    positions = _regions(seal(BlockSealer(stream_secret=secret, ctx=make_ctx()), seq))[region]
    for pos in positions:
        for mask in (0x01, 0x80):
            sealer, opener = pair(secret, make_ctx())
            for i in range(seq):
                open_frame(opener, seal(sealer, i))
            damaged = flip(seal(sealer, seq), pos, mask)
            with pytest.raises(CrcMismatch) as info:
                open_frame(opener, damaged)
            assert info.value.seq == seq
            # The sender sends the block again under the next counter; both sides advanced.
            assert open_frame(opener, seal(sealer, seq)) == block(seq)


#: Block index -> {bit of the index flipped: the index it becomes} for the flips that leave a
#: header that is still plausible for SIZE (index in range, announced length right for that
#: index, frame length right for the announced length). Every other single-bit flip of the
#: 8-byte block header makes it implausible.
PLAUSIBLE_INDEX_FLIPS = {
    0: {0: 1, 1: 2},  # full block 0 -> full blocks 1 and 2 (3 is short, 4+ out of range)
    1: {0: 0},  # 1 -> 0 (full); 1 -> 3 is short
    2: {1: 0},  # 2 -> 0 (full); 2 -> 3 is short
    3: {},  # the short last block: no other index has its length
}


@pytest.mark.parametrize("seq", sorted(PLAUSIBLE_INDEX_FLIPS))
def test_header_bit_flip_is_a_crc_mismatch_or_a_protocol_error(seq: int) -> None:
    # The CRC covers the block header too. Damage there that still names a plausible block is
    # reported as a CRC mismatch on the index the damaged header names (the receiver cannot
    # know the real one); damage that leaves an impossible header drops the stream instead.
    secret = os.urandom(32)
    outcomes: dict[str, int] = {"crc": 0, "protocol": 0}
    for byte in range(BLOCK_HEADER.size):
        for bit in range(8):
            sealer, opener = pair(secret, make_ctx())
            for i in range(seq):
                open_frame(opener, seal(sealer, i))
            damaged = flip(seal(sealer, seq), HEADER.size + byte, 1 << bit)
            index_bit = (3 - byte) * 8 + bit if byte < 4 else None
            if index_bit in PLAUSIBLE_INDEX_FLIPS[seq]:
                with pytest.raises(CrcMismatch) as info:
                    open_frame(opener, damaged)
                assert info.value.seq == PLAUSIBLE_INDEX_FLIPS[seq][index_bit]
                outcomes["crc"] += 1
            else:
                with pytest.raises(ProtocolError):
                    open_frame(opener, damaged)
                outcomes["protocol"] += 1
            # Either way the record counter advanced: the next record opens.
            assert open_frame(opener, seal(sealer, seq)) == block(seq)
    assert outcomes == {
        "crc": len(PLAUSIBLE_INDEX_FLIPS[seq]),
        "protocol": 64 - len(PLAUSIBLE_INDEX_FLIPS[seq]),
    }


@pytest.mark.parametrize("region", ["ciphertext", "tag"])
def test_bit_flip_with_crc_recomputed_is_an_auth_error(region: str) -> None:
    secret = os.urandom(32)
    frame = seal(BlockSealer(stream_secret=secret, ctx=make_ctx()), 0)
    for pos in _regions(frame)[region]:
        opener = BlockOpener(stream_secret=secret, ctx=make_ctx())
        with pytest.raises(AuthError):
            open_frame(opener, recrc(flip(frame, pos)))
    # Control: the untouched frame (CRC recomputed to the same value) opens.
    opener = BlockOpener(stream_secret=secret, ctx=make_ctx())
    assert recrc(frame) == frame
    assert open_frame(opener, recrc(frame)) == block(0)


def test_index_changed_in_header_is_an_auth_error() -> None:
    secret = os.urandom(32)
    frame = seal(BlockSealer(stream_secret=secret, ctx=make_ctx()), 0)
    moved = frame[: HEADER.size] + struct.pack(">II", 1, BS) + frame[BLOCK_PREFIX:]
    # Without fixing the CRC it is damage (to a plausible header: block 1)...
    with pytest.raises(CrcMismatch) as info:
        open_frame(BlockOpener(stream_secret=secret, ctx=make_ctx()), moved)
    assert info.value.seq == 1
    # ...with the CRC fixed, the header is consistent for block 1 but the AAD is not.
    with pytest.raises(AuthError):
        open_frame(BlockOpener(stream_secret=secret, ctx=make_ctx()), recrc(moved))


def test_replayed_block_is_an_auth_error() -> None:
    secret = os.urandom(32)
    sealer, opener = pair(secret, make_ctx())
    f0 = seal(sealer, 0)
    assert open_frame(opener, f0) == block(0)
    with pytest.raises(AuthError):
        open_frame(opener, f0)


def test_reordered_blocks_are_an_auth_error() -> None:
    secret = os.urandom(32)
    sealer, opener = pair(secret, make_ctx())
    _f0, f1 = seal(sealer, 0), seal(sealer, 1)
    with pytest.raises(AuthError):
        open_frame(opener, f1)


def test_dropped_block_is_an_auth_error() -> None:
    secret = os.urandom(32)
    sealer, opener = pair(secret, make_ctx())
    seal(sealer, 0)  # lost in transit
    with pytest.raises(AuthError):
        open_frame(opener, seal(sealer, 1))


@pytest.mark.parametrize(
    "changes",
    [
        {"session_id": bytes(16)},
        {"stream": 3},
        {"manifest_id": bytes(16)},
        {"file_size": SIZE + BS},  # another total block count
    ],
    ids=["session", "stream", "manifest-id", "total-blocks"],
)
def test_block_moved_to_another_context_is_an_auth_error(changes: dict[str, Any]) -> None:
    # Same stream secret on purpose: the AAD alone must bind the block to its context.
    secret = os.urandom(32)
    frame = seal(BlockSealer(stream_secret=secret, ctx=make_ctx()), 0)
    opener = BlockOpener(stream_secret=secret, ctx=make_ctx(**changes))
    with pytest.raises(AuthError):
        open_frame(opener, frame)
    assert open_frame(BlockOpener(stream_secret=secret, ctx=make_ctx()), frame) == block(0)


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        # block 1 is entry 1 at offset 0 / entry 2 at offset 0 (entry 1 has no data)
        (((0, BS), (0, BS)), ((0, BS), (), (0, BS))),
        # block 1 is entry 1 at offset 0 / entry 1 at offset BS (a hole before it)
        (((0, BS), (0, BS)), ((0, BS), (BS, BS))),
        # block 1 is entry 1 at offset 0 / entry 0 at offset BS (one file of two blocks)
        (((0, BS), (0, BS)), ((0, 2 * BS), ())),
    ],
    ids=["other-entry", "other-offset", "other-entry-and-offset"],
)
def test_block_moved_to_another_entry_or_offset_is_an_auth_error(
    sent: tuple[tuple[int, ...], ...], received: tuple[tuple[int, ...], ...]
) -> None:
    # Same secret, session, stream, manifest id, seq, size and total blocks: only the entry or
    # the file offset in the AAD differ, and that alone must fail.
    secret = os.urandom(32)
    sent_ctx, received_ctx = extents_ctx(*sent), extents_ctx(*received)
    assert sent_ctx.total_blocks == received_ctx.total_blocks == 2
    at_sender, at_receiver = sent_ctx.space.locate(1), received_ctx.space.locate(1)
    assert at_sender.length == at_receiver.length == BS
    assert (at_sender.entry, at_sender.offset) != (at_receiver.entry, at_receiver.offset)
    data = os.urandom(BS)
    frame = bytes(BlockSealer(stream_secret=secret, ctx=sent_ctx).seal(1, data))
    with pytest.raises(AuthError):
        open_frame(BlockOpener(stream_secret=secret, ctx=received_ctx), frame)
    assert open_frame(BlockOpener(stream_secret=secret, ctx=sent_ctx), frame) == data


@pytest.mark.parametrize(
    ("entry", "offset"), [(1, 0), (0, 0), (2, 0), (1, BS)], ids=["right", "entry0", "entry2", "off"]
)
def test_sealer_binds_the_given_entry_and_offset(entry: int, offset: int) -> None:
    # seal(..., entry=, offset=) puts what it is told in the AAD; the opener uses where the
    # block lies in its own space (entry 1, offset 0 here), so any other place fails.
    secret = os.urandom(32)
    ctx = extents_ctx((0, BS), (0, BS))
    data = os.urandom(BS)
    frame = bytes(
        BlockSealer(stream_secret=secret, ctx=ctx).seal(1, data, entry=entry, offset=offset)
    )
    opener = BlockOpener(stream_secret=secret, ctx=ctx)
    if (entry, offset) == (1, 0):
        assert open_frame(opener, frame) == data
    else:
        with pytest.raises(AuthError):
            open_frame(opener, frame)


def test_block_of_a_manifest_with_another_id_is_an_auth_error() -> None:
    # Two transfers of the same shape (same name, size, block space) whose manifests differ only
    # in the file's identity: a block sealed for one does not open in the other.
    secret = os.urandom(32)
    ours = one_file("f.bin", SIZE, block_size=BS, file_id=bytes(16)).manifest
    theirs = one_file("f.bin", SIZE, block_size=BS, file_id=b"\x01" * 16).manifest
    assert ours.id != theirs.id and ours.space.total == theirs.space.total == 4
    ctx_ours = make_ctx(space=ours.space, manifest_id=ours.id)
    ctx_theirs = make_ctx(space=theirs.space, manifest_id=theirs.id)
    for seq in range(4):
        frame = seal(BlockSealer(stream_secret=secret, ctx=ctx_theirs), seq)
        with pytest.raises(AuthError):
            open_frame(BlockOpener(stream_secret=secret, ctx=ctx_ours), frame)
        assert open_frame(BlockOpener(stream_secret=secret, ctx=ctx_theirs), frame) == block(seq)


def test_block_from_another_stream_secret_is_an_auth_error() -> None:
    master = os.urandom(32)
    s2, s3 = (ks.derive_stream_secret(master=master, stream=n) for n in (2, 3))
    frame = seal(BlockSealer(stream_secret=s2, ctx=make_ctx()), 0)
    with pytest.raises(AuthError):
        open_frame(BlockOpener(stream_secret=s3, ctx=make_ctx()), frame)


def test_block_from_an_earlier_session_of_the_same_file() -> None:
    old_secret, new_secret = os.urandom(32), os.urandom(32)
    frame = seal(BlockSealer(stream_secret=old_secret, ctx=make_ctx()), 0)
    new_ctx = make_ctx(session_id=os.urandom(16))
    with pytest.raises(AuthError):
        open_frame(BlockOpener(stream_secret=new_secret, ctx=new_ctx), frame)


def test_every_rejection_advances_the_record_counter() -> None:
    # The sender counted a record for every frame it sent, whatever happened to it on the way.
    secret = os.urandom(32)
    sealer, opener = pair(secret, make_ctx())

    def damaged_body(frame: bytes) -> bytes:
        return flip(frame, BLOCK_PREFIX + 5)

    def damaged_header(frame: bytes) -> bytes:
        return flip(frame, HEADER.size + 4)  # size field: implausible, CRC wrong

    def bad_size_crc_right(frame: bytes) -> bytes:
        return recrc(frame[: HEADER.size] + struct.pack(">II", 0, BS - 1) + frame[BLOCK_PREFIX:])

    def forged(frame: bytes) -> bytes:
        return recrc(flip(frame, BLOCK_PREFIX + 5))

    cases: list[tuple[Any, type[Exception]]] = [
        (damaged_body, CrcMismatch),
        (damaged_header, ProtocolError),
        (bad_size_crc_right, ProtocolError),
        (forged, AuthError),
    ]
    for mutate, error in cases:
        with pytest.raises(error):
            open_frame(opener, mutate(seal(sealer, 0)))
        assert open_frame(opener, seal(sealer, 0)) == block(0)


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("seq", "size", "extra"),
    [
        (4, 100, 0),  # one past the last block
        (4, BS, 0),
        ((1 << 32) - 1, BS, 0),
        (0, BS - 1, 0),  # a full block announced short
        (0, 100, 0),
        (3, BS, 0),  # the short last block announced full
        (3, 99, 0),
        (3, 101, 0),
        (0, BS, 1),  # frame length disagrees with the size
        (0, BS, -1),
        (3, 100, 4),
        (0, 0, 0),
    ],
)
@pytest.mark.parametrize("good_crc", [True, False], ids=["crc-right", "crc-wrong"])
def test_bad_header_is_a_protocol_error(seq: int, size: int, extra: int, good_crc: bool) -> None:
    # CRC right: a well-formed frame with an impossible header (a broken or hostile sender).
    # CRC wrong: damage that left the header implausible, so it cannot be asked for again.
    opener = BlockOpener(stream_secret=os.urandom(32), ctx=make_ctx())
    with pytest.raises(ProtocolError):
        open_frame(opener, body_frame(seq, size, size + extra, good_crc=good_crc))


def test_good_headers_reach_the_crc_and_tag_checks() -> None:
    # A plausible header passes the header check: a wrong CRC is then damage to that block and
    # a right CRC over random bytes fails the tag (not the header).
    for seq, size in ((0, BS), (2, BS), (3, 100)):
        opener = BlockOpener(stream_secret=os.urandom(32), ctx=make_ctx())
        with pytest.raises(CrcMismatch) as info:
            open_frame(opener, body_frame(seq, size, size, good_crc=False))
        assert info.value.seq == seq
        with pytest.raises(AuthError):
            open_frame(opener, body_frame(seq, size, size))


def test_empty_file_accepts_no_block() -> None:
    for good_crc in (True, False):
        opener = BlockOpener(stream_secret=os.urandom(32), ctx=make_ctx(file_size=0))
        with pytest.raises(ProtocolError):
            open_frame(opener, body_frame(0, 0, 0, good_crc=good_crc))


@pytest.mark.parametrize("length", range(BLOCK_HEADER.size + BLOCK_SUFFIX))
def test_short_block_payload_is_a_protocol_error(length: int) -> None:
    frame = seal(BlockSealer(stream_secret=os.urandom(32), ctx=make_ctx()), 3)
    opener = BlockOpener(stream_secret=os.urandom(32), ctx=make_ctx())
    with pytest.raises(ProtocolError):
        opener.open(memoryview(frame[HEADER.size : HEADER.size + length]))


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=BLOCK_HEADER.size + BS + BLOCK_SUFFIX + 8),
    st.booleans(),
    st.integers(0, 4),
)
def test_arbitrary_block_payloads_only_raise_the_three_errors(
    body: bytes, fix_crc: bool, seq: int
) -> None:
    # Anything a peer or the network can put in a BLOCK payload (up to the frame cap and a
    # little past it) ends in CrcMismatch, ProtocolError or AuthError, never anything else.
    if len(body) >= BLOCK_HEADER.size and seq < 4:  # often give it a plausible header
        size = min(BS, SIZE - seq * BS)
        body = BLOCK_HEADER.pack(seq, size) + body[BLOCK_HEADER.size :]
    if fix_crc and len(body) >= 4:
        body = body[:-4] + struct.pack(">I", zlib.crc32(body[:-4]))
    opener = BlockOpener(stream_secret=bytes(32), ctx=make_ctx())
    with pytest.raises((CrcMismatch, ProtocolError, AuthError)):
        opener.open(memoryview(body))


# ---------------------------------------------------------------- epochs and nonces


def test_rekey_by_records_in_lockstep() -> None:
    secret = os.urandom(32)
    n = 40
    ctx = make_ctx(file_size=n * BS, rekey_records=2)
    sealer, opener = pair(secret, ctx)
    for i in range(n):
        frame = seal(sealer, i, block(i, n * BS))
        assert sealer.epoch == i // 2
        assert open_frame(opener, frame) == block(i, n * BS)
        assert opener.epoch == sealer.epoch


def test_rekey_by_bytes_in_lockstep() -> None:
    secret = os.urandom(32)
    n = 30
    record = BS + TAG_LEN
    ctx = make_ctx(file_size=n * BS, rekey_bytes=2 * record + 10)  # two full records per key
    sealer, opener = pair(secret, ctx)
    for i in range(n):
        frame = seal(sealer, i, block(i, n * BS))
        assert sealer.epoch == i // 2
        assert open_frame(opener, frame) == block(i, n * BS)
        assert opener.epoch == sealer.epoch


def test_rekey_bytes_smaller_than_one_record() -> None:
    # Every key still seals one record (never zero), then ratchets.
    secret = os.urandom(32)
    ctx = make_ctx(file_size=10 * BS, rekey_bytes=100)
    sealer, opener = pair(secret, ctx)
    for i in range(10):
        frame = seal(sealer, i, block(i, 10 * BS))
        assert sealer.epoch == i
        assert open_frame(opener, frame) == block(i, 10 * BS)


def test_epoch_keys_follow_the_ratchet() -> None:
    # A frame sealed in epoch 2 opens with the epoch-2 key derived independently.
    secret = os.urandom(32)
    ctx = make_ctx(file_size=10 * BS, rekey_records=2)
    sealer = BlockSealer(stream_secret=secret, ctx=ctx)
    frames = [seal(sealer, i, block(i, 10 * BS)) for i in range(5)]
    epoch2 = ks.ratchet(stream_secret=ks.ratchet(stream_secret=secret))
    keys = ks.derive_stream_keys(stream_secret=epoch2)
    frame = frames[4]  # record 4 = epoch 2, counter 0
    # entry 0, at offset 4 * BS of the file
    aad = b"stx3 block" + struct.pack(">16sIIIIQ16sIQ", SID, 2, 2, 4, BS, 10, MID, 0, 4 * BS)
    ct = frame[BLOCK_PREFIX:-4]
    assert AESGCM(keys.data_key).decrypt(keys.data_iv, ct, aad) == block(4, 10 * BS)


class _RecordingAESGCM:
    """Wraps the real AESGCM and logs every (key, nonce) it is asked to use."""

    log: list[tuple[str, bytes, bytes]] = []

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)
        self._real = AESGCM(key)

    def encrypt_into(self, nonce: bytes, data: Any, aad: bytes, buf: Any) -> int:
        self.log.append(("seal", self._key, bytes(nonce)))
        return self._real.encrypt_into(nonce, data, aad, buf)

    def decrypt_into(self, nonce: bytes, data: Any, aad: bytes, buf: Any) -> int:
        self.log.append(("open", self._key, bytes(nonce)))
        return self._real.decrypt_into(nonce, data, aad, buf)


@pytest.mark.parametrize(("rekey_records", "rekey_bytes"), [(3, 1 << 36), (1 << 24, 3 * BS)])
def test_no_key_nonce_pair_repeats(
    monkeypatch: pytest.MonkeyPatch, rekey_records: int, rekey_bytes: int
) -> None:
    log: list[tuple[str, bytes, bytes]] = []
    monkeypatch.setattr(_RecordingAESGCM, "log", log)
    monkeypatch.setattr(records, "AESGCM", _RecordingAESGCM)
    n = 50
    master = os.urandom(32)
    sealed = 0
    for stream in (0, 1):  # two workers of one session
        secret = ks.derive_stream_secret(master=master, stream=stream)
        ctx = make_ctx(
            stream=stream, file_size=n * BS, rekey_records=rekey_records, rekey_bytes=rekey_bytes
        )
        sealer, opener = pair(secret, ctx)
        for i in range(n):
            data = block(i, n * BS)
            frame = seal(sealer, i, data)
            sealed += 1
            if i % 7 == 3:  # damaged in transit: the same block is sealed again
                with pytest.raises(CrcMismatch):
                    open_frame(opener, flip(frame, BLOCK_PREFIX))
                frame = seal(sealer, i, data)
                sealed += 1
            assert open_frame(opener, frame) == data
    seals = [(k, nonce) for op, k, nonce in log if op == "seal"]
    opens = [(k, nonce) for op, k, nonce in log if op == "open"]
    assert len(seals) == sealed > 100
    assert len(set(seals)) == len(seals), "a (key, nonce) pair was used twice"
    assert len({k for k, _ in seals}) > 10  # the limit really made both streams ratchet
    # The receiver used exactly the sender's (key, nonce) for every record it decrypted.
    assert set(opens) <= set(seals)
    assert len(opens) == sealed - 2 * len(range(3, n, 7))  # CRC failures never reach the AEAD


# ---------------------------------------------------------------- acks


def _ack_pair(secret: bytes, ctx: BlockContext) -> tuple[AckChannel, AckChannel]:
    return AckChannel(stream_secret=secret, ctx=ctx), AckChannel(stream_secret=secret, ctx=ctx)


def _payload(frame: bytes) -> bytes:
    raw_type, length = HEADER.unpack_from(frame)
    assert raw_type == FrameType.ACK and length == len(frame) - HEADER.size
    return frame[HEADER.size :]


def test_ack_round_trip() -> None:
    secret = os.urandom(32)
    tx, rx = _ack_pair(secret, make_ctx())
    bodies = [b"", b"ack one", os.urandom(300)]
    for body in bodies:
        assert rx.open(_payload(tx.seal(body))) == body


def test_ack_mac_layout() -> None:
    secret = os.urandom(32)
    tx = AckChannel(stream_secret=secret, ctx=make_ctx())
    tx.seal(b"first")
    payload = _payload(tx.seal(b"second"))
    ack_key = ks.derive_stream_keys(stream_secret=secret).ack_key
    data = SID + struct.pack(">I", 2) + struct.pack(">Q", 1) + b"second"
    expected = hmac.new(ack_key, b"stx1 ack\x00" + data, hashlib.sha256).digest()
    assert payload == b"second" + expected


def test_acks_stay_under_the_epoch_0_ack_key_while_data_ratchets() -> None:
    # Data keys are per epoch; the ack key is per stream (from stream[s,0]) and does not move
    # when the data records ratchet.
    secret = os.urandom(32)
    n = 12
    ctx = make_ctx(file_size=n * BS, rekey_records=2)
    sealer, opener = pair(secret, ctx)
    tx, rx = _ack_pair(secret, ctx)
    ack_key = ks.derive_stream_keys(stream_secret=secret).ack_key
    epoch1_ack_key = ks.derive_stream_keys(stream_secret=ks.ratchet(stream_secret=secret)).ack_key
    assert ack_key != epoch1_ack_key
    for i in range(n):
        assert open_frame(opener, seal(sealer, i, block(i, n * BS))) == block(i, n * BS)
        body = b"durable %d" % i
        payload = _payload(tx.seal(body))
        data = SID + struct.pack(">I", 2) + struct.pack(">Q", i) + body
        assert payload[-32:] == hmac.new(ack_key, b"stx1 ack\x00" + data, hashlib.sha256).digest()
        assert rx.open(payload) == body
    assert sealer.epoch == opener.epoch == (n - 1) // 2 > 0
    # An ack MAC'd under a later epoch's ack key is refused.
    data = SID + struct.pack(">I", 2) + struct.pack(">Q", 0) + b"durable 0"
    forged = (
        b"durable 0" + hmac.new(epoch1_ack_key, b"stx1 ack\x00" + data, hashlib.sha256).digest()
    )
    with pytest.raises(AuthError):
        AckChannel(stream_secret=secret, ctx=ctx).open(forged)


def test_replayed_ack_is_an_auth_error() -> None:
    tx, rx = _ack_pair(os.urandom(32), make_ctx())
    p = _payload(tx.seal(b"durable 0"))
    assert rx.open(p) == b"durable 0"
    with pytest.raises(AuthError):
        rx.open(p)


def test_reordered_ack_is_an_auth_error() -> None:
    tx, rx = _ack_pair(os.urandom(32), make_ctx())
    _p1, p2 = _payload(tx.seal(b"1")), _payload(tx.seal(b"2"))
    with pytest.raises(AuthError):
        rx.open(p2)


def test_forged_ack_is_an_auth_error() -> None:
    secret = os.urandom(32)
    p = _payload(AckChannel(stream_secret=secret, ctx=make_ctx()).seal(b"durable 0 1 2"))
    forgeries = [
        flip(p, 0),  # body changed
        flip(p, len(p) - 1),  # tag changed
        b"durable 0 1 2 3" + p[-32:],
        os.urandom(64),
        bytes(32),
    ]
    for forged in forgeries:
        rx = AckChannel(stream_secret=secret, ctx=make_ctx())
        with pytest.raises(AuthError):
            rx.open(forged)
    for other_ctx in (make_ctx(stream=3), make_ctx(session_id=bytes(16))):
        with pytest.raises(AuthError):
            AckChannel(stream_secret=secret, ctx=other_ctx).open(p)
    with pytest.raises(AuthError):
        AckChannel(stream_secret=os.urandom(32), ctx=make_ctx()).open(p)


def test_short_ack_is_a_protocol_error() -> None:
    rx = AckChannel(stream_secret=os.urandom(32), ctx=make_ctx())
    with pytest.raises(ProtocolError):
        rx.open(bytes(31))


# ---------------------------------------------------------------- control channel


def _control_pair() -> tuple[ks.SessionKeys, ControlChannel, ControlChannel]:
    session = ks.derive_session_keys(master=os.urandom(32))
    return (
        session,
        ControlChannel(session=session, client=True),
        ControlChannel(session=session, client=False),
    )


def _split(frame: bytes) -> tuple[FrameType, bytes]:
    raw_type, length = HEADER.unpack_from(frame)
    assert length == len(frame) - HEADER.size
    return FrameType(raw_type), frame[HEADER.size :]


def test_control_round_trip_both_ways() -> None:
    _, client, server = _control_pair()
    for i in range(3):
        ftype, payload = _split(client.seal(FrameType.METADATA, b"meta %d" % i))
        assert ftype is FrameType.METADATA
        assert server.open(ftype, payload) == b"meta %d" % i
        ftype, payload = _split(server.seal(FrameType.METADATA_ACK, b"ack %d" % i))
        assert client.open(ftype, payload) == b"ack %d" % i


def test_control_layout_is_as_documented() -> None:
    session, client, _ = _control_pair()
    client.seal(FrameType.METADATA, b"first")
    _, payload = _split(client.seal(FrameType.END, b"second"))
    aad = b"stx1 control" + session.session_id + bytes([FrameType.END])
    nonce = ks.nonce(iv=session.ctl_c2s_iv, counter=1)
    assert AESGCM(session.ctl_c2s_key).decrypt(nonce, payload, aad) == b"second"


def test_control_wrong_direction_is_an_auth_error() -> None:
    _, client, server = _control_pair()
    ftype, payload = _split(client.seal(FrameType.METADATA, b"meta"))
    with pytest.raises(AuthError):
        client.open(ftype, payload)  # reflected back to the client
    ftype, payload = _split(server.seal(FrameType.RECEIPT, b"receipt"))
    with pytest.raises(AuthError):
        server.open(ftype, payload)


def test_control_wrong_type_is_an_auth_error() -> None:
    _, client, server = _control_pair()
    _, payload = _split(client.seal(FrameType.END, b"end"))
    with pytest.raises(AuthError):
        server.open(FrameType.METADATA, payload)  # a sealed END presented as METADATA


def test_control_replay_is_an_auth_error() -> None:
    _, client, server = _control_pair()
    _, payload = _split(client.seal(FrameType.END, b"end"))
    assert server.open(FrameType.END, payload) == b"end"
    with pytest.raises(AuthError):
        server.open(FrameType.END, payload)


def test_control_from_another_session_is_an_auth_error() -> None:
    _, client, _ = _control_pair()
    _, _, other_server = _control_pair()
    _, payload = _split(client.seal(FrameType.END, b"end"))
    with pytest.raises(AuthError):
        other_server.open(FrameType.END, payload)


def test_control_tampered_is_an_auth_error() -> None:
    _, client, server = _control_pair()
    _, payload = _split(client.seal(FrameType.METADATA, b"metadata body"))
    for pos in (0, len(payload) // 2, len(payload) - 1):
        with pytest.raises(AuthError):
            server.open(FrameType.METADATA, flip(payload, pos))
    for short in (b"", payload[:15], payload[:-1]):
        with pytest.raises(AuthError):
            server.open(FrameType.METADATA, short)
    assert server.open(FrameType.METADATA, payload) == b"metadata body"


# ---------------------------------------------------------------- joins


def test_join_round_trip_and_refusals() -> None:
    master = os.urandom(32)
    secret = ks.derive_stream_secret(master=master, stream=5)
    tag = join_mac(stream_secret=secret, session_id=SID, stream=5)
    assert len(tag) == 32
    verify_join(stream_secret=secret, session_id=SID, stream=5, tag=tag)
    other = ks.derive_stream_secret(master=master, stream=6)
    bad = [
        dict(stream_secret=secret, session_id=SID, stream=6, tag=tag),
        dict(stream_secret=secret, session_id=bytes(16), stream=5, tag=tag),
        dict(stream_secret=other, session_id=SID, stream=5, tag=tag),
        dict(stream_secret=secret, session_id=SID, stream=5, tag=flip(tag, 0)),
        dict(stream_secret=secret, session_id=SID, stream=5, tag=tag[:16]),
        dict(stream_secret=secret, session_id=SID, stream=5, tag=b""),
    ]
    for case in bad:
        with pytest.raises(AuthError):
            verify_join(**case)


def test_join_mac_is_under_the_join_key() -> None:
    secret = os.urandom(32)
    key = ks.derive_join_key(stream_secret=secret)
    expected = hmac.new(key, b"stx1 join\x00" + SID + struct.pack(">I", 9), hashlib.sha256)
    assert join_mac(stream_secret=secret, session_id=SID, stream=9) == expected.digest()
    # A worker's join proof is not a MAC under its data or ack keys.
    keys = ks.derive_stream_keys(stream_secret=secret)
    assert key not in (keys.data_key, keys.ack_key, secret)
