"""A local user swaps the partial file between admission and a data stream's JOIN.

Receiver workers open ``.NAME.stxpart`` by path when a stream joins. Before the check, a file
planted at that name (by whoever can rename entries in the destination) received the
stream's decrypted blocks: the transfer failed later, at the inode check before the rename,
but the plaintext had already leaked into the planter's file. Now the worker writes nothing
unless the file it opened is the inode the session created. The client here holds the key and
speaks the protocol by hand (``tests/adversarial/attacker.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ADV = str(Path(__file__).resolve().parent.parent / "adversarial")
if _ADV not in sys.path:
    sys.path.insert(0, _ADV)

from attacker import ErrorMsg, close_all_peers, make_metadata, open_session  # noqa: E402
from itest_support import wait_for  # noqa: E402

import stxpar  # noqa: E402

BLOCK = 4096


@pytest.fixture(autouse=True)
def _close_peers() -> Iterator[None]:
    yield
    close_all_peers()


@pytest.mark.timeout(60)
def test_stream_into_a_swapped_partial_writes_nothing(scratch: Path, psk: bytes) -> None:
    dest = scratch / "dest"
    dest.mkdir()
    events: list[tuple[str, dict]] = []
    data = os.urandom(3 * BLOCK + 100)
    planted_bytes = b"P" * len(data)
    with stxpar.Receiver(
        dest, psk=psk, workers=1, on_event=lambda k, f: events.append((k, f))
    ) as r:
        md = make_metadata("swap.bin", len(data), block_size=BLOCK, streams=1)
        s = open_session(r.address, psk, md)
        part = dest / ".swap.bin.stxpart"
        assert part.exists()
        planted = dest / "planted"
        planted.write_bytes(planted_bytes)
        os.chmod(planted, 0o600)
        os.replace(planted, part)  # the swap, after admission, before any stream
        stream = s.stream(0)
        for seq in range(md.total_blocks):
            try:
                stream.send_block(seq, data)
            except OSError:
                break  # the receiver already cut the stream
        reply = stream.read(timeout=10)
        assert isinstance(reply, ErrorMsg), reply
        assert "removed or replaced" in reply.message, reply.message
        assert part.read_bytes() == planted_bytes, "the stream wrote into the planted file"
        s.send_end(data)
        assert s.receipt(timeout=10) is None
        assert wait_for(lambda: any(k == "failed" for k, _ in events), timeout=10), events
    assert not (dest / "swap.bin").exists()
    assert part.read_bytes() == planted_bytes
