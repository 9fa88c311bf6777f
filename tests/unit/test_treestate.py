"""The resume log of a tree: format, torn and damaged logs, the writer, fuzzing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stxpar.errors import StateFileError
from stxpar.treestate import (
    BLOCK,
    DONE,
    ENTRY,
    MAGIC,
    NAME,
    RECORD_LEN,
    Header,
    TreeStateLog,
    encode_files,
    encode_record,
    parse,
    read,
)

pytestmark = pytest.mark.timeout(60)

KA, KB = b"a" * 16, b"b" * 16
D1, D2, D3 = b"1" * 16, b"2" * 16, b"3" * 16
HEADER = Header(("D", "f.bin"), 4096)


def sample() -> bytes:
    return HEADER.encode() + encode_files([(KA, [(0, D1), (1, D2)], True), (KB, [(3, D3)], False)])


def test_round_trip() -> None:
    p = parse(sample())
    assert p.header == HEADER
    assert list(p.files) == [KA, KB]
    assert p.files[KA].blocks == {0: D1, 1: D2} and p.files[KA].done
    assert p.files[KB].blocks == {3: D3} and not p.files[KB].done
    assert p.valid_len == len(sample())


def test_a_block_recorded_again_keeps_the_last_digest() -> None:
    data = sample() + encode_record(BLOCK, 1, 3, D1)
    assert parse(data).files[KB].blocks == {3: D1}


def test_torn_tail_is_ignored() -> None:
    data = sample()
    for cut in range(1, RECORD_LEN):
        p = parse(data[:-cut])
        assert p.valid_len == len(data) - RECORD_LEN
        assert KB in p.files and p.files[KB].blocks == {}


def test_a_corrupt_record_ends_the_log() -> None:
    data = bytearray(sample())
    start = len(HEADER.encode())
    data[start + 2 * RECORD_LEN + 5] ^= 0x40  # the second BLOCK of file 0
    p = parse(bytes(data))
    assert p.files == {KA: p.files[KA]}
    assert p.files[KA].blocks == {0: D1} and not p.files[KA].done
    assert p.valid_len == start + 2 * RECORD_LEN


@pytest.mark.parametrize(
    "bad",
    [
        encode_record(ENTRY, 5, 0, KB),  # numbers out of order
        encode_record(ENTRY, 2, 0, KA),  # a key named twice
        encode_record(ENTRY, 2, 1, KB + b""),  # an ENTRY with an index
        encode_record(BLOCK, 7, 0, D1),  # a block of a file never named
        encode_record(DONE, 9),  # done of a file never named
        encode_record(DONE, 0, 0, D1),  # a DONE with data
        encode_record(9, 0, 0, D1),  # an unknown type
    ],
)
def test_records_that_do_not_fit_end_the_log(bad: bytes) -> None:
    data = sample()
    p = parse(data + bad + encode_record(BLOCK, 0, 7, D3))
    assert p.valid_len == len(data)
    assert 7 not in p.files[KA].blocks


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"STXTREE",
        MAGIC,
        MAGIC + b"\x00\x00",
        b"STXSTATE2\n" + sample()[len(MAGIC) :],
        HEADER.encode()[:-1],  # header CRC cut
        HEADER.encode()[:-4] + b"\0\0\0\0",  # header CRC wrong
        MAGIC + b"\xff\xff\xff\xff" + b"x" * 100,  # absurd header length
    ],
)
def test_bad_headers_are_refused(data: bytes) -> None:
    with pytest.raises(StateFileError):
        parse(data)


@pytest.mark.parametrize(
    "fields", [[["D"], 0], [["D"], -1], [["D"], True], [[1], 4096], ["D", 4096], [["D"]]]
)
def test_bad_header_fields_are_refused(fields: object) -> None:
    import struct
    import zlib

    import msgpack

    body = msgpack.packb(fields, use_bin_type=True)
    data = MAGIC + struct.pack(">I", len(body)) + body + struct.pack(">I", zlib.crc32(body))
    with pytest.raises(StateFileError):
        parse(data)


def test_writer_replaces_appends_and_reads_back(tmp_path: Path) -> None:
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / NAME).write_bytes(b"old junk")
        log = TreeStateLog.write(dfd, HEADER, encode_files([(KA, [(0, D1)], False)]))
        log.append(encode_record(BLOCK, 0, 1, D2))
        log.append(b"")
        log.close()
        log.close()
        got = read(dfd, 1 << 20)
        assert got is not None
        p = parse(got[0])
        assert p.files[KA].blocks == {0: D1, 1: D2}
        assert not (tmp_path / "state.tmp").exists()
        assert read(dfd, 10) is not None and len(read(dfd, 10)[0]) == 10  # type: ignore[index]
        os.unlink(tmp_path / NAME)
        assert read(dfd, 100) is None
        os.symlink("/etc/passwd", tmp_path / NAME)
        assert read(dfd, 100) is None  # never followed
        os.unlink(tmp_path / NAME)
        os.mkfifo(tmp_path / NAME)
        assert read(dfd, 100) is None  # never blocks
    finally:
        os.close(dfd)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_parse_garbage(data: bytes) -> None:
    try:
        parse(data)
    except StateFileError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 400))
def test_fuzz_parse_damaged_logs(pos: int, xor: int, cut: int) -> None:
    data = bytearray(sample())
    data[pos % len(data)] ^= xor
    try:
        p = parse(bytes(data[: len(data) - cut]))
    except StateFileError:
        return
    assert p.valid_len <= len(data)
    for fs in p.files.values():
        assert all(len(d) == 16 for d in fs.blocks.values())
