"""The layout file (stxpar/layout.py): what a coordinator tells its workers about where each
block's bytes live. Round trips for both kinds (a sender's source files with their identity, a
receiver's partial names) and a ProtocolError for every malformed file, never a wrong layout."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from stxpar import layout
from stxpar.errors import ProtocolError
from stxpar.layout import MAGIC, Layout
from stxpar.messages import FileRef

pytestmark = pytest.mark.timeout(30)

EXTENTS = ((0, 100), (), (0, 4096, 8192, 10), (), (0, 1))


def _sender_layout() -> Layout:
    refs = [
        FileRef("/src/a", 1, 11, 100, 5, 6),
        None,
        FileRef("/src/sparse", 1, 12, 9000, 7, 8),
        None,
        FileRef("/src/\u00e9t\u00e9", 2, 13, 1, 9, 10),
    ]
    return Layout(1 << 20, EXTENTS, tuple(refs))


def test_a_sender_layout_round_trips() -> None:
    plan = _sender_layout()
    back = Layout.decode(plan.encode())
    assert back.block_size == plan.block_size
    assert back.extents == EXTENTS
    assert [back.files[i] for i in range(len(EXTENTS))] == list(plan.files)
    assert back.name(2) == "/src/sparse" and back.name(1) is None
    assert back.space().total == plan.space().total


def test_a_receiver_layout_round_trips() -> None:
    names = {
        0: ("p0.stxpart", 10, 1_000_000_007, 0o644),
        2: ("p2.stxpart", 1 << 20, 5, 0o600),
        4: ("p4.stxpart", 7, 0, 0o755),
    }
    plan = Layout.named(1 << 16, EXTENTS, names)
    back = Layout.decode(plan.encode())
    assert back.extents == EXTENTS
    assert {i: back.name(i) for i in range(len(EXTENTS))} == {
        0: "p0.stxpart",
        1: None,
        2: "p2.stxpart",
        3: None,
        4: "p4.stxpart",
    }
    assert {i: back.finished(i) for i in names} == names
    with pytest.raises(ProtocolError):  # an entry with no data has no finished file
        back.finished(1)


def test_a_receiver_layout_from_its_columns_is_the_same_file() -> None:
    names = {
        0: ("p0.stxpart", 10, 1_000_000_007, 0o644),
        2: ("p2.stxpart", 1 << 20, 5, 0o600),
        4: ("p4.stxpart", 7, 0, 0o755),
    }
    index = sorted(names)
    data = layout.receiver_bytes(
        1 << 16,
        EXTENTS,
        index,
        [names[i][0] for i in index],
        [names[i][1] for i in index],
        [names[i][2] for i in index],
        [names[i][3] for i in index],
    )
    assert data == Layout.named(1 << 16, EXTENTS, names).encode()
    back = Layout.decode(data)
    assert {i: back.finished(i) for i in names} == names
    empty = layout.receiver_bytes(4096, ((), ()), [], [], [], [], [])
    assert empty == Layout.named(4096, ((), ()), {}).encode()


def test_a_layout_without_files_round_trips() -> None:
    plan = Layout.named(4096, ((), ()), {})
    back = Layout.decode(plan.encode())
    assert back.extents == ((), ()) and back.name(0) is None and back.name(1) is None


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "layout"
    layout.write(str(path), _sender_layout())
    assert layout.read(str(path)).extents == EXTENTS
    with pytest.raises(FileExistsError):  # never over an existing file
        layout.write(str(path), _sender_layout())


def _body() -> list[object]:
    return msgpack.unpackb(_sender_layout().encode(), raw=False)  # type: ignore[no-any-return]


def _broken(change: str) -> bytes:
    body = _body()
    if change == "magic":
        body[0] = "stx3 layout"  # the row format of an older stx
    elif change == "no-entries":
        body[2] = 0
    elif change == "columns":
        body[6] = body[6][:-1]  # a path short
    elif change == "counts":
        body[4][0] += 2  # claims more extent numbers than there are
    elif change == "index-high":
        body[3][-1] = body[2]
    elif change == "index-negative":
        body[3][0] = -1
    elif change == "index-twice":
        body[3][1] = body[3][0]
    elif change == "count-negative":
        body[4][0], body[4][1] = -2, body[4][1] + 2 + 2
    elif change == "extents-type":
        body[5][0] = "zero"
    elif change == "short":
        body = body[:-1]
    elif change == "not-a-list":
        return msgpack.packb({"magic": MAGIC})  # type: ignore[no-any-return]
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "change",
    [
        "magic",
        "no-entries",
        "columns",
        "counts",
        "index-high",
        "index-negative",
        "index-twice",
        "count-negative",
        "short",
        "not-a-list",
    ],
)
def test_a_malformed_layout_is_a_protocol_error(change: str) -> None:
    with pytest.raises(ProtocolError, match="malformed layout file"):
        Layout.decode(_broken(change))


def test_truncated_and_garbage_layouts_are_protocol_errors() -> None:
    data = _sender_layout().encode()
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(ProtocolError):
            Layout.decode(data[:cut])
    with pytest.raises(ProtocolError):
        Layout.decode(b"\xc1" * 64)


def test_an_extent_that_is_not_a_number_fails_when_the_space_is_built() -> None:
    """Decoding keeps the numbers as given (a worker decodes a million entries); a wrong type
    still never yields a block space."""
    plan = Layout.decode(_broken("extents-type"))
    with pytest.raises((TypeError, ValueError)):
        plan.space()
