"""The sender's summary line: size, time and rate must add up, resumed or not."""

from __future__ import annotations

from dataclasses import replace

from stxpar.cli import send_summary
from stxpar.config import TransferResult

GIB = 1 << 30


def _result(resumed: int) -> TransferResult:
    return TransferResult(
        file="big.img",
        bytes=3 * GIB,
        seconds=2.0,
        workers=2,
        block_size=4 << 20,
        blocks_total=768,
        digest="44380dc59b7e99e1" * 4,
        bytes_resumed=resumed,
    )


def test_a_fresh_transfer_states_size_time_and_rate() -> None:
    line = send_summary(_result(0))
    assert line.startswith("sent big.img: 3.0 GiB in 2.00 s (1610.6 MB/s, 2 streams, digest ")
    assert "already there" not in line


def test_a_resumed_transfer_says_what_was_already_there() -> None:
    """The rate is of the bytes this run moved; without the note, '3.0 GiB in 2.00 s
    (536.9 MB/s)' would not add up."""
    line = send_summary(_result(2 * GIB))
    assert line.startswith("sent big.img: 3.0 GiB, 2.0 GiB of it already there in 2.00 s ")
    assert "(536.9 MB/s," in line


def test_one_stream_is_singular() -> None:
    line = send_summary(replace(_result(0), workers=1))
    assert "(1610.6 MB/s, 1 stream, digest " in line
