"""Hypothesis fuzzing of the manifest codec: garbage in gives a protocol error (or a refusal),
never another exception; every manifest a sender can make round-trips."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stxpar.errors import ProtocolError, RejectedError
from stxpar.manifest import (
    MAX_CHUNK_BYTES,
    MAX_CHUNK_ENTRIES,
    RESERVED_SUFFIXES,
    Builder,
    Entry,
    Header,
    Kind,
    Limits,
    Manifest,
    chunks,
    decode_chunk,
    encode_chunk,
)

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BS = 1 << 16
RUN = b"r" * 16
REFUSALS = (ProtocolError, RejectedError)


def header(entries: int = 1000, n_chunks: int = 10) -> Header:
    return Header(entries, n_chunks, BS, 4, 1000, 1 << 30, RUN)


def feed_garbage(payload: bytes) -> None:
    """Every way the receiver meets a MANIFEST payload: only protocol errors or refusals."""
    try:
        decode_chunk(payload)
    except ProtocolError:
        pass
    for limits in (Limits(), Limits(max_files=3, max_bytes=100)):
        builder = Builder(header(3, 1) if limits.max_files == 3 else header(), limits)
        try:
            builder.feed(payload)
        except REFUSALS:
            pass
    try:
        Header.decode(payload)
    except ProtocolError:
        pass


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_objects = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=8), max_leaves=40)
_field = (
    _scalars
    | st.sampled_from([0, 1, 2, 3, -1, 0o777, 0o1000, 1 << 62, (1 << 62) + 1, "", "a", "/", ".."])
    | st.lists(st.integers(-5, 1 << 40), max_size=6)
    | st.binary(min_size=16, max_size=16)
)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_only_protocol_errors(payload: bytes) -> None:
    feed_garbage(payload)


@FUZZ
@given(_objects)
def test_random_msgpack_objects_are_only_protocol_errors(obj: Any) -> None:
    feed_garbage(msgpack.packb(obj, use_bin_type=True))


@FUZZ
@given(st.integers(-2, 3), st.lists(st.lists(_field, min_size=7, max_size=9), max_size=4))
def test_entry_shaped_arrays_are_only_protocol_errors(index: int, raw: list[list[Any]]) -> None:
    feed_garbage(msgpack.packb([index, raw], use_bin_type=True))


# ---------------------------------------------------------------- valid manifests

_NAME_CHARS = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters="/",
    min_codepoint=0x20,
).filter(lambda c: not (0x7F <= ord(c) <= 0x9F))
_names = st.text(_NAME_CHARS, min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and len(s.encode()) <= 255
)
_mtimes = st.integers(-(1 << 63), (1 << 63) - 1)


@st.composite
def _file_fields(draw: st.DrawFn) -> tuple[int, tuple[int, ...]]:
    extents: list[int] = []
    end = 0
    for _ in range(draw(st.integers(0, 4))):
        offset = end + draw(st.integers(0, 1 << 33))
        length = draw(st.integers(1, 1 << 34))
        extents += [offset, length]
        end = offset + length
    size = end + draw(st.integers(0, 1000))
    return size, tuple(extents)


@st.composite
def trees(draw: st.DrawFn, max_entries: int = 40) -> list[Entry]:
    """Entries as a sender makes them: parents first, unique paths, valid fields."""
    entries: list[Entry] = []
    dirs = [""]
    paths: set[str] = set()
    for _ in range(draw(st.integers(1, max_entries))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_names)
        if not parent and name.endswith(RESERVED_SUFFIXES):
            continue
        path = f"{parent}/{name}" if parent else name
        if path in paths or len(path.encode()) > 4096:
            continue
        paths.add(path)
        kind = draw(st.sampled_from(Kind))
        mode = draw(st.integers(0, 0o777))
        mtime = draw(_mtimes)
        if kind == Kind.FILE:
            size, extents = draw(_file_fields())
            fid = draw(st.binary(min_size=16, max_size=16))
            entries.append(Entry(kind, path, size, mode, mtime, extents=extents, file_id=fid))
        elif kind == Kind.DIR:
            entries.append(Entry(kind, path, 0, mode, mtime))
            dirs.append(path)
        else:
            link = draw(
                st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=50)
            )
            link = link.replace("\x00", "") or "x"
            entries.append(Entry(kind, path, 0, mode, mtime, link=link))
    if not entries:
        entries.append(Entry(Kind.DIR, "d", 0, 0o755, 0))
    return entries


def build(entries: list[Entry], limits: Limits | None = None) -> Manifest:
    payloads = chunks(entries)
    builder = Builder(header(len(entries), len(payloads)), limits or Limits())
    for payload in payloads:
        assert len(payload) <= MAX_CHUNK_BYTES
        builder.feed(payload)
    assert builder.done
    return builder.manifest()


@FUZZ
@given(trees())
def test_every_sender_manifest_round_trips(entries: list[Entry]) -> None:
    m = build(entries)
    assert m.entries == tuple(entries)
    assert m.digest == Manifest(entries, block_size=BS).digest
    assert decode_chunk(encode_chunk(0, entries))[1] == tuple(entries)


@settings(max_examples=10, deadline=None)
@given(trees(max_entries=20), st.integers(2, 5))
def test_a_manifest_in_many_chunks_round_trips(entries: list[Entry], copies: int) -> None:
    # spread the same tree over several top-level directories: more entries than one chunk
    # (small files, so that thousands of copies stay within --max-bytes and the block count)
    entries = [e._replace(size=10, extents=(0, 10)) if e.kind == Kind.FILE else e for e in entries]
    many: list[Entry] = []
    for c in range(copies):
        top = f"copy{c}"
        many.append(Entry(Kind.DIR, top, 0, 0o755, 0))
        for _ in range(MAX_CHUNK_ENTRIES // (len(entries) * copies) + 1):
            many.append(Entry(Kind.DIR, f"{top}/{len(many)}", 0, 0o700, 0))
            prefix = many[-1].path
            many.extend(
                Entry(
                    e.kind,
                    f"{prefix}/{e.path}",
                    e.size,
                    e.mode,
                    e.mtime_ns,
                    e.link,
                    e.extents,
                    e.file_id,
                )
                for e in entries
                if len(f"{prefix}/{e.path}".encode()) <= 4096
            )
    # drop entries whose parent was dropped (path too long): keep the sender's order valid
    kept: list[Entry] = []
    seen_dirs = {""}
    for e in many:
        if e.path.rpartition("/")[0] in seen_dirs:
            kept.append(e)
            if e.kind == Kind.DIR:
                seen_dirs.add(e.path)
    assert len(chunks(kept)) >= 2 or len(kept) <= MAX_CHUNK_ENTRIES
    assert build(kept).digest == Manifest(kept, block_size=BS).digest


@FUZZ
@given(trees(max_entries=12), st.data())
def test_mutated_valid_chunks_are_only_protocol_errors(entries: list[Entry], data: Any) -> None:
    payload = bytearray(encode_chunk(0, entries))
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    at = data.draw(st.integers(0, len(payload) - 1))
    if how == "flip":
        payload[at] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        del payload[at:]
    elif how == "insert":
        payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        end = data.draw(st.integers(at, len(payload)))
        payload[at:end] = data.draw(st.binary(max_size=16))
    builder = Builder(header(len(entries), 1), Limits())
    try:
        builder.feed(bytes(payload))
    except REFUSALS:
        return
    # a mutation that still decodes is a manifest the rules accepted
    assert builder.done == (len(decode_chunk(bytes(payload))[1]) == len(entries))
