"""The run's state across sessions and the reconnect policy, in memory."""

from __future__ import annotations

import pytest

from stxpar import sources
from stxpar.config import SendOptions
from stxpar.digest import block_digest
from stxpar.errors import ConnectError
from stxpar.manifest import Entry, Kind, chunks
from stxpar.messages import FileRef
from stxpar.netio import Backoff
from stxpar.send_run import Retry, Run
from stxpar.send_session import DeadlineReached

OPTS = SendOptions(max_retries=2, backoff=Backoff(initial=1.0, factor=2.0, cap=30.0))


def test_gives_up_after_max_retries_consecutive_failures() -> None:
    r = Retry(OPTS, None)
    assert 0.5 <= r.after(ConnectError("x"), now=0.0, progressed=False) <= 1.0
    assert 1.0 <= r.after(ConnectError("x"), now=0.0, progressed=False) <= 2.0
    with pytest.raises(ConnectError, match=r"^x \(gave up after 3 attempts\)$"):
        r.after(ConnectError("x"), now=0.0, progressed=False)


def test_progress_starts_the_count_again() -> None:
    r = Retry(OPTS, None)
    for _ in range(5):
        r.after(ConnectError("x"), now=0.0, progressed=True)
    assert r.failures == 1


def test_deadline() -> None:
    opts = SendOptions(max_retries=9, deadline=10.0, backoff=Backoff(initial=4.0))
    r = Retry(opts, 10.0)
    with pytest.raises(DeadlineReached, match=r"^x \(deadline of 10 s reached\)$"):
        r.after(ConnectError("x"), now=10.0, progressed=False)
    with pytest.raises(ConnectError, match=r"deadline of 10 s reached"):
        r.after(ConnectError("x"), now=9.0, progressed=False)  # the wait would pass it


def _file(path: str, size: int, *, extents: tuple[int, ...] | None = None) -> Entry:
    if extents is None:
        extents = (0, size) if size else ()
    return Entry(Kind.FILE, path, size, 0o644, 1, extents=extents, file_id=path.encode()[:1] * 16)


def _ref(path: str, size: int) -> FileRef:
    return FileRef(f"/src/{path}", 1, hash(path) & 0xFFFF, size, 1, 1)


def test_resumed_only_on_the_first_ack() -> None:
    src = sources.Sources([_file("f", 10_000)], [_ref("f", 10_000)])
    run = Run.new(src, 4096)
    assert run.total == 3 and run.complete == 0
    assert run.resumed(2, 8192) is True
    assert (run.blocks_resumed, run.bytes_resumed) == (2, 8192)
    assert run.resumed(3, 10_000) is False and run.blocks_resumed == 2
    run2 = Run.new(src, 4096)
    assert run2.resumed(0, 0) is False and run2.blocks_resumed == 0
    assert run.run_id != run2.run_id


def test_a_tree_run() -> None:
    entries = [
        Entry(Kind.DIR, "D", 0, 0o755, 1),
        _file("D/a", 5000),
        _file("D/empty", 0),
        _file("D/holes", 1 << 20, extents=()),  # only a hole: no data
        _file("D/sparse", 1 << 20, extents=(0, 100, 8192, 4096)),
        Entry(Kind.SYMLINK, "D/l", 0, 0o777, 1, link="a"),
    ]
    refs = [None, _ref("a", 5000), _ref("e", 0), _ref("h", 1 << 20), _ref("s", 1 << 20), None]
    run = Run.new(sources.Sources(entries, refs), 4096)
    assert run.manifest.entries == tuple(entries) and run.manifest.block_size == 4096
    assert run.size == 5000 + 100 + 4096  # holes are not data
    assert run.total == 2 + 1 + 1 and run.empty_files == 2
    assert run.chunks == chunks(entries) and run.chunks is run.chunks  # encoded once
    assert run.files_done() == 2  # the files without data are done from the start
    space = run.manifest.space
    for b in space.entry_blocks(1):
        run.ledger.record(b, block_digest(bytes([b])))
    assert run.files_done() == 3
    for b in range(run.total):
        run.ledger.record(b, block_digest(bytes([b])))
    assert run.files_done() == 4
    assert run.whole_digest() == run.manifest.tree_digest(run.ledger)
