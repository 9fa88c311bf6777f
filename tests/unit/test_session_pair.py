"""Both session cores joined in memory (h11's ConnectionPair): a whole transfer, a resume, a
lost receipt, a supersede and every failure path, with no socket, file or process.

The two ends run a real handshake (``ClientHandshake`` / ``ServerHandshake``) for their keys;
after it, ``SenderSession`` and ``ReceiverSession`` exchange the real sealed frames. What the
drivers would do with the cores' effects is done here, in memory: ``Disk`` stands for the
receiver's destination (state log, partial, final file), and the sender's data phase is the
blocks' digests recorded in both ledgers, as the workers' reports would record them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from transfers import one_file, tree

from stxpar import recv_session as rs
from stxpar import send_session as ss
from stxpar.blocks import BlockLedger, BlockSpace
from stxpar.digest import block_digest
from stxpar.errors import (
    AuthError,
    ConnectError,
    IntegrityError,
    ProtocolError,
    RejectedError,
    StxError,
)
from stxpar.handshake import ClientHandshake, ServerHandshake, keyring_for
from stxpar.keyschedule import SessionKeys
from stxpar.manifest import Entry, Kind, Limits, encode_chunk
from stxpar.records import ControlChannel
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
from stxpar.wire import FrameType

pytestmark = pytest.mark.timeout(60)

PSK = bytes(range(32))
BS = 4096
DATA = os.urandom(BS * 7 + 100)  # 8 blocks, the last one short
SPACE = BlockSpace([len(DATA)], block_size=BS)


def _digest(b: int) -> bytes:
    ref = SPACE.locate(b)
    return block_digest(DATA[ref.offset : ref.offset + ref.length])


def _keys() -> tuple[SessionKeys, SessionKeys]:
    now = int(time.time() * 1000)
    client = ClientHandshake(psk=PSK, now_ms=now)
    server = ServerHandshake(keyring=keyring_for([PSK]), now_ms=now)
    pending = [(server, f) for f in client.start()]
    while pending:
        side, frame = pending.pop(0)
        peer = client if side is server else server
        pending.extend((peer, f) for f in side.receive(FrameType(frame[0]), frame[5:], now_ms=now))
    assert client.session is not None and server.session is not None
    return client.session, server.session


def _metadata(run_id: bytes) -> Transfer:
    return one_file(
        "data.bin",
        len(DATA),
        block_size=BS,
        file_id=b"f" * 16,
        mtime_ns=1,
        streams=4,
        rekey_records=1 << 20,
        rekey_bytes=1 << 30,
        run_id=run_id,
    )


@dataclass
class Disk:
    """The receiver's destination, in memory: the state log's records, whether a partial
    exists, the final file, and a remembered completion."""

    log: dict[int, bytes] = field(default_factory=dict)
    partial: bool = False
    final: bool = False
    remembered: bool = False
    refuse: StxError | None = None
    append_error: StxError | None = None
    ended: list[str] = field(default_factory=list)
    admitted: list[Transfer] = field(default_factory=list)
    #: the digest of block b of what is sent (the one file DATA unless a test says otherwise)
    digest: Callable[[int], bytes] = _digest

    def admit(self, md: Transfer) -> Input:
        if self.refuse is not None:
            return rs.Refused(self.refuse)
        self.admitted.append(md)
        space = md.manifest.space
        if self.remembered and self.final and not self.partial:
            ledger = BlockLedger.of(space, ((b, self.digest(b)) for b in range(space.total)))
            return rs.Admitted(name=md.name, ledger=ledger, complete=True)
        if not self.partial:
            self.log.clear()
            self.partial = True
        return rs.Admitted(name=md.name, ledger=BlockLedger.of(space, self.log.items()))


class Pair:
    """One session: the sender's core and the receiver's core, frames carried between them
    (``drop`` loses frames of a type on the way), effects carried out in memory."""

    def __init__(
        self,
        disk: Disk,
        sender_ledger: BlockLedger,
        *,
        run_id: bytes = b"r" * 16,
        transfer: Transfer | None = None,
        manifest_chunks: list[bytes] | None = None,
        limits: Limits | None = None,
    ):
        ck, sk = _keys()
        self.now = 100.0
        self.disk = disk
        self.sender = ss.SenderSession(
            channel=ControlChannel(session=ck, client=True),
            metadata=transfer if transfer is not None else _metadata(run_id),
            manifest_chunks=manifest_chunks,
            ledger=sender_ledger,
            stall_timeout=60.0,
        )
        self.receiver = rs.ReceiverSession(
            sk, peer="127.0.0.1", stall_timeout=60.0, now=self.now, limits=limits
        )
        self.drop: set[FrameType] = set()
        self.lost: list[FrameType] = []
        self.to_receiver: list[Input] = []
        self.to_sender: list[Input] = []
        self.sender_out: list[Output] = []
        self.receiver_out: list[Output] = []
        self.needed: tuple[int, ...] | None = None
        #: what the receiver's workers report as landed: block -> digest (None: never reports)
        self.lands: Callable[[int], bytes | None] = disk.digest
        self.sender_digest: Callable[[int], bytes] = disk.digest

    # -- carrying frames and effects
    def _carry(self, frames: list[Output], to: list[Input]) -> None:
        for out in frames:
            if isinstance(out, SendFrame):
                ftype = FrameType(out.data[0])
                if ftype in self.drop:
                    self.lost.append(ftype)
                else:
                    to.append(FrameIn(ftype, out.data[5:]))

    def _on_sender(self, outs: list[Output]) -> None:
        self.sender_out += outs
        self._carry(outs, self.to_receiver)
        for out in outs:
            if isinstance(out, ss.StartData):
                self.needed = out.needed
                self._data_phase(out.needed)
            elif isinstance(out, ss.CheckSource):
                self.to_sender.append(ss.SourceChecked(None))

    def _data_phase(self, needed: tuple[int, ...]) -> None:
        """The workers: each block lands at the receiver (reported with its digest) and is
        acknowledged to the sender, whose worker knows the digest of what it sent."""
        landed = [(b, d) for b in needed if (d := self.lands(b)) is not None]
        if landed:
            self.to_receiver.append(rs.BlocksLanded(landed))
        for b in needed:
            self.sender.ledger.record(b, self.sender_digest(b))
        self.to_sender.append(ss.Progressed(self.now))
        self.to_sender.append(ss.DataComplete())

    def _on_receiver(self, outs: list[Output]) -> None:
        self.receiver_out += outs
        self._carry(outs, self.to_sender)
        disk = self.disk
        for out in outs:
            if isinstance(out, rs.Admit):
                self.to_receiver.append(disk.admit(out.md))
            elif isinstance(out, rs.AppendLog):
                if disk.append_error is not None:
                    self.to_receiver.append(rs.AppendFailed(disk.append_error))
                else:
                    disk.log.update(out.blocks)
                    self.to_receiver.append(rs.Appended(out.blocks))
            elif isinstance(out, rs.Finalize):
                if not out.complete:
                    disk.partial, disk.final, disk.log = False, True, {}
                self.to_receiver.append(rs.Finalized())
            elif isinstance(out, rs.CheckPartial):
                self.to_receiver.append(rs.PartialChecked(gone=False))
            elif isinstance(out, rs.EndFiles):
                disk.ended.append(out.how)
                if out.how == "discard":
                    disk.partial, disk.log = False, {}
                elif out.how == "revert":
                    disk.log = dict(out.initial)
            elif isinstance(out, rs.Completed):
                disk.remembered = True

    def run(self) -> None:
        """Start the sender and carry everything until both sides are quiet."""
        self._on_sender(self.sender.start(self.now))
        self.pump()

    def pump(self) -> None:
        while self.to_receiver or self.to_sender:
            while self.to_receiver:
                self._on_receiver(self.receiver.handle(self.to_receiver.pop(0)))
            while self.to_sender:
                self._on_sender(self.sender.handle(self.to_sender.pop(0)))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self._on_receiver(self.receiver.handle(Tick(self.now)))
        self._on_sender(self.sender.handle(Tick(self.now)))
        self.pump()

    def lose_connection(self) -> None:
        """The control connection breaks: both ends hear it."""
        err = ConnectError("connection lost")
        self._on_sender(self.sender.handle(ConnectionLost(err)))
        self._on_receiver(self.receiver.handle(ConnectionLost(err)))
        self.pump()

    # -- what ended
    @staticmethod
    def _end(outs: list[Output]) -> Output | None:
        ends = [o for o in outs if isinstance(o, Failed | Succeeded)]
        assert len(ends) <= 1, ends
        return ends[0] if ends else None

    @property
    def sender_end(self) -> Output | None:
        return self._end(self.sender_out)

    @property
    def receiver_end(self) -> Output | None:
        return self._end(self.receiver_out)

    def events(self, kind: str) -> list[dict[str, object]]:
        return [o.fields for o in self.receiver_out if isinstance(o, rs.Event) and o.kind == kind]

    def sent_error(self) -> bool:
        return any(
            isinstance(o, SendFrame) and o.data[0] == FrameType.ERROR for o in self.receiver_out
        )


def _fresh_ledger() -> BlockLedger:
    return BlockLedger(SPACE)


def _failed_with(end: Output | None, cls: type[StxError]) -> StxError:
    assert isinstance(end, Failed), end
    assert isinstance(end.error, cls), end.error
    return end.error


# ---------------------------------------------------------------- whole transfers


def test_whole_transfer() -> None:
    disk = Disk()
    pair = Pair(disk, _fresh_ledger())
    pair.run()
    assert isinstance(pair.sender_end, Succeeded)
    assert isinstance(pair.receiver_end, Succeeded)
    assert pair.needed == tuple(range(SPACE.total))
    assert disk.final and not disk.partial
    assert [e["file"] for e in pair.events("accepted")] == ["data.bin"]
    done = [o for o in pair.receiver_out if isinstance(o, rs.Completed)]
    assert [d.digest for d in done] == [
        pair.sender.metadata.manifest.tree_digest(pair.sender.ledger)
    ]
    assert pair.sender.state is ss.State.DONE and pair.receiver.state is rs.State.DONE


def _tree_transfer() -> tuple[Transfer, Callable[[int], bytes]]:
    """A small tree (a directory, two files, a symlink, an empty file) and the digest of each
    of its blocks."""
    a, b = os.urandom(BS * 2 + 10), os.urandom(BS)
    entries = [
        Entry(Kind.DIR, "D", 0, 0o755, 1),
        Entry(Kind.FILE, "D/a.bin", len(a), 0o644, 1, extents=(0, len(a)), file_id=b"a" * 16),
        Entry(Kind.FILE, "D/b.bin", len(b), 0o600, 1, extents=(0, len(b)), file_id=b"b" * 16),
        Entry(Kind.FILE, "D/empty", 0, 0o644, 1, file_id=b"e" * 16),
        Entry(Kind.SYMLINK, "D/link", 0, 0o777, 1, link="a.bin"),
    ]
    transfer = tree(entries, block_size=BS, streams=2, run_id=b"t" * 16)
    data = {1: a, 2: b}
    space = transfer.manifest.space

    def digest(block: int) -> bytes:
        ref = space.locate(block)
        return block_digest(data[ref.entry][ref.offset : ref.offset + ref.length])

    return transfer, digest


def test_whole_transfer_of_a_tree() -> None:
    transfer, digest = _tree_transfer()
    disk = Disk(digest=digest)
    pair = Pair(disk, BlockLedger(transfer.manifest.space), transfer=transfer)
    pair.run()
    assert isinstance(pair.sender_end, Succeeded)
    assert isinstance(pair.receiver_end, Succeeded)
    # METADATA, then the manifest's one chunk, before anything else
    sent = [FrameType(o.data[0]) for o in pair.sender_out if isinstance(o, SendFrame)]
    assert sent[:2] == [FrameType.METADATA, FrameType.MANIFEST]
    (admitted,) = disk.admitted
    assert admitted.manifest.entries == transfer.manifest.entries
    assert admitted.manifest.id == transfer.manifest.id
    assert (admitted.manifest.files, admitted.manifest.dirs, admitted.manifest.symlinks) == (
        3,
        1,
        1,
    )
    assert pair.needed == tuple(range(transfer.manifest.space.total)) == (0, 1, 2, 3)
    (accepted,) = pair.events("accepted")
    assert (accepted["files"], accepted["dirs"], accepted["symlinks"]) == (3, 1, 1)
    assert accepted["bytes"] == BS * 3 + 10
    done = [o for o in pair.receiver_out if isinstance(o, rs.Completed)]
    assert [d.digest for d in done] == [transfer.manifest.tree_digest(pair.sender.ledger)]
    assert disk.final and pair.receiver.state is rs.State.DONE


def test_manifest_in_many_chunks() -> None:
    """Every chunk is awaited (WAIT_MANIFEST) before admission."""
    transfer, digest = _tree_transfer()
    entries = transfer.manifest.entries
    parts = [encode_chunk(i, [e]) for i, e in enumerate(entries)]
    many = Transfer(replace(transfer.header, chunks=len(parts)), transfer.manifest)
    disk = Disk(digest=digest)
    pair = Pair(disk, BlockLedger(many.manifest.space), transfer=many, manifest_chunks=parts)
    pair.run()
    assert isinstance(pair.receiver_end, Succeeded) and isinstance(pair.sender_end, Succeeded)
    sent = [FrameType(o.data[0]) for o in pair.sender_out if isinstance(o, SendFrame)]
    assert sent[: 1 + len(parts)] == [FrameType.METADATA] + [FrameType.MANIFEST] * len(parts)
    assert len(disk.admitted) == 1


def test_hostile_manifest_is_refused_before_admission() -> None:
    """A sender that seals a path with ".." in it: ProtocolError, nothing admitted."""
    hostile = [
        Entry(Kind.DIR, "D", 0, 0o755, 1),
        Entry(Kind.FILE, "D/../escape", 5, 0o644, 1, extents=(0, 5), file_id=b"x" * 16),
    ]
    transfer = tree(hostile, block_size=BS, run_id=b"h" * 16)
    disk = Disk()
    pair = Pair(disk, BlockLedger(transfer.manifest.space), transfer=transfer)
    pair.run()
    err = _failed_with(pair.receiver_end, ProtocolError)
    assert "bad manifest" in str(err) and ".." in str(err)
    assert disk.admitted == [] and disk.ended == []
    assert not any(isinstance(o, rs.Admit) for o in pair.receiver_out)
    _failed_with(pair.sender_end, ProtocolError)  # its sealed ERROR reached the sender


def test_manifest_over_max_files_is_rejected_before_admission() -> None:
    transfer, _ = _tree_transfer()  # 5 entries
    disk = Disk()
    pair = Pair(
        disk,
        BlockLedger(transfer.manifest.space),
        transfer=transfer,
        limits=Limits(max_files=4),
    )
    pair.run()
    err = _failed_with(pair.receiver_end, RejectedError)
    assert "--max-files" in str(err)
    assert disk.admitted == [] and disk.ended == []
    assert not any(isinstance(o, rs.Admit) for o in pair.receiver_out)
    _failed_with(pair.sender_end, RejectedError)


def test_resume_sends_only_what_the_receiver_lacks() -> None:
    disk = Disk(partial=True, log={b: _digest(b) for b in (0, 1, 2, 5)})
    sender_ledger = _fresh_ledger()
    for b in range(SPACE.total):  # the sender believed more was acknowledged: 7 was not
        if b != 7:
            sender_ledger.record(b, _digest(b))
    pair = Pair(disk, sender_ledger)
    pair.run()
    assert pair.needed == (3, 4, 6, 7)
    assert isinstance(pair.sender_end, Succeeded) and isinstance(pair.receiver_end, Succeeded)
    reconciled = [o for o in pair.sender_out if isinstance(o, ss.Reconciled)]
    assert [r.held for r in reconciled] == [4]
    assert pair.events("accepted")[0]["resumed_blocks"] == 4


def test_lost_receipt_then_reconnect_gets_it_without_resending() -> None:
    disk = Disk()
    ledger = _fresh_ledger()
    first = Pair(disk, ledger)
    first.drop = {FrameType.RECEIPT}
    first.run()
    assert isinstance(first.receiver_end, Succeeded) and disk.final
    assert first.sender_end is None and first.lost == [FrameType.RECEIPT]
    first.tick(61)  # no receipt within the stall timeout
    _failed_with(first.sender_end, ConnectError)
    again = Pair(disk, ledger)
    again.run()
    assert again.needed is None  # nothing sent again: METADATA_ACK held every block
    assert isinstance(again.sender_end, Succeeded) and isinstance(again.receiver_end, Succeeded)


def test_supersede_ends_the_old_session_quietly() -> None:
    disk = Disk()
    old = Pair(disk, _fresh_ledger())
    old.lands = lambda b: None  # nothing lands yet
    old.drop = {FrameType.END}
    old.run()
    assert old.receiver.state is rs.State.RECEIVING
    old._on_receiver(old.receiver.handle(rs.Superseded()))
    _failed_with(old.receiver_end, ConnectError)
    assert old.events("superseded") == [{"file": "data.bin"}]
    assert not old.sent_error() and not old.events("failed") and disk.ended == []
    new = Pair(disk, _fresh_ledger())
    new.run()
    assert isinstance(new.sender_end, Succeeded) and isinstance(new.receiver_end, Succeeded)


# ---------------------------------------------------------------- failures


def _data_failure(pair: Pair, error: StxError) -> None:
    """A worker reports ``error`` for a stream while the data phase runs."""
    pair.lands = lambda b: None
    pair.drop = {FrameType.END}
    pair.run()
    pair._on_receiver(pair.receiver.handle(rs.StreamBroke(error)))
    pair.drop = set()
    pair.pump()


def test_forged_block_reverts_to_what_was_held_at_admission() -> None:
    disk = Disk(partial=True, log={0: _digest(0)})
    pair = Pair(disk, _fresh_ledger())
    _data_failure(pair, AuthError("forged block"))
    _failed_with(pair.receiver_end, AuthError)
    assert disk.ended == ["revert"] and disk.log == {0: _digest(0)}
    # The sealed ERROR reached a sender already past its data phase: it fails with that error.
    err = _failed_with(pair.sender_end, AuthError)
    assert str(err) == "receiver: forged block"
    assert pair.events("failed")[0]["partial"] == "kept"


def test_forged_block_with_nothing_held_discards() -> None:
    disk = Disk()
    pair = Pair(disk, _fresh_ledger())
    _data_failure(pair, AuthError("forged block"))
    assert disk.ended == ["discard"] and not disk.partial
    assert pair.events("failed")[0]["partial"] == "discarded"


def test_lost_stream_is_not_a_failure() -> None:
    pair = Pair(Disk(), _fresh_ledger())
    _data_failure(pair, ConnectError("data stream dropped"))
    assert pair.receiver_end is None and pair.receiver.state is rs.State.RECEIVING


def test_digest_mismatch_discards() -> None:
    disk = Disk()
    pair = Pair(disk, _fresh_ledger())
    pair.sender_digest = lambda b: _digest(b) if b != 3 else b"\0" * 16
    pair.run()
    _failed_with(pair.receiver_end, rs.DigestMismatch)
    _failed_with(pair.sender_end, IntegrityError)
    assert disk.ended == ["discard"] and not disk.final


def test_missing_blocks_at_end_ask_for_a_reconnect() -> None:
    disk = Disk()
    pair = Pair(disk, _fresh_ledger())
    pair.lands = lambda b: None if b == 6 else _digest(b)  # acknowledged, never recorded
    pair.run()
    assert pair.receiver.state is rs.State.COMPLETING
    pair.tick(rs.COMPLETE_TIMEOUT + 1)
    err = _failed_with(pair.receiver_end, ConnectError)
    assert "1 blocks are missing at END" in str(err)
    _failed_with(pair.sender_end, ConnectError)  # code 4: reconnect
    assert disk.ended == ["keep"] and 6 not in disk.log
    again = Pair(disk, pair.sender.ledger)
    again.run()
    assert again.needed == (6,)
    assert isinstance(again.sender_end, Succeeded)


def test_refused_at_admission() -> None:
    disk = Disk(refuse=RejectedError("not enough space for data.bin"))
    pair = Pair(disk, _fresh_ledger())
    pair.run()
    _failed_with(pair.receiver_end, RejectedError)
    err = _failed_with(pair.sender_end, RejectedError)
    assert "not enough space" in str(err)
    assert disk.ended == [] and not pair.events("failed")


def test_disk_error_recording_progress() -> None:
    disk = Disk(append_error=RejectedError("cannot record progress: disk full"))
    pair = Pair(disk, _fresh_ledger())
    pair.run()
    _failed_with(pair.receiver_end, RejectedError)
    _failed_with(pair.sender_end, RejectedError)
    assert disk.ended == ["keep"]


def test_stall_on_both_sides() -> None:
    disk = Disk()
    pair = Pair(disk, _fresh_ledger())
    pair.drop = {FrameType.METADATA_ACK}
    pair.run()
    pair.drop = {FrameType.ERROR}
    pair.tick(61)
    _failed_with(pair.sender_end, ConnectError)
    _failed_with(pair.receiver_end, ConnectError)
    assert disk.ended == ["keep"]


def test_connection_lost_mid_transfer_keeps_the_partial() -> None:
    disk = Disk()
    pair = Pair(disk, _fresh_ledger())
    pair.lands = lambda b: _digest(b) if b < 4 else None
    pair.drop = {FrameType.END}
    pair.run()
    pair.lose_connection()
    _failed_with(pair.sender_end, ConnectError)
    assert pair.receiver.state is rs.State.GRACE  # a worker's failure report may still come
    pair.tick(rs.LOST_GRACE_S + 0.01)
    _failed_with(pair.receiver_end, ConnectError)
    assert disk.ended == ["keep"] and sorted(disk.log) == [0, 1, 2, 3]
    assert pair.events("failed")[0]["have_bytes"] == 4 * BS


def test_forgery_reported_just_after_the_sender_hung_up_is_judged_as_forgery() -> None:
    disk = Disk()
    pair = Pair(disk, _fresh_ledger())
    pair.lands = lambda b: None
    pair.drop = {FrameType.END}
    pair.run()
    pair.lose_connection()
    pair._on_receiver(pair.receiver.handle(rs.StreamBroke(AuthError("forged block"))))
    pair.pump()
    _failed_with(pair.receiver_end, AuthError)
    assert disk.ended == ["discard"]


def test_sender_error_frame_and_unexpected_frames() -> None:
    pair = Pair(Disk(), _fresh_ledger())
    pair.drop = {FrameType.END}
    pair.lands = lambda b: None
    pair.run()
    # A frame the receiver does not expect in the data phase (a second METADATA).
    again = pair.sender.channel.seal(FrameType.METADATA, pair.sender.metadata.header.encode())
    pair._on_receiver(pair.receiver.handle(FrameIn(FrameType.METADATA, again[5:])))
    pair.pump()
    _failed_with(pair.receiver_end, ProtocolError)
    _failed_with(pair.sender_end, ProtocolError)  # its sealed ERROR reached the sender
    # The sender never sends ERROR; one that arrives all the same is an abort (a reconnect).
    other = Pair(Disk(), _fresh_ledger())
    other.drop = {FrameType.END}
    other.lands = lambda b: None
    other.run()
    frame = other.sender.channel.seal(FrameType.ERROR, b"")
    other._on_receiver(other.receiver.handle(FrameIn(FrameType.ERROR, frame[5:])))
    other.pump()
    err = _failed_with(other.receiver_end, ConnectError)
    assert str(err) == "sender aborted the transfer"
