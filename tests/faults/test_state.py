"""Unit tests of the receiver's resume state log (``stxpar.state``).

The log's promise: it never claims a block it does not have. A record is claimed only when it
is whole, its CRC is right and its index is inside the file; parsing stops at the first record
that is not, so a torn tail or a damaged record (and everything after it) is never claimed, and
``StateLog.reopen`` cuts such a tail off before appending. A damaged header makes the whole
state unusable (``load`` returns None: the transfer starts over).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stxpar.digest import BLOCK_DIGEST_LEN, block_digest
from stxpar.errors import StateFileError
from stxpar.state import (
    MAGIC,
    RECORD_LEN,
    Identity,
    Parsed,
    StateLog,
    encode_header,
    encode_record,
    find_partials,
    load,
    parse,
)

pytestmark = pytest.mark.timeout(120)

FID = bytes(range(16))
IDENT = Identity(
    name="big.img",
    size=10 * 4096 + 123,
    mtime_ns=1_700_000_000_123_456_789,
    block_size=4096,
    file_id=FID,
)
TOTAL = IDENT.total_blocks  # 11


def digest_of(seq: int) -> bytes:
    return block_digest(b"block %d" % seq)


def records(seqs: list[int]) -> bytes:
    return b"".join(encode_record(s, digest_of(s)) for s in seqs)


def claimed(p: Parsed) -> set[int]:
    return {i for i, v in enumerate(p.have) if v}


def digest_at(p: Parsed, seq: int) -> bytes:
    return bytes(p.digests[seq * BLOCK_DIGEST_LEN : (seq + 1) * BLOCK_DIGEST_LEN])


def header_with_body(body: bytes) -> bytes:
    """A header whose length and CRC are right for ``body``, whatever ``body`` holds."""
    return MAGIC + struct.pack(">I", len(body)) + body + struct.pack(">I", zlib.crc32(body))


# ---------------------------------------------------------------- round trip


def test_constants_match_the_documented_layout() -> None:
    assert MAGIC == b"STXSTATE2\n"
    assert RECORD_LEN == 4 + BLOCK_DIGEST_LEN + 4 == 24
    rec = encode_record(7, digest_of(7))
    assert rec[:4] == struct.pack(">I", 7)
    assert rec[4:20] == digest_of(7)
    assert rec[20:] == struct.pack(">I", zlib.crc32(rec[:20]))
    hdr = encode_header(IDENT)
    (hlen,) = struct.unpack_from(">I", hdr, len(MAGIC))
    body = hdr[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen]
    assert msgpack.unpackb(body) == [
        IDENT.name,
        IDENT.size,
        IDENT.mtime_ns,
        IDENT.block_size,
        IDENT.file_id,
    ]
    assert len(hdr) == len(MAGIC) + 4 + hlen + 4


def test_header_only_round_trip() -> None:
    data = encode_header(IDENT)
    p = parse(data)
    assert p.identity == IDENT
    assert p.identity.total_blocks == TOTAL
    assert len(p.have) == TOTAL and p.count == 0
    assert bytes(p.digests) == bytes(TOTAL * BLOCK_DIGEST_LEN)
    assert p.valid_len == len(data)


@pytest.mark.parametrize("seqs", [[0], [3, 1, 10], list(range(TOTAL)), [5, 5, 2]])
def test_header_and_records_round_trip(seqs: list[int]) -> None:
    data = encode_header(IDENT) + records(seqs)
    p = parse(data)
    assert p.identity == IDENT
    assert claimed(p) == set(seqs)
    assert p.count == len(set(seqs))
    for s in seqs:
        assert digest_at(p, s) == digest_of(s)
    for s in set(range(TOTAL)) - set(seqs):
        assert digest_at(p, s) == bytes(BLOCK_DIGEST_LEN)
    assert p.valid_len == len(data)


@pytest.mark.parametrize(
    "ident",
    [
        Identity("empty", 0, 0, 4096, FID),  # an empty file: zero blocks
        Identity("one", 1, 1, 4096, FID),
        Identity("exact", 8 * 4096, 2, 4096, FID),
        Identity("ünïcødé name.bin", 5 << 20, -1, 1 << 20, FID),  # negative mtime (pre-1970)
        Identity("x" * 255, 3 * (64 << 20) + 1, 2**62, 64 << 20, FID),
    ],
    ids=["empty", "one-byte", "exact-multiple", "unicode", "long-name-big-blocks"],
)
def test_identities_round_trip(ident: Identity) -> None:
    seqs = list(range(ident.total_blocks))[::2]
    p = parse(encode_header(ident) + b"".join(encode_record(s, digest_of(s)) for s in seqs))
    assert p.identity == ident
    assert claimed(p) == set(seqs)


def test_statelog_create_append_load_round_trip(scratch: Path) -> None:
    path = scratch / ".big.img.stxstate"
    log = StateLog.create(path, IDENT)
    try:
        assert not path.with_name(path.name + ".tmp").exists()
        assert load(path) is not None and load(path).count == 0  # type: ignore[union-attr]
        log.append([(0, digest_of(0)), (4, digest_of(4))])
        log.append([])
        log.append([(10, digest_of(10))])
    finally:
        log.close()
    p = load(path)
    assert p is not None
    assert p.identity == IDENT
    assert claimed(p) == {0, 4, 10}
    assert digest_at(p, 10) == digest_of(10)
    assert p.valid_len == path.stat().st_size
    assert (path.stat().st_mode & 0o777) == 0o600


def test_statelog_create_replaces_an_old_log(scratch: Path) -> None:
    path = scratch / ".big.img.stxstate"
    log = StateLog.create(path, IDENT)
    log.append([(1, digest_of(1))])
    log.close()
    other = Identity("big.img", IDENT.size, IDENT.mtime_ns + 1, IDENT.block_size, FID)
    StateLog.create(path, other).close()
    p = load(path)
    assert p is not None and p.identity == other and p.count == 0


def test_load_of_missing_or_empty_or_foreign_files(scratch: Path) -> None:
    assert load(scratch / "nope") is None
    (scratch / "empty").write_bytes(b"")
    assert load(scratch / "empty") is None
    (scratch / "foreign").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    assert load(scratch / "foreign") is None
    assert load(scratch) is None  # a directory is not a state file


# ---------------------------------------------------------------- torn tails


@pytest.mark.parametrize("cut", range(1, RECORD_LEN))
def test_torn_last_record_is_ignored_and_cut_off_on_reopen(scratch: Path, cut: int) -> None:
    """A crash mid-append leaves the last record short by ``cut`` bytes: every length of it."""
    good = [2, 7, 0]
    whole = encode_header(IDENT) + records(good + [9])
    torn = whole[:-cut]
    p = parse(torn)
    assert claimed(p) == set(good), "a torn record was claimed"
    assert p.valid_len == len(whole) - RECORD_LEN

    path = scratch / ".big.img.stxstate"
    path.write_bytes(torn)
    loaded = load(path)
    assert loaded is not None and claimed(loaded) == set(good)
    log = StateLog.reopen(path, loaded)
    try:
        assert path.stat().st_size == loaded.valid_len, "reopen did not cut the torn tail off"
        log.append([(9, digest_of(9)), (3, digest_of(3))])
    finally:
        log.close()
    after = load(path)
    assert after is not None
    assert claimed(after) == {2, 7, 0, 9, 3}
    assert digest_at(after, 9) == digest_of(9)
    assert after.valid_len == path.stat().st_size
    assert path.read_bytes() == encode_header(IDENT) + records(good + [9, 3])


def test_torn_tail_of_several_records(scratch: Path) -> None:
    """Only whole records count, whatever the length of the tail."""
    seqs = [4, 1, 8, 6, 10]
    whole = encode_header(IDENT) + records(seqs)
    base = len(encode_header(IDENT))
    for end in range(base, len(whole) + 1):
        p = parse(whole[:end])
        n = (end - base) // RECORD_LEN
        assert claimed(p) == set(seqs[:n]), end
        assert p.valid_len == base + n * RECORD_LEN


def test_reopen_then_append_without_a_torn_tail(scratch: Path) -> None:
    path = scratch / ".big.img.stxstate"
    path.write_bytes(encode_header(IDENT) + records([1]))
    p = load(path)
    assert p is not None
    log = StateLog.reopen(path, p)
    log.append([(2, digest_of(2))])
    log.close()
    again = load(path)
    assert again is not None and claimed(again) == {1, 2}


# ---------------------------------------------------------------- damaged records and headers


@pytest.mark.parametrize("pos", range(RECORD_LEN))
@pytest.mark.parametrize("flip", [0x01, 0x80, 0xFF])
def test_flipped_byte_in_a_record_stops_parsing_there(pos: int, flip: int) -> None:
    before, bad, after = [3, 5], 6, [7, 8]
    head = encode_header(IDENT) + records(before)
    rec = bytearray(encode_record(bad, digest_of(bad)))
    rec[pos] ^= flip
    data = head + bytes(rec) + records(after)
    p = parse(data)
    assert claimed(p) == set(before), "a damaged record (or one after it) was claimed"
    assert p.valid_len == len(head)
    for s in [bad, *after]:
        assert digest_at(p, s) == bytes(BLOCK_DIGEST_LEN)


def test_damaged_record_then_reopen_drops_it_and_what_follows(scratch: Path) -> None:
    head = encode_header(IDENT) + records([0, 1])
    rec = bytearray(encode_record(2, digest_of(2)))
    rec[10] ^= 0x40
    path = scratch / ".s.stxstate"
    path.write_bytes(head + bytes(rec) + records([3]))
    p = load(path)
    assert p is not None and claimed(p) == {0, 1}
    log = StateLog.reopen(path, p)
    log.append([(4, digest_of(4))])
    log.close()
    q = load(path)
    assert q is not None and claimed(q) == {0, 1, 4}


def test_record_beyond_the_last_block_is_not_claimed() -> None:
    for bad in (TOTAL, TOTAL + 1, 2**31, 2**32 - 1):
        p = parse(encode_header(IDENT) + records([0, TOTAL - 1]) + encode_record(bad, digest_of(1)))
        assert claimed(p) == {0, TOTAL - 1}
        assert len(p.have) == TOTAL
        assert p.valid_len == len(encode_header(IDENT)) + 2 * RECORD_LEN


def test_records_of_an_empty_file_are_never_claimed() -> None:
    ident = Identity("empty", 0, 0, 4096, FID)
    p = parse(encode_header(ident) + records([0, 1]))
    assert p.count == 0 and len(p.have) == 0


@pytest.mark.parametrize("flip", [0x01, 0xFF])
def test_any_damaged_header_byte_makes_the_state_unusable(scratch: Path, flip: int) -> None:
    hdr = encode_header(IDENT)
    path = scratch / ".big.img.stxstate"
    for pos in range(len(hdr)):
        data = bytearray(hdr + records([1, 2]))
        data[pos] ^= flip
        with pytest.raises(StateFileError):
            parse(bytes(data))
        path.write_bytes(bytes(data))
        assert load(path) is None, f"header byte {pos} damaged, yet the state loaded"


def test_truncated_header_makes_the_state_unusable(scratch: Path) -> None:
    hdr = encode_header(IDENT)
    path = scratch / ".big.img.stxstate"
    for end in range(len(hdr)):
        path.write_bytes(hdr[:end])
        assert load(path) is None, end


@pytest.mark.parametrize(
    "fields",
    [
        ["big.img", 100, 1, 4096, b"short"],  # file id not 16 bytes
        ["big.img", 100, 1, 4096, "x" * 16],  # file id not bytes
        ["big.img", 100, 1, 0, FID],  # zero block size
        ["big.img", 100, 1, -4096, FID],  # negative block size
        ["big.img", -1, 1, 4096, FID],  # negative size
        ["big.img", 2**50, 1, 4096, FID],  # more blocks than the protocol allows
        ["big.img", 100, 1, 4096],  # a field missing
        ["big.img", 100, 1, 4096, FID, 7],  # a field too many
        {"name": 1, "size": 2, "mtime": 3, "bs": 4, "fid": 5},
        "not a list",
        None,
        ["big.img", "x", 1, 4096, FID],  # size not a number
        ["big.img", 100, 1, 4096, 16],  # an int where the id goes
    ],
)
def test_well_sealed_but_invalid_header_fields_are_refused(fields: object) -> None:
    body = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(StateFileError):
        parse(header_with_body(body) + records([0]))


def test_garbage_header_body_with_right_crc_is_refused() -> None:
    for body in (b"", b"\xc1", b"\x95", b"\xff" * 40, b"\x95\xa1a\x01\x02\x03"):
        with pytest.raises(StateFileError):
            parse(header_with_body(body))


BAD_TYPED_HEADERS = [
    pytest.param(["big.img", 100, 1, "4096", FID], id="block-size-as-text"),
    pytest.param(["big.img", "100", 1, 4096, FID], id="size-as-numeric-text"),
    pytest.param(["big.img", float("inf"), 1, 4096, FID], id="size-infinite"),
    pytest.param(["big.img", 100, float("inf"), 4096, FID], id="mtime-infinite"),
    pytest.param(["big.img", 100, 1, 0.5, FID], id="block-size-fraction"),
]


@pytest.mark.parametrize("fields", BAD_TYPED_HEADERS)
def test_wrongly_typed_header_fields_only_raise_state_file_error(fields: object) -> None:
    body = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(StateFileError):
        parse(header_with_body(body))


def test_load_and_find_partials_survive_a_wrongly_typed_header(scratch: Path) -> None:
    body = msgpack.packb(["big.img", 100, 1, "4096", FID], use_bin_type=True)
    (scratch / ".big.img.stxstate").write_bytes(header_with_body(body))
    (scratch / ".big.img.stxpart").write_bytes(bytes(100))
    assert load(scratch / ".big.img.stxstate") is None
    found = find_partials(scratch, part_suffix=".stxpart", state_suffix=".stxstate", now=0.0)
    assert [p.name for p in found] == ["big.img"]
    assert found[0].blocks_have == 0


# ---------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle(tail: bytes, total: int) -> dict[int, bytes]:
    """What a correct parser may claim from ``tail``: the longest run of whole records with a
    right CRC and an index below ``total``, later records overriding earlier digests."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + RECORD_LEN <= len(tail):
        rec = tail[pos : pos + RECORD_LEN]
        (seq,) = struct.unpack_from(">I", rec)
        (crc,) = struct.unpack_from(">I", rec, 4 + BLOCK_DIGEST_LEN)
        if zlib.crc32(rec[: 4 + BLOCK_DIGEST_LEN]) != crc or seq >= total:
            break
        out[seq] = rec[4 : 4 + BLOCK_DIGEST_LEN]
        pos += RECORD_LEN
    return out


def check_parsed(p: Parsed, tail: bytes) -> None:
    total = p.identity.total_blocks
    assert len(p.have) == total
    assert len(p.digests) == total * BLOCK_DIGEST_LEN
    want = oracle(tail, total)
    assert claimed(p) == set(want), "claimed a block no well-formed record names"
    for seq, digest in want.items():
        assert digest_at(p, seq) == digest
    assert set(p.have) <= {0, 1}


def try_parse(data: bytes) -> Parsed | None:
    try:
        return parse(data)
    except StateFileError:
        return None


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    p = try_parse(data)
    if p is not None:  # only possible when the bytes happen to hold a valid header
        hdr = encode_header(p.identity)
        assert data.startswith(MAGIC)
        check_parsed(p, data[len(hdr) :])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_magic_then_arbitrary_bytes(rest: bytes) -> None:
    data = MAGIC + rest
    p = try_parse(data)
    if p is not None:
        check_parsed(p, data[len(encode_header(p.identity)) :])


@st.composite
def record_soup(draw: st.DrawFn, total: int) -> bytes:
    """A tail of valid records, damaged records, out-of-range records and junk."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["good", "good", "good", "flip", "range", "junk", "short"]))
        seq = draw(st.integers(0, max(0, total - 1)))
        digest = draw(st.binary(min_size=BLOCK_DIGEST_LEN, max_size=BLOCK_DIGEST_LEN))
        rec = bytearray(encode_record(seq, digest))
        if kind == "flip":
            pos = draw(st.integers(0, RECORD_LEN - 1))
            rec[pos] ^= draw(st.integers(1, 255))
        elif kind == "range":
            rec = bytearray(encode_record(draw(st.integers(total, 2**32 - 1)), digest))
        elif kind == "junk":
            rec = bytearray(draw(st.binary(max_size=3 * RECORD_LEN)))
        elif kind == "short":
            rec = rec[: draw(st.integers(0, RECORD_LEN - 1))]
        parts.append(bytes(rec))
    return b"".join(parts)


identities = st.builds(
    Identity,
    name=st.text(max_size=40),
    size=st.integers(0, 64 * 4096),
    mtime_ns=st.integers(-(2**63), 2**63 - 1),
    block_size=st.sampled_from([4096, 5000, 65536, 1 << 20]),
    file_id=st.binary(min_size=16, max_size=16),
)


@FUZZ
@given(identities, st.data())
def test_fuzz_valid_header_then_arbitrary_tail(ident: Identity, data: st.DataObject) -> None:
    tail = data.draw(st.one_of(st.binary(max_size=300), record_soup(ident.total_blocks)))
    p = parse(encode_header(ident) + tail)  # a valid header must always parse
    assert p.identity == ident
    check_parsed(p, tail)
    # valid_len is exactly where the well-formed prefix ends (where the next record goes)
    n = 0
    body = tail
    while (n + 1) * RECORD_LEN <= len(body):
        rec = body[n * RECORD_LEN : (n + 1) * RECORD_LEN]
        (seq,) = struct.unpack_from(">I", rec)
        (crc,) = struct.unpack_from(">I", rec, 4 + BLOCK_DIGEST_LEN)
        if zlib.crc32(rec[: 4 + BLOCK_DIGEST_LEN]) != crc or seq >= ident.total_blocks:
            break
        n += 1
    assert p.valid_len == len(encode_header(ident)) + n * RECORD_LEN


@FUZZ
@given(identities, st.data())
def test_fuzz_valid_header_damaged_anywhere(ident: Identity, data: st.DataObject) -> None:
    """One byte changed anywhere in a well-formed log: the header or a record is damaged; a
    damaged header is refused, a damaged record is not claimed, nor anything after it."""
    seqs = data.draw(st.lists(st.integers(0, max(0, ident.total_blocks - 1)), max_size=8))
    if ident.total_blocks == 0:
        seqs = []
    hdr = encode_header(ident)
    whole = bytearray(hdr + records(seqs))
    pos = data.draw(st.integers(0, len(whole) - 1))
    whole[pos] ^= data.draw(st.integers(1, 255))
    p = try_parse(bytes(whole))
    if pos < len(hdr):
        assert p is None, "a damaged header was accepted"
        return
    assert p is not None
    k = (pos - len(hdr)) // RECORD_LEN
    assert claimed(p) == set(seqs[:k])


header_values = st.one_of(
    st.integers(-(2**63), 2**64 - 1),  # what msgpack can encode
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=20),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 255), max_size=17),
)


def _cheap(fields: list[object]) -> bool:
    """Leave out headers that would make parse() allocate gigabytes (a huge ``bytes(n)`` file
    id, or a size/block size naming hundreds of millions of blocks): a separate issue, and
    not one to provoke on a test machine."""
    fid, size, bs = fields[4], fields[1], fields[3]
    if isinstance(fid, int) and abs(fid) > 4096:
        return False
    try:
        n_size, n_bs = int(size), int(bs)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return True
    return n_bs <= 0 or n_size <= 0 or n_size // n_bs < (1 << 20)


@FUZZ
@given(st.lists(header_values, min_size=5, max_size=5).filter(lambda f: _cheap(f)))
@example(["big.img", 100, 1, "4096", FID])
def test_fuzz_sealed_header_with_arbitrary_fields(fields: list[object]) -> None:
    body = msgpack.packb(fields, use_bin_type=True)
    data = header_with_body(body) + records([0, 1])
    try:
        p = parse(data)
    except StateFileError:
        return
    assert isinstance(p.identity.file_id, bytes) and len(p.identity.file_id) == 16
    assert p.identity.block_size > 0 and p.identity.size >= 0
