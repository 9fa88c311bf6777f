"""The receiver's session core (``stxpar.recv_session``) driven in memory: no sockets, no
processes, no files. A sender's control channel seals what the sender would send and opens
what the core answers; effects are answered by the test."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transfers import one_file, tree

from stxpar.blocks import BlockLedger, BlockSpace
from stxpar.digest import BLOCK_DIGEST_LEN, block_digest
from stxpar.errors import (
    AuthError,
    ConnectError,
    IntegrityError,
    ProtocolError,
    RejectedError,
    StxError,
    error_from_code,
)
from stxpar.keyschedule import derive_session_keys
from stxpar.manifest import Entry, Kind, Limits, chunks, encode_chunk
from stxpar.records import ControlChannel
from stxpar.recv_session import (
    COMPLETE_TIMEOUT,
    INPUTS,
    LOST_GRACE_S,
    Admit,
    Admitted,
    Appended,
    AppendFailed,
    AppendLog,
    BlocksLanded,
    CancelStreams,
    CheckPartial,
    Completed,
    DigestMismatch,
    EndFiles,
    Event,
    Finalize,
    Finalized,
    FinalizeFailed,
    PartialChecked,
    ReceiverSession,
    Refused,
    Reroute,
    State,
    Stopping,
    StreamBroke,
    Superseded,
)
from stxpar.session_base import (
    ConnectionLost,
    Failed,
    FrameIn,
    Input,
    Output,
    SendFrame,
    Succeeded,
    Tick,
)
from stxpar.transfer import Transfer
from stxpar.wire import (
    HEADER,
    MAX_HANDSHAKE_PAYLOAD,
    End,
    ErrorMsg,
    FrameType,
    MetadataAck,
    Receipt,
    Routes,
    parse_header,
)

BS = 64 * 1024
SIZE = 3 * BS + 1000
TOTAL = 4
STALL = 60.0
DIGESTS = [block_digest(bytes([i]) * 64) for i in range(TOTAL)]


def metadata(**kw: Any) -> Transfer:
    fields: dict[str, Any] = {
        "mtime_ns": 1_700_000_000_000_000_000,
        "block_size": BS,
        "file_id": b"F" * 16,
        "streams": 2,
        "rekey_records": 1 << 20,
        "rekey_bytes": 1 << 36,
        "run_id": b"R" * 16,
    }
    fields.update(kw)
    return one_file("f.bin", SIZE, **fields)


def ledger(held: list[int] = []) -> BlockLedger:  # noqa: B006  (never mutated)
    space = BlockSpace([SIZE], block_size=BS)
    return BlockLedger.of(space, [(i, DIGESTS[i]) for i in held])


#: the whole-transfer digest of the one file f.bin, every block held
WHOLE = metadata().manifest.tree_digest(ledger(list(range(TOTAL))))


def split(frame: bytes) -> tuple[FrameType, bytes]:
    ftype, length = parse_header(frame[: HEADER.size], cap=lambda _: 1 << 30)
    return ftype, frame[HEADER.size : HEADER.size + length]


class Pair:
    """A core and the sender's end of its control channel."""

    def __init__(self, limits: Limits | None = None) -> None:
        keys = derive_session_keys(master=os.urandom(32))
        self.core = ReceiverSession(
            keys, peer="192.0.2.1", stall_timeout=STALL, now=100.0, limits=limits
        )
        self.sender = ControlChannel(session=keys, client=True)
        self.now = 100.0

    def feed(self, event: Input) -> list[Output]:
        return self.core.handle(event)

    def tick(self, dt: float) -> list[Output]:
        self.now += dt
        return self.feed(Tick(self.now))

    def frame(self, ftype: FrameType, body: bytes) -> FrameIn:
        return FrameIn(*split(self.sender.seal(ftype, body)))

    def header(self, md: Transfer | None = None) -> list[Output]:
        """METADATA alone (the transfer's header)."""
        return self.feed(self.frame(FrameType.METADATA, (md or metadata()).header.encode()))

    def metadata(self, md: Transfer | None = None) -> list[Output]:
        """METADATA, then every MANIFEST chunk: what the last frame answered."""
        md = md or metadata()
        assert self.header(md) == [] and self.core.state is State.WAIT_MANIFEST
        parts = chunks(md.manifest.entries)
        for part in parts[:-1]:
            assert self.feed(self.frame(FrameType.MANIFEST, part)) == []
        return self.feed(self.frame(FrameType.MANIFEST, parts[-1]))

    def end(self, digest: bytes = WHOLE, total: int = TOTAL) -> list[Output]:
        body = End(total_blocks=total, digest=digest).encode()
        return self.feed(FrameIn(*split(self.sender.seal(FrameType.END, body))))

    def admit(self, held: list[int] = [], complete: bool = False) -> list[Output]:  # noqa: B006
        assert isinstance(self.metadata()[0], Admit)
        out = self.feed(Admitted("f.bin", ledger(held), complete))
        ftype, body = self.opened(out[-1])
        assert ftype is FrameType.METADATA_ACK
        self.ack = MetadataAck.decode(body)
        return out

    def land(self, blocks: list[int]) -> list[Output]:
        out = self.feed(BlocksLanded([(i, DIGESTS[i]) for i in blocks]))
        assert out == [AppendLog([(i, DIGESTS[i]) for i in blocks])]
        return self.feed(Appended([(i, DIGESTS[i]) for i in blocks]))

    def opened(self, out: Output) -> tuple[FrameType, bytes]:
        assert isinstance(out, SendFrame)
        ftype, payload = split(out.data)
        return ftype, self.sender.open(ftype, payload)


def events(outs: list[Output]) -> dict[str, dict[str, Any]]:
    return {o.kind: o.fields for o in outs if isinstance(o, Event)}


def sent_error(pair: Pair, outs: list[Output]) -> StxError:
    frames = [o for o in outs if isinstance(o, SendFrame)]
    assert len(frames) == 1
    ftype, body = pair.opened(frames[0])
    assert ftype is FrameType.ERROR
    msg = ErrorMsg.decode(body)
    return error_from_code(msg.code, msg.message)


def failed(outs: list[Output]) -> StxError:
    assert isinstance(outs[-1], Failed)
    return outs[-1].error


# ---------------------------------------------------------------- whole transfers


def test_fresh_transfer_to_receipt() -> None:
    p = Pair()
    out = p.admit()
    ev = events(out)["accepted"]
    assert ev == {
        "peer": "192.0.2.1",
        "file": "f.bin",
        "bytes": SIZE,
        "streams": 2,
        "resumed_blocks": 0,
        "files": 1,
        "dirs": 0,
        "symlinks": 0,
    }
    assert p.ack.held(TOTAL) == []
    assert p.land([0, 2]) == []
    assert p.land([1, 3]) == []
    out = p.end()
    assert out == [Finalize(complete=False)]
    out = p.feed(Finalized())
    assert out[:2] == [CancelStreams(later=True), Completed(WHOLE)]
    ftype, body = p.opened(out[2])
    assert ftype is FrameType.RECEIPT and Receipt.decode(body) == Receipt(WHOLE, SIZE)
    assert out[3] == Succeeded() and p.core.terminal


def test_resumed_transfer_acks_what_it_holds_and_reverts_to_it_on_forgery() -> None:
    p = Pair()
    out = p.admit(held=[0, 3])
    assert events(out)["accepted"]["resumed_blocks"] == 2
    ack = p.ack
    assert ack.held(TOTAL) == [0, 3] and ack.digests == DIGESTS[0] + DIGESTS[3]
    p.land([1])
    out = p.feed(StreamBroke(AuthError("block 2 failed authentication")))
    assert isinstance(sent_error(p, out), AuthError)
    assert out[-1] == CheckPartial()
    out = p.feed(PartialChecked(gone=False))
    fields = events(out)["failed"]
    assert fields["partial"] == "kept" and fields["kept"] is True
    assert fields["have_bytes"] == BS + 1000  # blocks 0 and 3 (the last), not 1
    assert EndFiles("revert", ((0, DIGESTS[0]), (3, DIGESTS[3]))) in out
    assert CancelStreams() in out and isinstance(failed(out), AuthError)


def test_forged_block_of_a_fresh_session_discards() -> None:
    p = Pair()
    p.admit()
    p.land([0])
    p.feed(StreamBroke(AuthError("forged")))
    out = p.feed(PartialChecked(gone=False))
    assert EndFiles("discard") in out
    assert events(out)["failed"]["partial"] == "discarded"
    assert events(out)["failed"]["have_bytes"] == 0


def test_remembered_completion_answers_at_once_without_the_partial_check() -> None:
    p = Pair()
    p.admit(held=list(range(TOTAL)), complete=True)
    assert p.ack.held(TOTAL) == list(range(TOTAL))
    assert p.end() == [Finalize(complete=True)]
    out = p.feed(Finalized())
    assert isinstance(out[-1], Succeeded)


def test_remembered_completion_failing_never_asks_whether_the_partial_is_gone() -> None:
    p = Pair()
    p.admit(held=list(range(TOTAL)), complete=True)
    out = p.end(digest=bytes(32))
    assert isinstance(failed(out), DigestMismatch) and CheckPartial() not in out


def test_superseded_session_ends_quietly() -> None:
    p = Pair()
    p.admit()
    p.land([0])
    out = p.feed(Superseded())
    assert out[0] == Event("superseded", {"file": "f.bin"})
    assert isinstance(out[-1], Failed)
    assert not any(isinstance(o, SendFrame | EndFiles | CancelStreams) for o in out)
    assert p.core.terminal


def test_superseded_while_finishing_is_quiet_too() -> None:
    p = Pair()
    p.admit(held=list(range(TOTAL)))
    p.end()
    out = p.feed(Superseded())
    assert "superseded" in events(out) and "failed" not in events(out)


# ---------------------------------------------------------------- the manifest


TREE = [
    Entry(Kind.DIR, "D", 0, 0o755, 1),
    Entry(Kind.FILE, "D/a", 5, 0o644, 1, extents=(0, 5), file_id=b"a" * 16),
    Entry(Kind.FILE, "D/empty", 0, 0o644, 1, file_id=b"e" * 16),
    Entry(Kind.SYMLINK, "D/l", 0, 0o777, 1, link="a"),
]


def test_metadata_then_manifest_chunks_then_admit() -> None:
    t = tree(TREE, block_size=BS)
    parts = [encode_chunk(i, [e]) for i, e in enumerate(TREE)]
    many = Transfer(dataclasses.replace(t.header, chunks=len(parts)), t.manifest)
    p = Pair()
    assert p.core.state is State.WAIT_METADATA and p.core.reads_frames
    assert p.header(many) == []
    assert p.core.state is State.WAIT_MANIFEST and p.core.reads_frames
    assert p.core.deadline() == pytest.approx(100.0 + STALL)
    for part in parts[:-1]:
        assert p.feed(p.frame(FrameType.MANIFEST, part)) == []
        assert p.core.state is State.WAIT_MANIFEST and not p.core.admitted
    (admit,) = p.feed(p.frame(FrameType.MANIFEST, parts[-1]))
    assert isinstance(admit, Admit) and p.core.state is State.ADMITTING
    assert admit.md.header == many.header
    assert admit.md.manifest.entries == tuple(TREE) and admit.md.manifest.id == t.manifest.id
    out = p.feed(Admitted("D", BlockLedger(admit.md.manifest.space)))
    ev = events(out)["accepted"]
    assert (ev["file"], ev["bytes"], ev["files"], ev["dirs"], ev["symlinks"]) == ("D", 5, 2, 1, 1)


def test_frame_caps_while_the_manifest_arrives() -> None:
    p = Pair()
    assert p.core.frame_cap(FrameType.METADATA) == MAX_HANDSHAKE_PAYLOAD + 4096  # + a --to path
    assert p.core.frame_cap(FrameType.MANIFEST) == -1
    p.header()
    assert p.core.frame_cap(FrameType.MANIFEST) > 1 << 20  # a whole chunk and its tag
    assert p.core.frame_cap(FrameType.ERROR) == MAX_HANDSHAKE_PAYLOAD
    assert p.core.frame_cap(FrameType.METADATA) == -1
    assert p.core.frame_cap(FrameType.BLOCK) == -1


def test_hostile_manifest_is_refused_before_admission() -> None:
    p = Pair()
    bad = tree(
        [Entry(Kind.DIR, "D", 0, 0o755, 1), BAD_ENTRY._replace(path="D/../x")],
        block_size=BS,
    )
    p.header(bad)
    out = p.feed(p.frame(FrameType.MANIFEST, chunks(bad.manifest.entries)[0]))
    err = sent_error(p, out)
    assert isinstance(err, ProtocolError) and "bad manifest" in str(err)
    assert isinstance(failed(out), ProtocolError)
    assert not any(isinstance(o, Admit | EndFiles | CheckPartial) for o in out)
    assert p.core.terminal and not p.core.admitted


def test_manifest_over_the_limits_is_rejected() -> None:
    p = Pair(Limits(max_files=3))
    out = p.header(tree(TREE, block_size=BS))  # 4 entries: refused at METADATA already
    assert isinstance(sent_error(p, out), RejectedError) and "--max-files" in str(failed(out))
    assert p.core.terminal and not p.core.admitted
    p = Pair(Limits(max_bytes=SIZE - 1))
    p.header()
    out = p.feed(p.frame(FrameType.MANIFEST, chunks(metadata().manifest.entries)[0]))
    assert isinstance(sent_error(p, out), RejectedError) and "--max-bytes" in str(failed(out))
    assert not any(isinstance(o, Admit) for o in out)


def test_manifest_frames_out_of_place() -> None:
    p = Pair()
    p.header()
    out = p.feed(p.frame(FrameType.END, b""))
    assert str(failed(out)) == "expected MANIFEST, got END"
    p = Pair()
    p.header()
    out = p.feed(p.frame(FrameType.ERROR, ErrorMsg(6, "no").encode()))
    assert str(sent_error(p, out)) == "sender aborted the transfer"
    p = Pair()
    p.header()
    out = p.feed(FrameIn(FrameType.MANIFEST, b"x" * 40))  # not sealed by the sender
    assert isinstance(failed(out), AuthError)
    p = Pair()
    out = p.feed(p.frame(FrameType.MANIFEST, chunks(metadata().manifest.entries)[0]))
    assert str(failed(out)) == "expected METADATA, got MANIFEST"
    p = Pair()
    p.header()
    out = p.feed(p.frame(FrameType.MANIFEST, encode_chunk(1, metadata().manifest.entries)))
    assert isinstance(failed(out), ProtocolError) and "chunk 1" in str(failed(out))


def test_manifest_stall_and_lost_connection() -> None:
    p = Pair()
    p.header()
    assert p.tick(STALL - 1) == []
    out = p.tick(2)
    assert isinstance(failed(out), ConnectError) and "manifest stalled" in str(failed(out))
    assert p.core.terminal and not any(isinstance(o, CheckPartial) for o in out)
    p = Pair()
    p.header()
    out = p.feed(ConnectionLost(ConnectError("connection reset")))
    assert str(failed(out)) == "connection reset" and p.core.state is State.FAILED


# ---------------------------------------------------------------- failure paths


def test_refused_admission_sends_a_sealed_error_and_fails() -> None:
    p = Pair()
    p.metadata()
    out = p.feed(Refused(RejectedError("a transfer of f.bin is already in progress")))
    err = sent_error(p, out)
    assert isinstance(err, RejectedError) and "already in progress" in str(err)
    assert isinstance(failed(out), RejectedError) and not p.core.admitted


def test_frame_other_than_metadata_first() -> None:
    p = Pair()
    out = p.feed(FrameIn(FrameType.END, b"x" * 40))
    assert str(failed(out)) == "expected METADATA, got END"


def test_metadata_that_fails_authentication() -> None:
    p = Pair()
    out = p.feed(FrameIn(FrameType.METADATA, b"x" * 40))
    assert isinstance(failed(out), AuthError)


def test_digest_mismatch_discards() -> None:
    p = Pair()
    p.admit(held=list(range(TOTAL)))
    out = p.end(digest=bytes(32))
    assert out[-1] == CheckPartial()
    assert isinstance(sent_error(p, out), IntegrityError)
    out = p.feed(PartialChecked(gone=False))
    assert EndFiles("discard") in out and events(out)["failed"]["partial"] == "discarded"
    assert str(failed(out)) == "whole-transfer digest mismatch for f.bin"


def test_partial_gone() -> None:
    p = Pair()
    p.admit(held=list(range(TOTAL)))
    p.end()
    p.feed(FinalizeFailed(RejectedError("the partial file of f.bin was removed")))
    out = p.feed(PartialChecked(gone=True))
    assert EndFiles("gone") in out
    assert events(out)["failed"] | {"error": ""} == {
        "peer": "192.0.2.1",
        "file": "f.bin",
        "error": "",
        "error_code": 1,
        "kept": False,
        "partial": "gone",
        "have_bytes": 0,
        "bytes": SIZE,
        "received_bytes": 0,  # every block was held at admission
        "seconds": 0.0,
    }


def test_stall_timeout() -> None:
    p = Pair()
    p.admit()
    assert p.tick(STALL - 1) == []
    p.land([0])  # a landed block restarts the stall clock
    assert p.tick(STALL - 1) == []
    out = p.tick(2)
    text = str(sent_error(p, out))
    assert (
        text.startswith("stalled: no block and no control frame") and "(stall timeout 60 s)" in text
    )
    out = p.feed(PartialChecked(gone=False))
    assert EndFiles("keep") in out and isinstance(failed(out), ConnectError)


def test_missing_blocks_at_end() -> None:
    p = Pair()
    p.admit()
    p.land([0, 1])
    assert p.end() == []
    assert p.core.deadline() == pytest.approx(p.now + COMPLETE_TIMEOUT)
    assert p.tick(COMPLETE_TIMEOUT - 1) == []
    out = p.tick(1)
    assert str(sent_error(p, out)) == "2 blocks are missing at END; resend them"


def test_blocks_landing_after_end_complete_the_transfer() -> None:
    p = Pair()
    p.admit(held=[0, 1, 2])
    assert p.end() == []
    assert p.feed(BlocksLanded([(3, DIGESTS[3])])) == [AppendLog([(3, DIGESTS[3])])]
    assert p.feed(Appended([(3, DIGESTS[3])])) == [Finalize(complete=False)]


def test_a_block_recorded_again_after_the_last_one_is_in_the_digest() -> None:
    """The whole-transfer digest is worked out as the last block is recorded, before END; a
    block recorded again after that (with another digest) must not leave it stale."""
    p = Pair()
    p.admit()
    p.land([0, 1, 2, 3])  # complete: the digest is worked out now
    other = bytes(BLOCK_DIGEST_LEN)
    assert p.feed(Appended([(2, other)])) == []
    out = p.end()  # END's digest is over the blocks as first recorded
    assert out[-1] == CheckPartial()
    assert str(failed(p.feed(PartialChecked(gone=False)))) == (
        "whole-transfer digest mismatch for f.bin"
    )


def test_end_with_another_block_count() -> None:
    p = Pair()
    p.admit()
    out = p.end(total=TOTAL + 1)
    assert str(sent_error(p, out)) == "END names a different number of blocks"


def test_error_from_the_sender() -> None:
    p = Pair()
    p.admit()
    body = ErrorMsg(6, "no").encode()
    out = p.feed(FrameIn(*split(p.sender.seal(FrameType.ERROR, body))))
    assert str(sent_error(p, out)) == "sender aborted the transfer"


def test_unexpected_frame_after_admission() -> None:
    p = Pair()
    p.admit()
    out = p.feed(FrameIn(FrameType.METADATA, b""))
    assert str(sent_error(p, out)) == "expected END, got METADATA"


def test_disk_error_appending_keeps_the_partial() -> None:
    p = Pair()
    p.admit()
    p.feed(BlocksLanded([(0, DIGESTS[0])]))
    out = p.feed(AppendFailed(RejectedError("cannot record progress: the disk is full")))
    assert isinstance(sent_error(p, out), RejectedError)
    out = p.feed(PartialChecked(gone=False))
    assert EndFiles("keep") in out and events(out)["failed"]["have_bytes"] == 0


def test_lost_connection_waits_a_moment_for_a_forgery_report() -> None:
    p = Pair()
    p.admit(held=[1])
    assert p.feed(ConnectionLost(ConnectError("connection closed by the sender"))) == []
    assert p.core.state is State.GRACE
    out = p.feed(StreamBroke(AuthError("block 0 failed authentication")))
    assert isinstance(sent_error(p, out), AuthError)
    assert EndFiles("revert", ((1, DIGESTS[1]),)) in p.feed(PartialChecked(gone=False))


def test_lost_connection_without_a_report_fails_after_the_grace() -> None:
    p = Pair()
    p.admit()
    p.feed(ConnectionLost(ConnectError("connection reset")))
    assert p.tick(LOST_GRACE_S / 2) == []
    out = p.tick(LOST_GRACE_S)
    assert str(sent_error(p, out)) == "connection reset"


def test_a_stream_that_lost_its_connection_is_not_a_failure() -> None:
    p = Pair()
    p.admit()
    assert p.feed(StreamBroke(ConnectError("stream reset"))) == []
    assert p.core.state is State.RECEIVING


def test_stopping() -> None:
    p = Pair()
    p.admit()
    out = p.feed(Stopping())
    assert str(sent_error(p, out)) == "receiver shutting down"


def test_reports_with_bad_entries_are_filtered() -> None:
    p = Pair()
    p.admit()
    junk = [(-1, DIGESTS[0]), (TOTAL, DIGESTS[0]), (0, b"short"), ("1", DIGESTS[1]), (2,)]
    assert p.feed(BlocksLanded([*junk, (3, DIGESTS[3])])) == [AppendLog([(3, DIGESTS[3])])]


# ---------------------------------------------------------------- the table, swept


def _drive_to(state: State) -> Pair:
    p = Pair()
    if state is State.WAIT_METADATA:
        return p
    if state is State.WAIT_MANIFEST:
        p.header()
        return p
    p.metadata()
    if state is State.ADMITTING:
        return p
    if state is State.CLOSING:
        p.feed(Admitted("f.bin", ledger()))
        p.feed(Stopping())
        return p
    if state is State.FAILED:
        p.feed(Refused(RejectedError("no")))
        return p
    p.feed(Admitted("f.bin", ledger(list(range(TOTAL)) if state is not State.COMPLETING else [0])))
    if state is State.GRACE:
        p.feed(ConnectionLost(ConnectError("gone")))
    elif state in (State.COMPLETING, State.FINISHING, State.DONE):
        p.end()
        if state is State.DONE:
            p.feed(Finalized())
    assert p.core.state is state
    return p


BAD_ENTRY = Entry(Kind.FILE, "../f.bin", 10, 0o644, 1, extents=(0, 10), file_id=b"F" * 16)


def _sample(kind: type[Input], data: st.DataObject, p: Pair) -> Input:
    error = data.draw(
        st.sampled_from([AuthError("a"), ConnectError("c"), RejectedError("r"), ProtocolError("p")])
    )
    blocks = data.draw(
        st.lists(st.tuples(st.integers(-2, TOTAL + 2), st.binary(max_size=20)), max_size=4)
    )
    make: dict[type[Input], Any] = {
        FrameIn: lambda: data.draw(
            st.one_of(
                st.builds(FrameIn, st.sampled_from(list(FrameType)), st.binary(max_size=64)),
                # sealed by the sender: its MANIFEST chunk, its METADATA, anything else
                st.sampled_from(
                    [
                        p.frame(FrameType.MANIFEST, chunks(metadata().manifest.entries)[0]),
                        p.frame(FrameType.METADATA, metadata().header.encode()),
                        p.frame(FrameType.MANIFEST, encode_chunk(0, [BAD_ENTRY])),
                    ]
                ),
                st.builds(p.frame, st.sampled_from(list(FrameType)), st.binary(max_size=64)),
            )
        ),
        Tick: lambda: Tick(data.draw(st.floats(0, 1e6, allow_nan=False))),
        ConnectionLost: lambda: ConnectionLost(error),
        Admitted: lambda: Admitted("f.bin", ledger([0])),
        Refused: lambda: Refused(error),
        BlocksLanded: lambda: BlocksLanded(blocks),
        StreamBroke: lambda: StreamBroke(error),
        Appended: lambda: Appended([(b % TOTAL, bytes(BLOCK_DIGEST_LEN)) for b, _ in blocks]),
        AppendFailed: lambda: AppendFailed(error),
        Finalized: Finalized,
        FinalizeFailed: lambda: FinalizeFailed(error),
        PartialChecked: lambda: PartialChecked(data.draw(st.booleans())),
        Superseded: Superseded,
        Stopping: Stopping,
        Reroute: lambda: Reroute(Routes(("h:1",), b"\x01")),
    }
    return make[kind]()  # type: ignore[no-any-return]


@settings(max_examples=400, deadline=None)
@given(
    state=st.sampled_from(list(State)),
    kind=st.sampled_from(INPUTS),
    data=st.data(),
)
def test_every_state_and_input(state: State, kind: type[Input], data: st.DataObject) -> None:
    """Never an exception; anything not in the table fails the session with ProtocolError."""
    p = _drive_to(state)
    event = _sample(kind, data, p)
    out = p.feed(event)
    if p.core.terminal and state in ReceiverSession.TERMINAL:
        assert out == []
    elif (state, kind) not in ReceiverSession.TABLE:
        assert any(isinstance(o, Failed | CheckPartial) for o in out) or state is State.CLOSING
        errors = [o.error for o in out if isinstance(o, Failed)]
        if state is not State.CLOSING:
            assert isinstance(p.core.error or errors[0], ProtocolError)
    for follow in (PartialChecked(gone=False), Tick(1e9)):
        p.feed(follow)  # whatever state it is in now, it goes on without raising


# ---------------------------------------------------------------- ROUTES (helpers, issue 14)

ROUTES = Routes(("dtn2:7001", "[2001:db8::3]:7002"), bytes([0, 1, 2, 0, 1, 2]))


def test_routes_go_before_the_metadata_ack() -> None:
    p = Pair()
    assert isinstance(p.metadata()[0], Admit)
    out = p.feed(Admitted("f.bin", ledger(), routes=ROUTES))
    frames = [p.opened(o) for o in out if isinstance(o, SendFrame)]
    assert [f for f, _ in frames] == [FrameType.ROUTES, FrameType.METADATA_ACK]
    assert Routes.decode(frames[0][1]) == ROUTES


def test_no_routes_without_helpers() -> None:
    p = Pair()
    out = p.admit()
    assert [split(o.data)[0] for o in out if isinstance(o, SendFrame)] == [FrameType.METADATA_ACK]


def test_reroute_while_receiving_and_after_end() -> None:
    p = Pair()
    p.admit()
    later = Routes(("dtn2:7001",), bytes([0, 1, 0, 0, 1, 0]))
    out = p.feed(Reroute(later))
    assert len(out) == 1
    ftype, body = p.opened(out[0])
    assert ftype is FrameType.ROUTES and Routes.decode(body) == later
    assert p.core.state is State.RECEIVING
    p.end()  # COMPLETING: still told (a reconnect would use them)
    assert p.core.state is State.COMPLETING
    assert p.opened(p.feed(Reroute(later))[0])[0] is FrameType.ROUTES


def test_reroute_is_ignored_while_finishing() -> None:
    p = Pair()
    p.admit()
    p.land(list(range(TOTAL)))
    assert p.end() == [Finalize(complete=False)]
    assert p.feed(Reroute(ROUTES)) == [] and p.core.state is State.FINISHING


def test_routes_from_the_sender_are_a_protocol_error() -> None:
    p = Pair()
    p.admit()
    out = p.feed(p.frame(FrameType.ROUTES, ROUTES.encode()))
    assert isinstance(out[-1], CheckPartial) and isinstance(p.core.error, ProtocolError)
