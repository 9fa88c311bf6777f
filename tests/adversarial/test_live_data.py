"""Attacks on data streams and on the end of a transfer, against a live receiver.

Who can do what:

* JOIN attacks (a made-up proof, an unknown or ended session, a JOIN replayed on a second
  connection) need **no key**: the session id travels in the clear in every honest JOIN.
* Moving, replaying, reordering, duplicating, flipping or dropping records is what an on-path
  attacker **without the key** does to an honest sender's frames. A real sender cannot be made
  to emit a chosen frame on cue, so the tests *stage* the honest frames with the key
  (``BlockSealer`` under the session's real keys) and then perform the keyless manipulation.
* An END with a wrong digest or block count needs the key (a buggy or hostile sender): the
  receiver still does not commit.

Every test ends with the receiver serving a legitimate ``stxpar.send``; anything forged is
never marked received in the state log, and nothing uncommitted ever takes the final name.
"""

from __future__ import annotations

import os
import socket

import pytest
from attacker import (
    BLOCK,
    Arena,
    FrameFilter,
    Peer,
    Session,
    Stream,
    expect_refused,
    make_metadata,
    open_session,
    raw_frame,
    rewrite_block,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from itest_support import wait_for
from tcp_relay import RelayConnection, TcpRelay

import stxpar
import stxpar.receiver
import stxpar.recv_session
from stxpar.wire import HEADER, Ack, End, ErrorMsg, FrameType

T = FrameType
SIZE = 3 * BLOCK
FORGED = "failed authentication (forged or altered data)"


def _data() -> bytes:
    return os.urandom(SIZE)


def _finish(s: Session, data: bytes, stream: int, *, need: list[int] | None = None) -> None:
    """Complete ``s`` honestly on a fresh stream and check the RECEIPT and the file."""
    assert s.md is not None
    st_ = s.stream(stream)
    blocks = need if need is not None else list(range(s.md.total_blocks))
    for i in blocks:
        st_.send_block(i, data)
    st_.wait_durable(blocks)
    st_.finish()
    s.send_end(data)
    receipt = s.receipt()
    assert receipt is not None and receipt.size == len(data)
    s.close()


def _take_file(arena: Arena, name: str, data: bytes) -> None:
    """The honest file arrived intact; remove it so the destination is empty again."""
    arena.settle()
    assert (arena.dest / name).read_bytes() == data
    assert arena.leftovers() == {name}
    (arena.dest / name).unlink()


def _forget(arena: Arena, name: str, *, active: int = 0) -> None:
    """Remove what a session that ended without a forgery left for a resume of ``name``."""
    arena.nothing_marked(name, active=active)
    for p in arena.dest.glob(f".{name}.stx*"):
        p.unlink()


def _expect_forgery(
    arena: Arena, s: Session, st_: Stream, seq: int, *, held: frozenset[int] = frozenset()
) -> None:
    """A forged record: the stream and the control connection get the AuthError and the
    session ends. Nothing it received is trusted: no final file, and the state log (if the
    partial is kept at all) holds at most the blocks ``held`` at admission."""
    msg = f"block {seq} {FORGED}"
    got = st_.read()
    assert isinstance(got, ErrorMsg) and (got.code, got.message) == (3, msg), got
    expect_refused(s.peer, 3, msg)
    st_.close()
    s.close()
    assert s.md is not None
    arena.nothing_marked(s.md.name, allowed=held)
    arena.clean()


# ---------------------------------------------------------------- JOIN


@pytest.mark.timeout(60)
def test_join_without_a_valid_proof_is_dropped_and_counted(arena: Arena) -> None:
    data, evil = _data(), _data()
    s = open_session(arena.addr, arena.psk, make_metadata("joined.bin", SIZE))
    before = arena.receiver.dropped_streams
    forged = s.stream(0, mac=os.urandom(32), join=False)
    # The made-up JOIN, with blocks right behind it (sealed under the real stream key even:
    # the worst case), all in one write.
    forged.send(forged.join_frame + forged.seal(0, evil) + forged.seal(1, evil))
    expect_refused(forged.peer, None)
    forged.close()
    assert arena.receiver.dropped_streams == before + 1
    arena.nothing_marked("joined.bin", active=1)
    # The stream number was not used up, and the honest file is what lands.
    _finish(s, data, 0)
    _take_file(arena, "joined.bin", data)
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["random session id", "another session's id", "ended session"])
def test_join_for_a_session_it_does_not_belong_to(arena: Arena, which: str) -> None:
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("target.bin", SIZE))
    other = open_session(arena.addr, arena.psk, make_metadata("other.bin", SIZE))
    if which == "ended session":
        other.close()
        arena.nothing_marked("other.bin", active=1)
        st_ = other.stream(0, join=False)  # a valid proof, for a session that is gone
    elif which == "random session id":
        st_ = s.stream(0, session_id=os.urandom(16), join=False)
    else:  # names the target session, proves a key of the other one
        st_ = other.stream(0, session_id=s.session_id, join=False)
    before = arena.receiver.dropped_streams
    st_.send(st_.join_frame + st_.seal(0, data))
    expect_refused(st_.peer, None)
    st_.close()
    assert arena.receiver.dropped_streams == before + 1
    other.close()
    _forget(arena, "other.bin", active=1)  # its partial, left for a resume
    _finish(s, data, 0)
    _take_file(arena, "target.bin", data)
    arena.unharmed()


@pytest.mark.timeout(60)
def test_join_replayed_on_a_second_connection(arena: Arena) -> None:
    """The attacker copies an honest JOIN and the honest first block onto a connection of its
    own: a stream number joins once."""
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("replayed-join.bin", SIZE))
    honest = s.stream(0)
    first = honest.send_block(0, data)
    honest.wait_durable([0])
    before = arena.receiver.dropped_streams
    with Peer(arena.addr) as copy:
        copy.send_bytes(honest.join_frame + first)
        expect_refused(copy, None)
    assert arena.receiver.dropped_streams == before + 1
    for i in (1, 2):
        honest.send_block(i, data)
    honest.wait_durable([1, 2])
    honest.finish()
    s.send_end(data)
    assert s.receipt() is not None
    s.close()
    _take_file(arena, "replayed-join.bin", data)
    arena.unharmed()


@pytest.mark.timeout(60)
def test_number_of_streams_per_session_is_bounded(arena: Arena) -> None:
    """Needs the key: even a key holder gets at most 4 x streams + 64 stream numbers."""
    s = open_session(arena.addr, arena.psk, make_metadata("many.bin", SIZE, streams=1))
    limit = 4 * 1 + 64

    def accepted() -> int:
        return int(arena.receiver.registry.snapshot()["streams"][s.session_id])

    streams: list[Stream] = []
    for n in range(limit):  # in batches, to stay under the per-address pre-auth cap
        streams.append(s.stream(n))
        if n % 16 == 15 or n == limit - 1:
            assert wait_for(lambda: accepted() == len(streams))
    before = arena.receiver.dropped_streams
    extra = s.stream(limit)
    expect_refused(extra.peer, None)
    assert arena.receiver.dropped_streams == before + 1
    for x in [*streams, extra]:
        x.close()
    s.close()
    arena.nothing_marked("many.bin")
    arena.clean()
    arena.unharmed()


# ---------------------------------------------------------------- moved and replayed records


@pytest.mark.timeout(60)
def test_block_swapped_between_streams(arena: Arena) -> None:
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("swapped.bin", SIZE))
    st0, st1 = s.stream(0), s.stream(1)
    st0.send(st1.seal(0, data))  # stream 1's record of block 0, on stream 0
    _expect_forgery(arena, s, st0, 0)
    st1.close()
    arena.unharmed()


@pytest.mark.timeout(60)
def test_block_copied_into_another_session(arena: Arena) -> None:
    """Two sessions at once; a record of session A is copied into session B's stream. B ends
    and is discarded; A, whose record still arrives, completes unharmed."""
    data_a = _data()
    a = open_session(arena.addr, arena.psk, make_metadata("a.bin", SIZE))
    b = open_session(arena.addr, arena.psk, make_metadata("b.bin", SIZE))
    sa, sb = a.stream(0), b.stream(0)
    record = sa.seal(0, data_a)
    sb.send(record)
    msg = f"block 0 {FORGED}"
    got = sb.read()
    assert isinstance(got, ErrorMsg) and (got.code, got.message) == (3, msg)
    expect_refused(b.peer, 3, msg)
    b.close()
    sb.close()
    sa.send(record)
    for i in (1, 2):
        sa.send_block(i, data_a)
    sa.wait_durable([0, 1, 2])
    sa.finish()
    a.send_end(data_a)
    assert a.receipt() is not None
    a.close()
    _take_file(arena, "a.bin", data_a)  # and no trace of b.bin
    arena.unharmed()


@pytest.mark.timeout(60)
def test_block_replayed_from_an_earlier_session_of_the_same_file(arena: Arena) -> None:
    data = _data()
    file_id = os.urandom(16)
    first = open_session(arena.addr, arena.psk, make_metadata("same.bin", SIZE, file_id=file_id))
    old = first.stream(0)
    recorded = [old.seal(i, data) for i in range(3)]  # what the attacker saw go by
    old.send(recorded[0])
    old.wait_durable([0])
    old.close()
    first.close()  # the session dies; block 0 stays for a resume
    arena.nothing_marked("same.bin", allowed={0})

    second = open_session(arena.addr, arena.psk, make_metadata("same.bin", SIZE, file_id=file_id))
    assert second.held == [0]  # a resume of the same file
    new = second.stream(0)
    new.send(recorded[1])  # the earlier session's record of block 1
    _expect_forgery(arena, second, new, 1, held=frozenset({0}))
    arena.unharmed()


# ---------------------------------------------------------------- damaged and forged records

# offsets in a BLOCK frame: header 0-4, seq 5-8, size 9-12, ciphertext 13.., tag, CRC (last 4)
CT, TAG, CRC_AT = HEADER.size + 8 + 100, -4 - 8, -2

TAMPER = {
    # name: (rewrite_block keywords, outcome)
    "ciphertext bit, CRC fixed": ({"flip_at": CT}, "forged"),
    "tag bit, CRC fixed": ({"flip_at": TAG}, "forged"),
    "index to another full block, CRC fixed": ({"seq": 1}, "forged"),
    "ciphertext bit, CRC not fixed": ({"flip_at": CT, "fix_crc": False}, "resend"),
    "CRC bit": ({"flip_at": CRC_AT, "fix_crc": False}, "resend"),
    "index out of range, CRC fixed": ({"seq": 99}, "dropped: block 99 has a bad index or length"),
    "length field, CRC fixed": ({"size": BLOCK - 1}, "dropped: block 0 has a bad index or length"),
    "length field, CRC not fixed": (
        {"size": BLOCK - 1, "fix_crc": False},
        "dropped: damaged BLOCK frame header",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_block(arena: Arena, case: str) -> None:
    kw, outcome = TAMPER[case]
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("tampered.bin", SIZE))
    st_ = s.stream(0)
    st_.send(rewrite_block(st_.seal(0, data), **kw))  # type: ignore[arg-type]
    if outcome == "forged":
        _expect_forgery(arena, s, st_, 1 if "index" in case else 0)
    elif outcome == "resend":
        got = st_.read()
        assert isinstance(got, Ack) and got.durable == () and got.resend == (0,), got
        arena.nothing_marked("tampered.bin", active=1)
        # The honest retransmission is a new record, and it is what lands.
        st_.send_block(0, data)
        st_.wait_durable([0])
        _finish(s, data, 1, need=[1, 2])
        st_.close()
        _take_file(arena, "tampered.bin", data)
    else:
        got = st_.read()
        assert isinstance(got, ErrorMsg), got
        assert (got.code, got.message) == (4, f"data stream {outcome}")
        assert st_.read() is None  # and closed
        st_.close()
        arena.nothing_marked("tampered.bin", active=1)
        _finish(s, data, 1)  # the session goes on; a new stream delivers the file
        _take_file(arena, "tampered.bin", data)
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["reordered", "duplicated"])
def test_records_reordered_or_duplicated(arena: Arena, how: str) -> None:
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("order.bin", SIZE))
    st_ = s.stream(0)
    r0, r1 = st_.seal(0, data), st_.seal(1, data)
    if how == "reordered":
        st_.send(r1 + r0)
        _expect_forgery(arena, s, st_, 1)
    else:
        st_.send(r0)
        st_.wait_durable([0])
        st_.send(r0)
        _expect_forgery(arena, s, st_, 0)  # block 0 had landed: discarded all the same
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            raw_frame(T.BLOCK, b"", length=2**32 - 1),
            f"BLOCK frame of 4294967295 bytes exceeds the limit of {8 + BLOCK + 20}",
        ),
        (raw_frame(T.BLOCK, bytes(10)), "short BLOCK frame"),
        (raw_frame(T.BLOCK, b""), "short BLOCK frame"),
        (raw_frame(T.METADATA, bytes(40)), "METADATA frame of 40 bytes exceeds the limit of -1"),
        (raw_frame(T.JOIN, bytes(40)), "JOIN frame of 40 bytes exceeds the limit of -1"),
    ],
    ids=["block-2^32-1", "block-short", "block-empty", "metadata-on-stream", "join-twice"],
)
def test_malformed_frames_on_a_data_stream(arena: Arena, frame: bytes, message: str) -> None:
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("malformed.bin", SIZE))
    st_ = s.stream(0)
    st_.send(frame)
    got = st_.read()
    assert isinstance(got, ErrorMsg), got
    assert (got.code, got.message) == (4, f"data stream dropped: {message}")
    st_.close()
    arena.nothing_marked("malformed.bin", active=1)
    _finish(s, data, 1)
    _take_file(arena, "malformed.bin", data)
    arena.unharmed()


def _block_frame(seq: int, size: int, body: bytes) -> bytes:
    """A BLOCK frame with a correct frame length, the given header fields and any body."""
    payload = seq.to_bytes(4, "big") + size.to_bytes(4, "big") + body
    return HEADER.pack(T.BLOCK, len(payload)) + payload


@pytest.mark.timeout(90)
def test_garbage_after_a_valid_join(arena: Arena) -> None:
    """Needs the key to get a stream accepted. Random bytes on the stream only ever cost that
    stream (or ask for a resend); the session survives and delivers the honest file."""
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("garbage.bin", SIZE, streams=16))
    numbers = iter(range(1, 100))
    block_header = st.tuples(
        st.integers(0, 4), st.sampled_from([BLOCK, 0, 5, 2**32 - 1]), st.binary(max_size=64)
    ).map(lambda t: _block_frame(*t))
    plausible = st.tuples(st.integers(0, 2), st.randoms(use_true_random=False)).map(
        lambda t: _block_frame(t[0], BLOCK, t[1].randbytes(BLOCK + 20))
    )
    garbage = st.one_of(st.binary(max_size=300), block_header, plausible)

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(junk=garbage)
    def attack(junk: bytes) -> None:
        x = s.stream(next(numbers))
        x.send(junk)
        x.peer.sock.shutdown(socket.SHUT_WR)
        while True:
            got = x.read()
            if got is None:
                break
            if isinstance(got, ErrorMsg):
                assert got.code == 4 and got.message.startswith("data stream dropped: ")
            else:
                assert got.durable == ()
        x.close()

    attack()
    arena.nothing_marked("garbage.bin", active=1)
    _finish(s, data, 0)
    _take_file(arena, "garbage.bin", data)
    arena.unharmed()


# ---------------------------------------------------------------- truncation


@pytest.fixture
def quick_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    """How long the receiver waits after END for missing blocks (10 s by default)."""
    monkeypatch.setattr(stxpar.recv_session, "COMPLETE_TIMEOUT", 0.5)


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("quick_complete")
@pytest.mark.parametrize("how", ["last block dropped", "closed mid-block"])
def test_blocks_missing_at_end_are_never_committed(arena: Arena, how: str) -> None:
    """The sender's last block never arrives whole (dropped by an on-path attacker, or the
    stream cut mid-block), and END follows: no final file, nothing of the lost block marked,
    and the sender is told to reconnect (a retryable connection-failure ERROR)."""
    data = _data()
    before = len(arena.receiver.completed)
    s = open_session(arena.addr, arena.psk, make_metadata("truncated.bin", SIZE))
    st_ = s.stream(0)
    for i in (0, 1):
        st_.send_block(i, data)
    st_.wait_durable([0, 1])
    last = st_.seal(2, data)
    if how == "closed mid-block":
        st_.send(last[: len(last) // 2])
    st_.close()
    s.send_end(data)
    expect_refused(s.peer, 4, "1 blocks are missing at END; resend them")
    s.close()
    arena.nothing_marked("truncated.bin", allowed={0, 1})
    assert len(arena.receiver.completed) == before
    arena.clean()
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("end", "code", "message", "kept"),
    [
        ("wrong digest", 5, "whole-transfer digest mismatch for end.bin", set()),
        ("wrong block count", 1, "END names a different number of blocks", {0, 1, 2}),
        ("forged", 3, "END failed authentication", set()),
    ],
)
def test_bad_end_is_never_committed(
    arena: Arena, end: str, code: int, message: str, kept: set[int]
) -> None:
    """Every block arrived, but END is wrong: a wrong digest or count needs the key (a buggy
    or hostile sender); a forged END is what an on-path attacker without the key can send.
    No final file; after a digest mismatch or a forgery no block of the session stays marked
    (a wrong count only ends the session: its honest blocks stay for a resume)."""
    data = _data()
    s = open_session(arena.addr, arena.psk, make_metadata("end.bin", SIZE))
    st_ = s.stream(0)
    for i in range(3):
        st_.send_block(i, data)
    st_.wait_durable([0, 1, 2])
    st_.finish()
    if end == "wrong digest":
        s.send_end(data, digest=os.urandom(32))
    elif end == "wrong block count":
        s.send_sealed(T.END, End(2, os.urandom(32)).encode())
    else:
        s.peer.send_frame(T.END, os.urandom(50))
    expect_refused(s.peer, code, message)
    s.close()
    arena.nothing_marked("end.bin", allowed=kept)
    arena.clean()
    arena.unharmed()


INJECTED = {
    # what the attacker sends the sender in place of the RECEIPT: (frame, error the run ends with)
    "nothing": (b"", stxpar.ConnectError),
    "forged RECEIPT": (raw_frame(T.RECEIPT, os.urandom(60)), stxpar.AuthError),
    "unauthenticated ERROR": (
        raw_frame(T.ERROR, ErrorMsg(4, "all good, retry").encode()),
        stxpar.StxError,
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("injected", list(INJECTED))
def test_dropped_end_with_the_real_sender(arena: Arena, injected: str) -> None:
    """An on-path attacker (no key) swallows the real sender's END, and answers in the
    receiver's place with nothing, a forged RECEIPT or an ERROR of its own: the receiver never
    commits, the sender does not report success (with nothing, it waits ``stall_timeout`` for
    the RECEIPT), and a later run resumes and completes."""
    fake, raised = INJECTED[injected]
    src = arena.src / "no-end.bin"
    data = _data()
    src.write_bytes(data)
    before = len(arena.receiver.completed)
    drop_end = FrameFilter(lambda direction, ftype: direction == "up" and ftype == T.END)

    def attack(conn: RelayConnection, direction: str, chunk: bytes) -> bytes:
        dropped = len(drop_end.dropped)
        out = drop_end(conn, direction, chunk)
        if fake and len(drop_end.dropped) > dropped:  # END just went by on this connection
            conn.client.sendall(fake)  # towards the sender, as if from the receiver
        return out

    with TcpRelay(arena.addr, transform=attack) as relay:
        with pytest.raises(raised):
            stxpar.send(
                src,
                *relay.address,
                psk=arena.psk,
                workers=1,
                block_size=BLOCK,
                options=stxpar.SendOptions(max_retries=0, stall_timeout=2.0),
            )
    assert drop_end.dropped == [("up", T.END)]
    arena.nothing_marked("no-end.bin", allowed={0, 1, 2})
    assert len(arena.receiver.completed) == before
    result = stxpar.send(src, *arena.addr, psk=arena.psk, workers=1, block_size=BLOCK)
    assert result.blocks_resumed == 3
    _take_file(arena, "no-end.bin", data)
    src.unlink()
    arena.unharmed()
