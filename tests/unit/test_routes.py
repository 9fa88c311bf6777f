"""ROUTES (issue 14, part 2): the codec, the receiver's routing policy, a receiving helper's
inode check."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from stxpar.errors import ProtocolError
from stxpar.messages import Landed, decode, encode
from stxpar.recv_cluster import round_robin, usable_address
from stxpar.recv_helper import advertised, local_inode, split_landed
from stxpar.wire import MAX_STREAMS, Routes

pytestmark = pytest.mark.timeout(60)


def test_round_trip_and_places() -> None:
    r = Routes(("dtn2:7001", "[2001:db8::3]:7002"), bytes([0, 1, 2, 1]))
    got = Routes.decode(r.encode())
    assert got == r
    assert [got.place(s) for s in range(6)] == [
        None,
        "dtn2:7001",
        "[2001:db8::3]:7002",
        "dtn2:7001",
        None,
        None,
    ]
    assert got.place(-1) is None
    assert Routes.decode(Routes((), b"").encode()) == Routes((), b"")


@pytest.mark.parametrize(
    "fields",
    [
        [["a:1"], bytes([2])],  # a stream routed to no place
        [["a"], b""],  # no port
        [["a:0"], b""],  # port 0
        [["a:70000"], b""],
        [[":1"], b""],
        [["a b:1"], b""],
        [["x" * 400 + ":1"], b""],
        [[1], b""],
        [["a:1"], "text"],
        [["a:1"] * 256, b""],  # too many places
        [[], bytes(MAX_STREAMS + 1)],  # longer than any stream id
        [[], b"", 3],
        "not a list",
    ],
)
def test_malformed_routes_are_protocol_errors(fields: object) -> None:
    with pytest.raises(ProtocolError):
        Routes.decode(msgpack.packb(fields, use_bin_type=True))


def test_garbage_is_a_protocol_error() -> None:
    for junk in (b"", b"\xc1", os.urandom(64), b"\xdd\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            Routes.decode(junk)


def test_round_robin_weighted_and_interleaved() -> None:
    assert list(round_robin([1, 1, 1], 7)) == [0, 1, 2, 0, 1, 2, 0]
    assert list(round_robin([1, 2], 6)) == [0, 1, 1, 0, 1, 1]
    assert list(round_robin([2, 1, 3], 6)) == [0, 1, 2, 0, 2, 2]
    assert list(round_robin([0, 1], 3)) == [1, 1, 1]  # no local worker: helpers only
    assert list(round_robin([], 3)) == [0, 0, 0]


def test_usable_address() -> None:
    assert usable_address("127.0.0.1:9000") and usable_address("[::1]:9000")
    assert usable_address("dtn2.example.org:1")
    for bad in ("", "0.0.0.0:9000", "[::]:9000", "127.0.0.1:0", "nohost", ":9000"):
        assert not usable_address(bad), bad


def test_advertised_address() -> None:
    assert advertised("127.0.0.1", 5) == "127.0.0.1:5"
    assert advertised("::1", 5) == "[::1]:5"
    assert not advertised("0.0.0.0", 5).startswith("0.0.0.0")


def test_local_inode(scratch: Path) -> None:
    f = scratch / "part"
    f.write_bytes(b"x")
    d = scratch / "stage"
    d.mkdir()
    st, dst = os.lstat(f), os.lstat(d)
    # Another host's device number is replaced with this one's; the inode number must match.
    assert local_inode(str(f), (st.st_dev + 1, st.st_ino), tree=False) == (st.st_dev, st.st_ino)
    assert local_inode(str(d), (7, dst.st_ino), tree=True) == (dst.st_dev, dst.st_ino)
    assert local_inode(str(f), None, tree=False) is None
    with pytest.raises(OSError):
        local_inode(str(f), (st.st_dev, st.st_ino + 1), tree=False)  # another file
    with pytest.raises(OSError):
        local_inode(str(d), (dst.st_dev, dst.st_ino), tree=False)  # not a file
    with pytest.raises(OSError):
        local_inode(str(f), (st.st_dev, st.st_ino), tree=True)  # not a directory
    with pytest.raises(OSError):
        local_inode(str(scratch / "missing"), (1, 2), tree=False)
    (scratch / "link").symlink_to(f)
    with pytest.raises(OSError):
        local_inode(str(scratch / "link"), (st.st_dev, st.st_ino), tree=False)  # no following


def test_split_landed() -> None:
    blocks = tuple((i, bytes(16)) for i in range(5000))
    body = encode(Landed(b"i" * 16, 3, blocks))
    parts = split_landed(body, limit=20_000)
    assert len(parts) > 1 and all(len(p) <= 20_000 for p in parts)
    got = [decode(p, expect=(Landed,)) for p in parts]
    assert tuple(b for m in got for b in m.blocks) == blocks
    assert {(m.session_id, m.stream) for m in got} == {(b"i" * 16, 3)}
    assert split_landed(b"small") == [b"small"]
