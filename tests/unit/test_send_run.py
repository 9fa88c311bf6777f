"""The run's state across sessions and the reconnect policy, in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from stxpar.config import SendOptions
from stxpar.errors import ConnectError
from stxpar.netio import Backoff
from stxpar.send_run import Retry, Run
from stxpar.send_session import DeadlineReached
from stxpar.source import SourceFile

OPTS = SendOptions(max_retries=2, backoff=Backoff(initial=1.0, factor=2.0, cap=30.0))


def test_gives_up_after_max_retries_consecutive_failures() -> None:
    r = Retry(OPTS, None)
    assert 0.5 <= r.after(ConnectError("x"), now=0.0, progressed=False) <= 1.0
    assert 1.0 <= r.after(ConnectError("x"), now=0.0, progressed=False) <= 2.0
    with pytest.raises(ConnectError, match=r"^x \(gave up after 3 attempts\)$"):
        r.after(ConnectError("x"), now=0.0, progressed=False)


def test_progress_starts_the_count_again() -> None:
    r = Retry(OPTS, None)
    for _ in range(5):
        r.after(ConnectError("x"), now=0.0, progressed=True)
    assert r.failures == 1


def test_deadline() -> None:
    opts = SendOptions(max_retries=9, deadline=10.0, backoff=Backoff(initial=4.0))
    r = Retry(opts, 10.0)
    with pytest.raises(DeadlineReached, match=r"^x \(deadline of 10 s reached\)$"):
        r.after(ConnectError("x"), now=10.0, progressed=False)
    with pytest.raises(ConnectError, match=r"deadline of 10 s reached"):
        r.after(ConnectError("x"), now=9.0, progressed=False)  # the wait would pass it


def test_resumed_only_on_the_first_ack(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10_000)
    src = SourceFile.open(p)
    try:
        run = Run.new(src, 4096)
        assert run.total == 3 and run.complete == 0
        assert run.resumed(2, 8192) is True
        assert (run.blocks_resumed, run.bytes_resumed) == (2, 8192)
        assert run.resumed(3, 10_000) is False and run.blocks_resumed == 2
        run2 = Run.new(src, 4096)
        assert run2.resumed(0, 0) is False and run2.blocks_resumed == 0
    finally:
        src.close()
