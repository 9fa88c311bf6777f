"""The sender's session core, in memory: a scripted receiver seals its frames with the same
keys; no sockets, no processes. Every (state, input) pair is swept with hypothesis."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transfers import one_file, tree

from stxpar import keyschedule as ks
from stxpar.blocks import BlockLedger, BlockSpace
from stxpar.digest import BLOCK_DIGEST_LEN
from stxpar.errors import (
    AuthError,
    ConnectError,
    IntegrityError,
    ProtocolError,
    RejectedError,
    SourceChangedError,
    StxError,
)
from stxpar.manifest import Entry, Header, Kind, decode_chunk, encode_chunk
from stxpar.records import ControlChannel
from stxpar.send_session import (
    CheckSource,
    DataComplete,
    DataFailed,
    DeadlineReached,
    Progressed,
    Reconciled,
    SenderSession,
    SourceChecked,
    StartData,
    State,
    StopWorkers,
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
    End,
    ErrorMsg,
    FrameType,
    MetadataAck,
    Receipt,
    bitmap,
    encode_frame,
)

BS = 4096
SIZE = 10 * BS - 100  # 10 blocks, the last one short
TOTAL = 10


def _split(frame: bytes) -> tuple[FrameType, bytes]:
    raw_type, length = HEADER.unpack_from(frame)
    assert length == len(frame) - HEADER.size
    return FrameType(raw_type), frame[HEADER.size :]


class Peer:
    """The receiver's end of the control channel, scripted."""

    def __init__(self, session: ks.SessionKeys) -> None:
        self.channel = ControlChannel(session=session, client=False)

    def read(self, out: Output, want: FrameType) -> bytes:
        assert isinstance(out, SendFrame)
        ftype, payload = _split(out.data)
        assert ftype is want
        return self.channel.open(ftype, payload)

    def frame(self, ftype: FrameType, body: bytes) -> FrameIn:
        return FrameIn(*_split(self.channel.seal(ftype, body)))


def _digest(b: int) -> bytes:
    return bytes([b + 1]) * BLOCK_DIGEST_LEN


def _make(
    *,
    deadline: float | None = None,
    ledger: BlockLedger | None = None,
    transfer: Transfer | None = None,
    manifest_chunks: list[bytes] | None = None,
) -> tuple[SenderSession, Peer]:
    keys = ks.derive_session_keys(master=os.urandom(32))
    md = transfer or one_file(
        "f",
        SIZE,
        block_size=BS,
        file_id=bytes(16),
        mtime_ns=1,
        streams=2,
        rekey_records=1 << 20,
        rekey_bytes=1 << 30,
        run_id=bytes(16),
    )
    ledger = ledger or BlockLedger(md.manifest.space)
    s = SenderSession(
        channel=ControlChannel(session=keys, client=True),
        metadata=md,
        manifest_chunks=manifest_chunks,
        ledger=ledger,
        stall_timeout=60.0,
        deadline=deadline,
        deadline_s=30.0,
        peer="host:1",
    )
    return s, Peer(keys)


def _ack(peer: Peer, held: list[int]) -> FrameIn:
    have = bytearray(TOTAL)
    for b in held:
        have[b] = 1
    body = MetadataAck(have=bitmap(have), digests=b"".join(_digest(b) for b in held)).encode()
    return peer.frame(FrameType.METADATA_ACK, body)


def _start(s: SenderSession, peer: Peer) -> tuple[Header, list[tuple[int, tuple[Entry, ...]]]]:
    """Start ``s``: METADATA (the header), then one MANIFEST frame per chunk, nothing else."""
    out = s.start(0.0)
    header = Header.decode(peer.read(out[0], FrameType.METADATA))
    assert len(out) == 1 + header.chunks
    parts = [decode_chunk(peer.read(o, FrameType.MANIFEST)) for o in out[1:]]
    assert [i for i, _ in parts] == list(range(header.chunks))
    assert sum(len(e) for _, e in parts) == header.entries
    return header, parts


def _until_end(s: SenderSession, peer: Peer, held: list[int]) -> None:
    header, parts = _start(s, peer)
    assert header.block_size == BS and header.streams == 2 and header.run_id == bytes(16)
    assert parts == [(0, s.metadata.manifest.entries)]
    assert s.metadata.size == SIZE
    out = s.handle(_ack(peer, held))
    missing = [b for b in range(TOTAL) if b not in held]
    if missing:
        assert out == [Reconciled(len(held), s.ledger.bytes), StartData(tuple(missing))]
        assert s.state is State.DATA
        for b in missing:
            s.ledger.record(b, _digest(b))
        assert s.handle(Progressed(1.0)) == []
        out = s.handle(DataComplete())
        assert out == [CheckSource()]
    else:
        assert out[-1] == CheckSource()
    assert s.state is State.VERIFY


def _finish(
    s: SenderSession, peer: Peer, *, digest: bytes | None = None, size: int = SIZE
) -> list[Output]:
    out = s.handle(SourceChecked())
    end = End.decode(peer.read(out[0], FrameType.END))
    assert end.total_blocks == TOTAL and end.digest == s.metadata.manifest.tree_digest(s.ledger)
    assert s.state is State.WAIT_RECEIPT
    receipt = Receipt(digest=end.digest if digest is None else digest, size=size)
    return s.handle(peer.frame(FrameType.RECEIPT, receipt.encode()))


def test_whole_session() -> None:
    s, peer = _make()
    _until_end(s, peer, [])
    assert _finish(s, peer) == [Succeeded()]
    assert s.state is State.DONE and s.terminal
    assert s.handle(Tick(1e9)) == []  # over: no more outputs


def test_start_sends_metadata_then_every_manifest_chunk() -> None:
    entries = [Entry(Kind.DIR, "D", 0, 0o755, 1)] + [
        Entry(Kind.FILE, f"D/{i}", 10, 0o644, 1, extents=(0, 10), file_id=bytes([i]) * 16)
        for i in range(3)
    ]
    transfer = tree(entries, block_size=BS)
    parts = [
        encode_chunk(0, entries[:2]),
        encode_chunk(1, entries[2:3]),
        encode_chunk(2, entries[3:]),
    ]
    many = Transfer(dataclasses.replace(transfer.header, chunks=3), transfer.manifest)
    s, peer = _make(transfer=many, manifest_chunks=parts)
    header, got = _start(s, peer)
    assert header == many.header and header.entries == 4
    assert got == [(0, tuple(entries[:2])), (1, tuple(entries[2:3])), (2, tuple(entries[3:]))]
    assert s.state is State.WAIT_ACK
    # without encoded chunks given, the core encodes the manifest itself
    s, peer = _make(transfer=transfer)
    header, got = _start(s, peer)
    assert header == transfer.header and got == [(0, tuple(entries))]


def test_a_packed_block_is_needed_once_after_the_large_files() -> None:
    small = [
        Entry(Kind.FILE, f"D/s{i}", 10 + i, 0o644, 1, extents=(0, 10 + i), file_id=bytes(16))
        for i in range(6)
    ]
    big = Entry(Kind.FILE, "D/big", 3 * BS, 0o644, 1, extents=(0, 3 * BS), file_id=bytes(16))
    transfer = tree([Entry(Kind.DIR, "D", 0, 0o755, 1), *small, big], block_size=BS)
    space = transfer.manifest.space
    assert space.total == 4 and space.locate(0).count == 6  # the six share block 0
    s, peer = _make(transfer=transfer)
    _start(s, peer)
    have = bitmap(bytearray(space.total))
    out = s.handle(peer.frame(FrameType.METADATA_ACK, MetadataAck(have=have, digests=b"").encode()))
    assert out[-1] == StartData((1, 2, 3, 0))


def test_resume_with_held_blocks_takes_the_receivers_digests() -> None:
    ledger = BlockLedger(BlockSpace([SIZE], block_size=BS))  # one file's space, as the manifest's
    ledger.record(9, bytes(16))  # acknowledged in an earlier session, lost by the receiver since
    s, peer = _make(ledger=ledger)
    _until_end(s, peer, [0, 3, 4])
    assert s.ledger.digest(3) == _digest(3)
    assert _finish(s, peer) == [Succeeded()]


def test_nothing_needed_goes_straight_to_end() -> None:
    s, peer = _make()
    _start(s, peer)
    out = s.handle(_ack(peer, list(range(TOTAL))))
    assert out == [Reconciled(TOTAL, SIZE), CheckSource()]
    assert _finish(s, peer) == [Succeeded()]


@pytest.mark.parametrize("state", [State.WAIT_ACK, State.DATA, State.WAIT_RECEIPT])
def test_sealed_error_is_its_error(state: State) -> None:
    s, peer = _make()
    _to(s, peer, state)
    err = ErrorMsg(code=RejectedError.wire_code, message="no space")
    out = s.handle(peer.frame(FrameType.ERROR, err.encode()))
    assert isinstance(out[-1], Failed) and isinstance(out[-1].error, RejectedError)
    assert "no space" in str(out[-1].error)
    assert (StopWorkers() in out) == (state is State.DATA)
    assert s.state is State.FAILED


def test_unsealed_error_is_a_connect_error() -> None:
    s, _ = _make()
    s.start(0.0)
    raw = encode_frame(FrameType.ERROR, ErrorMsg(code=3, message="x").encode())
    out = s.handle(FrameIn(*_split(raw)))
    assert isinstance(out[-1], Failed) and type(out[-1].error) is ConnectError


@pytest.mark.parametrize("digest,size", [(bytes(32), SIZE), (None, SIZE + 1)])
def test_wrong_receipt(digest: bytes | None, size: int) -> None:
    s, peer = _make()
    _until_end(s, peer, [])
    out = _finish(s, peer, digest=digest, size=size)
    assert isinstance(out[-1], Failed) and isinstance(out[-1].error, IntegrityError)


def test_changed_source_fails_before_end() -> None:
    s, peer = _make()
    _until_end(s, peer, [])
    out = s.handle(SourceChecked(SourceChangedError("changed")))
    assert out == [Failed(out[0].error)] and isinstance(out[0].error, SourceChangedError)  # type: ignore[attr-defined]


def test_forged_frame_fails_authentication() -> None:
    s, _ = _make()
    s.start(0.0)
    out = s.handle(FrameIn(FrameType.METADATA_ACK, os.urandom(40)))
    assert isinstance(out[-1], Failed) and isinstance(out[-1].error, AuthError)


@pytest.mark.parametrize("state", [State.WAIT_ACK, State.WAIT_RECEIPT])
def test_stall_by_tick(state: State) -> None:
    s, peer = _make()
    _to(s, peer, state)
    assert s.handle(Tick(59.0)) == []
    out = s.handle(Tick(61.0))
    assert isinstance(out[-1], Failed) and type(out[-1].error) is ConnectError
    assert str(out[-1].error) == "connection to host:1 lost: timed out"


def test_data_phase_stall_and_progress() -> None:
    s, peer = _make()
    _to(s, peer, State.DATA)
    assert s.handle(Tick(50.0)) == []
    s.handle(Progressed(50.0))
    assert s.handle(Tick(100.0)) == []
    out = s.handle(Tick(111.0))
    assert out[0] == StopWorkers() and isinstance(out[1], Failed)
    assert str(out[1].error) == "transfer stalled: nothing acknowledged for 60 s"


def test_deadline_by_tick() -> None:
    s, peer = _make(deadline=5.0)
    _to(s, peer, State.DATA)
    out = s.handle(Tick(5.5))
    assert isinstance(out[-1], Failed) and isinstance(out[-1].error, DeadlineReached)
    assert str(out[-1].error) == "deadline of 30 s reached"


def test_unexpected_frames() -> None:
    s, peer = _make()
    s.start(0.0)
    out = s.handle(peer.frame(FrameType.RECEIPT, b""))
    assert (
        isinstance(out[-1], Failed) and str(out[-1].error) == "expected METADATA_ACK, got RECEIPT"
    )
    s, peer = _make()
    _to(s, peer, State.DATA)
    out = s.handle(peer.frame(FrameType.END, b""))
    assert str(out[-1].error) == "unexpected END on the control connection"  # type: ignore[attr-defined]


def test_connection_lost_and_inputs_out_of_place() -> None:
    s, peer = _make()
    s.start(0.0)
    out = s.handle(ConnectionLost(ConnectError("gone")))
    assert isinstance(out[-1], Failed) and str(out[-1].error) == "gone"
    s, peer = _make()
    s.start(0.0)
    out = s.handle(DataComplete())
    assert isinstance(out[-1], Failed) and isinstance(out[-1].error, ProtocolError)
    s, _ = _make()
    assert isinstance(s.handle(Tick(0.0))[-1], Failed)  # not started
    s, _ = _make()
    s.start(0.0)
    assert isinstance(s.start(0.0)[-1], Failed)


def test_data_failed() -> None:
    s, peer = _make()
    _to(s, peer, State.DATA)
    out = s.handle(DataFailed(IntegrityError("bad")))
    assert out[0] == StopWorkers() and isinstance(out[1], Failed)
    assert str(out[1].error) == "bad"


def test_data_complete_with_blocks_missing_is_refused() -> None:
    s, peer = _make()
    _to(s, peer, State.DATA)
    out = s.handle(DataComplete())
    assert isinstance(out[-1], Failed) and isinstance(out[-1].error, ProtocolError)


# ------------------------------------------------------------------ every (state, input) pair


def _to(s: SenderSession, peer: Peer, state: State) -> None:
    """Drive ``s`` to ``state`` the legitimate way."""
    if state is State.START:
        return
    if state is State.FAILED:
        s.handle(DataComplete())
        return
    _start(s, peer)
    if state is State.WAIT_ACK:
        return
    s.handle(_ack(peer, [] if state is State.DATA else list(range(TOTAL))))
    if state in (State.DATA, State.VERIFY):
        return
    out = s.handle(SourceChecked())
    end = End.decode(peer.read(out[0], FrameType.END))
    if state is State.WAIT_RECEIPT:
        return
    s.handle(peer.frame(FrameType.RECEIPT, Receipt(digest=end.digest, size=SIZE).encode()))
    assert s.state is State.DONE


_frames = st.builds(FrameIn, st.sampled_from(list(FrameType)), st.binary(max_size=200))
_inputs: st.SearchStrategy[Input] = st.one_of(
    _frames,
    st.builds(Tick, st.floats(-1e12, 1e12, allow_nan=False)),
    st.builds(ConnectionLost, st.just(ConnectError("lost"))),
    st.just(DataComplete()),
    st.builds(DataFailed, st.just(ConnectError("streams"))),
    st.builds(Progressed, st.floats(0, 1e6)),
    st.builds(SourceChecked, st.sampled_from([None, SourceChangedError("x")])),
)


@settings(max_examples=400, deadline=None)
@given(state=st.sampled_from(list(State)), events=st.lists(_inputs, min_size=1, max_size=4))
def test_every_state_and_input(state: State, events: list[Input]) -> None:
    """Never an exception; anything not in the table fails with ProtocolError; a terminal
    session answers nothing."""
    s, peer = _make()
    _to(s, peer, state)
    assert s.state is state
    for event in events:
        before = s.state
        allowed = (before, type(event)) in SenderSession.TABLE
        out = s.handle(event)
        if before in SenderSession.TERMINAL:
            assert out == []
            continue
        for o in out:
            assert isinstance(o, Output)
        if not allowed:
            assert isinstance(out[-1], Failed) and type(out[-1].error) is ProtocolError
            assert s.state is State.FAILED
        if out and isinstance(out[-1], Failed):
            assert isinstance(out[-1].error, StxError) and s.terminal


# ------------------------------------------------------------------ ROUTES (helpers, issue 14)


def test_routes_before_and_during_the_data_phase() -> None:
    from stxpar.wire import Routes

    s, peer = _make()
    _start(s, peer)
    assert s.routes is None
    first = Routes(("dtn2:7001",), bytes([0, 1]))
    assert s.handle(peer.frame(FrameType.ROUTES, first.encode())) == []
    assert s.state is State.WAIT_ACK and s.routes == first
    assert s.routes.place(1) == "dtn2:7001" and s.routes.place(0) is None
    assert s.routes.place(2) is None  # beyond the table: the receiver itself
    out = s.handle(_ack(peer, []))
    assert isinstance(out[-1], StartData) and s.state is State.DATA
    second = Routes((), bytes(2))  # the helper died: everything to the receiver
    assert s.handle(peer.frame(FrameType.ROUTES, second.encode())) == []
    assert s.state is State.DATA and s.routes == second and s.routes.place(1) is None
    for b in range(TOTAL):
        s.ledger.record(b, _digest(b))
    assert s.handle(DataComplete()) == [CheckSource()]
    assert s.handle(peer.frame(FrameType.ROUTES, first.encode())) == []  # VERIFY: kept
    assert s.state is State.VERIFY
    assert _finish(s, peer) == [Succeeded()]


def test_unsealed_or_garbled_routes_fail_the_session() -> None:
    s, peer = _make()
    _start(s, peer)
    out = s.handle(FrameIn(FrameType.ROUTES, b"\x00" * 40))
    assert isinstance(out[-1], Failed) and s.state is State.FAILED
    s, peer = _make()
    _start(s, peer)
    out = s.handle(peer.frame(FrameType.ROUTES, b"\x92\x91\xa3bad\xc4\x01\x01"))
    assert isinstance(out[-1], Failed) and isinstance(out[-1].error, ProtocolError)
