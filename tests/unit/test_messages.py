"""The typed coordinator/worker protocol: round trips, strict decoding, garbage in."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stxpar import messages as m
from stxpar.errors import ProtocolError

pytestmark = pytest.mark.timeout(60)

SAMPLES: list[m.Message] = [
    m.Hello(slot=3),
    m.Get(slot=0),
    m.Setup(
        stream=7,
        secret=b"s" * 32,
        session_id=b"i" * 16,
        host="127.0.0.1",
        port=9000,
        layout="/run/stxpar/c1/layout-1",
        manifest_id=b"f" * 16,
        rekey_records=1 << 20,
        rekey_bytes=1 << 36,
        connect_timeout=10.0,
    ),
    m.Blocks(blocks=(1, 2, 3)),
    m.Blocks(blocks=(4,), pace=25 << 20),
    m.Done(),
    m.Acked(slot=1, blocks=((5, b"d" * 16), (6, b"")), sent=9),
    m.Sent(slot=1, count=9),
    m.Retransmit(slot=1, seq=5),
    m.WorkerError(slot=1, code=4, message="connection lost"),
    m.StreamJob(
        session_id=b"i" * 16,
        stream=2,
        secret=b"s" * 32,
        path="/dest/.f.stxpart",
        tree=False,
        layout="/run/stxpar/r1/layout-2",
        manifest_id=b"f" * 16,
        rekey_records=1,
        rekey_bytes=2,
        sync_bytes=3,
        streams=4,
        inode=(8, 9),
    ),
    m.Cancel(session_id=b"i" * 16),
    m.Pace(rate=100 << 20),
    m.Prepare(session_id=b"\x03" * 16, layout="/tmp/stx-recv-1/layout-03"),
    m.Ready(),
    m.Beat(),
    m.Landed(session_id=b"i" * 16, stream=2, blocks=((0, b"d" * 16),)),
    m.StreamFailed(session_id=b"i" * 16, stream=2, code=3, message="forged block"),
    m.StreamClosed(session_id=b"i" * 16, stream=2),
    m.Alive(slot=1),
    m.Join(version=1, host="dtn2", workers=4, data_listen=""),
    m.Welcome(role="send"),
    m.LayoutPart(index=0, last=True, data=b"layout"),
    m.Assign(slots=(4, 5)),
    m.Stop(slots=(4,)),
    m.Down(ident=b"\x00abcd", body=b"\x93\x01\xa4done"),
    m.Release(),
    m.Up(ident=b"\x00abcd", body=b"\x92\x01\xa5hello"),
    m.Report(body=b"\x93\x01\xa5alive\x01"),
    m.Exited(slot=4, status=0),
    m.Refuse(reason="not visible here"),
    m.Bye(),
    m.HelperBeat(),
    m.SessionLayout(session_id=b"i" * 16, index=0, last=True, data=b"layout"),
    m.StreamOffer(
        session_id=b"i" * 16,
        streams=(1, 4),
        secrets=(b"s" * 32, b"s" * 32),
        path="/dest/.f.stxpart",
        tree=False,
        manifest_id=b"m" * 16,
        rekey_records=1 << 20,
        rekey_bytes=1 << 30,
        sync_bytes=8 << 20,
        nstreams=4,
        inode=(1, 2),
    ),
    m.Offered(session_id=b"i" * 16, ok=False, reason="not visible here"),
    m.RecvCancel(session_id=b"i" * 16),
]
EVERY_KIND = tuple({type(s) for s in SAMPLES})


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg: m.Message) -> None:
    assert m.decode(m.encode(msg), expect=(type(msg),)) == msg


def _job() -> m.StreamJob:
    (job,) = (s for s in SAMPLES if isinstance(s, m.StreamJob))
    return job


def test_every_kind_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(m._KINDS.values())


def test_stream_secrets_stay_out_of_reprs() -> None:
    for msg in SAMPLES:
        if hasattr(msg, "secret") or hasattr(msg, "secrets"):
            assert repr(b"s" * 32) not in repr(msg) and "secret" not in repr(msg)


def test_inode_may_be_none() -> None:
    job = dataclasses.replace(_job(), inode=None)  # type: ignore[type-var]
    assert m.decode(m.encode(job), expect=(m.StreamJob,)) == job


def test_tree_job_round_trips() -> None:
    job = dataclasses.replace(_job(), tree=True, path="/dest/.stx-tree")  # type: ignore[type-var]
    got = m.decode(m.encode(job), expect=(m.StreamJob,))
    assert got == job and got.tree is True


def test_only_expected_kinds() -> None:
    with pytest.raises(ProtocolError, match="unexpected worker message 'done'"):
        m.decode(m.encode(m.Done()), expect=m.SENDER_REPORTS)


def test_version_checked() -> None:
    data = msgpack.packb([m.VERSION + 1, "get", 1])
    with pytest.raises(ProtocolError, match="version"):
        m.decode(data, expect=(m.Get,))


@pytest.mark.parametrize(
    "fields",
    [
        [m.VERSION, "get"],  # a field missing
        [m.VERSION, "get", 1, 2],  # one too many
        [m.VERSION, "get", "1"],  # a string for an int
        [m.VERSION, "get", True],  # a bool is not an int
        [m.VERSION, "blocks", [1, "x"]],
        [m.VERSION, "acked", 1, [[1, 2]], 3],  # an int for a digest
        [
            m.VERSION,
            "stream",
            b"i",
            1,
            b"s",
            "p",
            False,
            "l",
            b"f",
            1,
            1,
            1,
            1,
            [1],
        ],  # half an inode
        [m.VERSION, "stream", b"i", 1, b"s", "p", 1, "l", b"f", 1, 1, 1, 1, [1, 2]],  # int for tree
        [
            m.VERSION,
            "stream",
            b"i",
            1,
            b"s",
            "p",
            False,
            b"l",
            b"f",
            1,
            1,
            1,
            1,
            None,
        ],  # bin layout
        [m.VERSION, "setup", 1, b"s", b"i", "h", 1, "l", "f", 1, 1, 1.0],  # str manifest id
    ],
)
def test_wrong_fields(fields: list[object]) -> None:
    with pytest.raises(ProtocolError):
        m.decode(msgpack.packb(fields, use_bin_type=True), expect=EVERY_KIND)


def test_limits() -> None:
    with pytest.raises(ProtocolError):
        m.decode(b"\x00" * (m.MAX_MESSAGE + 1), expect=EVERY_KIND)
    huge = msgpack.packb([m.VERSION, "cancel", b"x" * (m.MAX_BIN + 1)], use_bin_type=True)
    with pytest.raises(ProtocolError):
        m.decode(huge, expect=EVERY_KIND)
    mapped = msgpack.packb([m.VERSION, "cancel", {"a": 1}], use_bin_type=True)
    with pytest.raises(ProtocolError):
        m.decode(mapped, expect=EVERY_KIND)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_gives_only_protocol_errors(data: bytes) -> None:
    try:
        m.decode(data, expect=EVERY_KIND)
    except ProtocolError:
        pass


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(m._KINDS)), st.lists(plain, max_size=14))
def test_wrong_shapes_give_only_protocol_errors(tag: str, fields: list[object]) -> None:
    data = msgpack.packb([m.VERSION, tag, *fields], use_bin_type=True)
    try:
        got = m.decode(data, expect=EVERY_KIND)
    except ProtocolError:
        return
    assert m.decode(m.encode(got), expect=EVERY_KIND) == got
