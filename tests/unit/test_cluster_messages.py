"""The cluster port's messages and the helper's pure decisions: limits, garbage, splitting a
report, and whether a layout's files are visible here as the sender sees them."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stxpar import cluster_auth
from stxpar import layout as layout_file
from stxpar import messages as m
from stxpar.errors import ProtocolError
from stxpar.helper import NotVisible, localize, split_report

pytestmark = pytest.mark.timeout(60)


def test_cap_is_the_cluster_channels() -> None:
    assert m.MAX_CLUSTER == cluster_auth.MAX_CLUSTER_MESSAGE
    assert m.LAYOUT_PART + 1024 < m.MAX_CLUSTER


def test_directions_are_kept_apart() -> None:
    assert not set(m.CLUSTER_UP) & set(m.CLUSTER_DOWN)
    with pytest.raises(ProtocolError):
        m.decode_cluster(m.encode(m.Release()), expect=m.CLUSTER_UP)
    with pytest.raises(ProtocolError):
        m.decode_cluster(m.encode(m.Bye()), expect=m.CLUSTER_DOWN)
    with pytest.raises(ProtocolError):  # a worker's message is no cluster message
        m.decode_cluster(m.encode(m.Hello(1)), expect=m.CLUSTER_UP)


def test_layout_part_fits_and_larger_is_refused() -> None:
    part = m.LayoutPart(3, False, os.urandom(m.LAYOUT_PART))
    assert m.decode_cluster(m.encode(part), expect=m.CLUSTER_DOWN) == part
    big = m.encode(m.LayoutPart(0, True, b"x" * m.MAX_CLUSTER))
    with pytest.raises(ProtocolError):
        m.decode_cluster(big, expect=m.CLUSTER_DOWN)
    # the local channel's caps are not the cluster's: 64 KiB byte strings there
    with pytest.raises(ProtocolError):
        m.decode(m.encode(part), expect=(m.LayoutPart,))


def test_wrong_fields_refused() -> None:
    for fields in (
        [1, "c.join", 1, "h", "4", ""],
        [1, "c.assign", [1, "2"]],
        [1, "c.up", "ident", b"body"],
        [1, "c.layout", 0, 1, b""],
        [2, "c.bye"],
    ):
        with pytest.raises(ProtocolError):
            m.decode_cluster(
                msgpack.packb(fields, use_bin_type=True), expect=m.CLUSTER_UP + m.CLUSTER_DOWN
            )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_garbage_gives_only_protocol_errors(data: bytes) -> None:
    try:
        m.decode_cluster(data, expect=m.CLUSTER_UP + m.CLUSTER_DOWN)
    except ProtocolError:
        pass


def test_split_report() -> None:
    small = m.encode(m.Alive(2))
    assert split_report(small) == [small]
    blocks = tuple((i, os.urandom(16)) for i in range(5000))
    body = m.encode(m.Acked(1, blocks, 77))
    parts = split_report(body, limit=20_000)
    assert len(parts) > 1 and all(len(p) <= 20_000 for p in parts)
    got = [m.decode(p, expect=(m.Acked,)) for p in parts]
    assert tuple(b for a in got for b in a.blocks) == blocks
    assert {(a.slot, a.sent) for a in got} == {(1, 77)}
    with pytest.raises(ProtocolError):
        split_report(m.encode(m.WorkerError(1, 4, "x" * 30_000)), limit=20_000)


def _layout_for(path: Path, **change: int) -> bytes:
    st_ = path.stat()
    ident = {
        "dev": st_.st_dev + 1,  # another host's st_dev: replaced, not refused
        "ino": st_.st_ino,
        "size": st_.st_size,
        "mtime_ns": st_.st_mtime_ns,
        "ctime_ns": st_.st_ctime_ns,
    }
    ident.update(change)
    ref = m.FileRef(path=str(path), **ident)
    return layout_file.Layout(1 << 16, ((0, st_.st_size), ()), (ref, None)).encode()


def test_localize_puts_this_hosts_device_in(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    plan = layout_file.Layout.decode(localize(_layout_for(f)))
    ref = plan.files[0]
    assert ref is not None and ref.dev == f.stat().st_dev and ref.ino == f.stat().st_ino
    assert plan.files[1] is None and plan.extents == ((0, 100), ())


@pytest.mark.parametrize("field", ["ino", "size", "mtime_ns", "ctime_ns"])
def test_localize_refuses_another_file(tmp_path: Path, field: str) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    wrong = {field: getattr(f.stat(), f"st_{field}") + 1}
    with pytest.raises(NotVisible, match=str(f)):
        localize(_layout_for(f, **wrong))


def test_localize_refuses_a_missing_file_or_a_symlink(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    data = _layout_for(f)
    f.rename(tmp_path / "g")
    with pytest.raises(NotVisible):
        localize(data)
    (tmp_path / "f").symlink_to(tmp_path / "g")
    with pytest.raises(NotVisible):
        localize(data)


def test_localize_garbage_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        localize(b"\x93\x01\x02")


def test_send_options_for_a_cluster() -> None:
    from stxpar.config import SendOptions
    from stxpar.errors import UsageError

    assert SendOptions(workers=0, cluster="10.0.0.1:7000").resolved().workers == 0
    for bad in (
        SendOptions(workers=0),
        SendOptions(cluster_workers=2),
        SendOptions(cluster="nowhere"),
        SendOptions(cluster="h:7000", cluster_wait=-1),
    ):
        with pytest.raises(UsageError):
            bad.resolved()


def test_summary_counts_hosts() -> None:
    from stxpar.cli import send_summary
    from stxpar.config import TransferResult

    r = TransferResult(
        file="f",
        bytes=1 << 20,
        seconds=1.0,
        workers=5,
        block_size=1 << 20,
        blocks_total=1,
        digest="ab" * 32,
        extra={"hosts": {"a": 1, "b": 2, "c": 2}, "remote_workers": 4, "helpers": 2},
    )
    assert "3 hosts, 5 workers (4 remote)" in send_summary(r)
    assert r.as_json()["hosts"] == {"a": 1, "b": 2, "c": 2}
