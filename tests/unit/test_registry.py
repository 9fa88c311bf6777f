"""The receiver's session registry (``stxpar.registry``) with stand-in sessions: names reserved,
superseded and refused, JOINs checked, reports routed, completions remembered."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from transfers import one_file

from stxpar.blocks import BlockLedger, BlockSpace
from stxpar.errors import AuthError, RejectedError
from stxpar.keyschedule import SessionKeys, derive_join_key, derive_session_keys, mac
from stxpar.messages import Landed
from stxpar.registry import RECENT_KEEP, RECENT_MAX_BLOCKS, SessionRegistry
from stxpar.state import Identity
from stxpar.wire import Join

FINAL = Path("/dest/f.bin")


class FakeOpened:
    def __init__(self) -> None:
        self.names = type("N", (), {"part": Path("/dest/.f.bin.stxpart")})()

    def inode(self) -> tuple[int, int]:
        return (1, 2)


class FakeLink:
    def __init__(self, file_id: bytes = b"F" * 16, streams: int = 1, tree: bool = False) -> None:
        self.keys: SessionKeys = derive_session_keys(master=os.urandom(32))
        self.lock = threading.Lock()
        self.streams: set[int] = set()
        self.md = one_file(
            "f.bin",
            10,
            block_size=65536,
            file_id=file_id,
            mtime_ns=1,
            streams=streams,
            rekey_records=1 << 20,
            rekey_bytes=1 << 30,
        )
        self.opened: Any = FakeOpened()
        self.tree = tree
        self.got: list[Any] = []
        self.superseded = False

    def data_target(self) -> tuple[str, bool, str, tuple[int, int] | None]:
        """As control's link: a tree's staging directory, or the one file's partial."""
        if self.tree:
            return "/dest/.D.stxtree", True, "/priv/layout-1", (3, 4)
        return os.fspath(self.opened.names.part), False, "/priv/layout-0", self.opened.inode()

    def deliver(self, report: Any) -> None:
        self.got.append(report)

    #: stream ids routed to a helper (``control.ControlHandler.routed_away``)
    away: frozenset[int] = frozenset()

    def routed_away(self, stream: int) -> bool:
        return stream in self.away

    def supersede(self) -> None:
        self.superseded = True

    def stop(self) -> None:
        pass


def join_for(link: FakeLink, stream: int, *, good: bool = True) -> Join:
    key = derive_join_key(stream_secret=link.keys.stream_secret(stream))
    tag = mac(key=key, label="join", data=link.keys.session_id + stream.to_bytes(4, "big"))
    return Join(link.keys.session_id, stream, tag if good else bytes(len(tag)))


def test_a_name_is_reserved_refused_superseded_and_released() -> None:
    reg = SessionRegistry()
    first = FakeLink()
    assert reg.reserve(FINAL, first.md.file_id, "f.bin") is None
    with pytest.raises(RejectedError, match="a transfer of f.bin is already in progress"):
        reg.reserve(FINAL, first.md.file_id, "f.bin")  # still being admitted
    reg.activate(FINAL, first)
    with pytest.raises(RejectedError):
        reg.reserve(FINAL, b"G" * 16, "f.bin")  # another source
    assert reg.reserve(FINAL, first.md.file_id, "f.bin") is first  # the same source again
    assert reg.snapshot()["sessions"] == 0 and reg.snapshot()["names"] == ["f.bin"]
    second = FakeLink()
    reg.activate(FINAL, second)
    reg.forget(first, FINAL)  # the old one ending frees nothing of the new one's
    assert reg.snapshot()["names"] == ["f.bin"]
    reg.forget(second, FINAL)
    assert reg.snapshot() == {"sessions": 0, "names": [], "streams": {}}


def test_joins_are_checked_and_counted() -> None:
    reg = SessionRegistry()
    link = FakeLink(streams=1)
    reg.reserve(FINAL, link.md.file_id, "f.bin")
    reg.activate(FINAL, link)
    target = reg.accept_stream(join_for(link, 0))
    assert target.path == "/dest/.f.bin.stxpart" and target.inode == (1, 2)
    assert not target.tree and target.layout == "/priv/layout-0" and target.md is link.md
    assert target.secret == link.keys.stream_secret(0)
    with pytest.raises(AuthError, match="repeated or too many"):
        reg.accept_stream(join_for(link, 0))
    with pytest.raises(AuthError, match="failed to prove its key"):
        reg.accept_stream(join_for(link, 1, good=False))
    for n in range(1, 4 + 64):
        reg.accept_stream(join_for(link, n))
    with pytest.raises(AuthError, match="repeated or too many"):
        reg.accept_stream(join_for(link, 1000))
    assert reg.snapshot()["streams"] == {link.keys.session_id: 4 + 64}
    unknown = FakeLink()
    with pytest.raises(AuthError, match="unknown session"):
        reg.accept_stream(join_for(unknown, 0))


def test_a_trees_streams_land_in_its_staging_directory() -> None:
    reg = SessionRegistry()
    link = FakeLink(tree=True)
    reg.reserve(FINAL, link.md.file_id, "D")
    reg.activate(FINAL, link)
    target = reg.accept_stream(join_for(link, 0))
    assert (target.path, target.tree, target.layout, target.inode) == (
        "/dest/.D.stxtree",
        True,
        "/priv/layout-1",
        (3, 4),
    )


def test_reports_go_to_their_session_only() -> None:
    reg = SessionRegistry()
    link = FakeLink()
    reg.reserve(FINAL, link.md.file_id, "f.bin")
    reg.activate(FINAL, link)
    report = Landed(link.keys.session_id, 0, ((0, bytes(16)),))
    reg.deliver(report)
    reg.deliver(Landed(b"x" * 32, 0, ()))
    assert link.got == [report] and reg.session_ids() == [link.keys.session_id]


def test_completions_are_remembered_within_bounds() -> None:
    reg = SessionRegistry()
    ident = Identity("f.bin", 10, 1, 65536, b"F" * 16)
    ledger = BlockLedger(BlockSpace([10], block_size=65536))
    reg.remember(FINAL, ident, ledger)
    assert reg.remembered(FINAL, ident) is ledger
    assert reg.remembered(FINAL, Identity("f.bin", 11, 1, 65536, b"F" * 16)) is None
    for i in range(RECENT_KEEP):
        reg.remember(Path(f"/dest/{i}"), ident, ledger)
    assert reg.remembered(FINAL, ident) is None  # the oldest went
    huge = BlockLedger(BlockSpace([(RECENT_MAX_BLOCKS + 1) * 16], block_size=16))
    reg.remember(FINAL, ident, huge)
    assert reg.remembered(FINAL, ident) is None


def test_a_tree_completion_is_remembered_by_its_manifest_id() -> None:
    reg = SessionRegistry()
    md = FakeLink().md
    ledger = BlockLedger(md.manifest.space)
    reg.remember(FINAL, md.manifest.id, ledger)
    assert reg.remembered(FINAL, md.manifest.id) is ledger
    assert reg.remembered(FINAL, b"\0" * 16) is None
    assert reg.remembered(FINAL, Identity("f.bin", 10, 1, 65536, md.manifest.id)) is None


def test_a_stream_routed_to_a_helper_is_refused_here() -> None:
    reg = SessionRegistry()
    link = FakeLink(streams=2)
    link.away = frozenset({1})
    reg.reserve(FINAL, link.md.file_id, "f.bin")
    reg.activate(FINAL, link)
    with pytest.raises(AuthError, match="routed to a helper"):
        reg.accept_stream(join_for(link, 1))
    assert reg.accept_stream(join_for(link, 0)).stream == 0
    link.away = frozenset()  # the helper died: its streams come here now
    assert reg.accept_stream(join_for(link, 1)).stream == 1
