"""Test support: stx3 transfers of one file built in one line (``one_file``), and block contexts."""

from __future__ import annotations

import os

from stxpar import keyschedule as ks
from stxpar.manifest import Entry, Header, Kind, Manifest
from stxpar.records import BlockContext
from stxpar.transfer import Transfer
from stxpar.wire import blocks_for

MTIME_NS = 1_700_000_000_000_000_000


def one_file(
    name: str,
    size: int,
    *,
    block_size: int,
    streams: int = 2,
    file_id: bytes | None = None,
    run_id: bytes | None = None,
    mtime_ns: int = MTIME_NS,
    mode: int = 0o644,
    rekey_records: int = ks.MAX_RECORDS_PER_KEY,
    rekey_bytes: int = ks.MAX_BYTES_PER_KEY,
) -> Transfer:
    """The transfer of one regular file of ``size`` bytes without holes, named ``name``."""
    entry = Entry(
        Kind.FILE,
        name,
        size,
        mode,
        mtime_ns,
        extents=(0, size) if size else (),
        file_id=file_id if file_id is not None else os.urandom(16),
    )
    return tree(
        [entry],
        block_size=block_size,
        streams=streams,
        run_id=run_id,
        rekey_records=rekey_records,
        rekey_bytes=rekey_bytes,
    )


def tree(
    entries: list[Entry],
    *,
    block_size: int,
    streams: int = 2,
    run_id: bytes | None = None,
    rekey_records: int = ks.MAX_RECORDS_PER_KEY,
    rekey_bytes: int = ks.MAX_BYTES_PER_KEY,
) -> Transfer:
    """The transfer of ``entries`` (in manifest order)."""
    from stxpar.manifest import chunks

    header = Header(
        entries=len(entries),
        chunks=len(chunks(entries)),
        block_size=block_size,
        streams=streams,
        rekey_records=rekey_records,
        rekey_bytes=rekey_bytes,
        run_id=run_id if run_id is not None else os.urandom(16),
    )
    return Transfer(header, Manifest(entries, block_size=block_size))


def context(
    *,
    session_id: bytes,
    stream: int,
    size: int,
    block_size: int,
    manifest_id: bytes = bytes(16),
    rekey_records: int = ks.MAX_RECORDS_PER_KEY,
    rekey_bytes: int = ks.MAX_BYTES_PER_KEY,
) -> BlockContext:
    """A data stream's context for one file of ``size`` bytes (blocks_for(size) blocks)."""
    from stxpar.blocks import BlockSpace

    assert blocks_for(size, block_size) >= 0
    return BlockContext(
        session_id=session_id,
        stream=stream,
        space=BlockSpace([size], block_size=block_size),
        manifest_id=manifest_id,
        rekey_records=rekey_records,
        rekey_bytes=rekey_bytes,
    )
