"""RecvOptions: validation, what resolved() fills in, the Receiver's keyword arguments, and the
CLI defaults and help text taken from the options."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import stxpar
from stxpar.cli import build_parser
from stxpar.config import (
    RecvOptions,
    ResolvedRecvOptions,
    SendOptions,
    default_workers,
)
from stxpar.errors import UsageError
from stxpar.fsutil import process_umask

KEY = b"k" * 32


def test_defaults_resolve_to_concrete_values() -> None:
    opts = RecvOptions().resolved()
    assert isinstance(opts, ResolvedRecvOptions)
    assert opts.workers == default_workers()
    assert opts.max_handshakes_per_ip_per_s == 25.0  # half of 50
    assert opts.stall_timeout == 60.0
    assert opts.fd_reserve is None  # automatic, judged against the limit in force


@pytest.mark.parametrize(("total", "per_ip"), [(50.0, 25.0), (3.0, 2.0), (1.0, 1.0)])
def test_per_address_rate_defaults_to_half_at_least_two(total: float, per_ip: float) -> None:
    assert RecvOptions(max_handshakes_per_s=total).resolved().max_handshakes_per_ip_per_s == per_ip


def test_every_field_is_documented() -> None:
    source = Path(stxpar.config.__file__).read_text()
    body = source[source.index("class RecvOptions") : source.index("def resolved(self) -> Resol")]
    lines = body.splitlines()
    for f in dataclasses.fields(RecvOptions):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
        assert lines[at - 1].strip().startswith("#:"), f"{f.name} has no #: comment"


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"max_streams": 0}, "max_streams, max_worker_streams and worker_timeout must be positive"),
        ({"max_worker_streams": 0}, "max_streams, max_worker_streams and worker_timeout"),
        ({"worker_timeout": 0.0}, "max_streams, max_worker_streams and worker_timeout"),
        ({"workers": 0}, "--workers must be between 1 and"),
        ({"window_ms": 0}, "window, handshake timeout and handshake rate must be positive"),
        ({"handshake_timeout": -1.0}, "window, handshake timeout and handshake rate"),
        ({"max_handshakes_per_s": 0.0}, "window, handshake timeout and handshake rate"),
        ({"max_pending": 0}, "connection and session caps must be at least 1"),
        ({"max_pending_per_ip": 0}, "connection and session caps must be at least 1"),
        ({"max_sessions": 0}, "connection and session caps must be at least 1"),
        ({"max_handshakes_per_ip_per_s": 0.0}, "the per-address handshake rate must be positive"),
        ({"stall_timeout": 0.0}, "the stall timeout must be a positive number of seconds"),
        ({"stall_timeout": float("nan")}, "the stall timeout must be a positive number"),
    ],
)
def test_bad_values_are_usage_errors(changes: dict[str, object], text: str) -> None:
    with pytest.raises(UsageError, match=text):
        RecvOptions(**changes).resolved()  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=text):
        stxpar.Receiver("/nonexistent", psk=KEY, **changes)


def test_receiver_folds_keyword_arguments_into_its_options(tmp_path: Path) -> None:
    r = stxpar.Receiver(tmp_path, psk=KEY, workers=3, once=True, max_streams=9)
    assert r.options.workers == 3 and r.options.once and r.options.max_streams == 9
    assert r.workers == 3 and r.once and r.max_streams == 9
    base = RecvOptions(workers=2, stall_timeout=5)
    r = stxpar.Receiver(tmp_path, psk=KEY, options=base, stall_timeout=7)
    assert r.options.workers == 2 and r.options.stall_timeout == 7.0
    assert r.stall_timeout == 7.0
    with pytest.raises(TypeError):
        stxpar.Receiver(tmp_path, psk=KEY, no_such_option=1)


def test_the_umask_is_read_without_being_set() -> None:
    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_recv_cli_defaults_come_from_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    opts = RecvOptions()
    args = build_parser().parse_args(["recv", "--dest", "d"])
    assert args.clock_window * 1000 == opts.window_ms
    assert args.max_streams == opts.max_streams
    assert args.stall_timeout == opts.stall_timeout
    assert args.workers is None and opts.workers is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["recv", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {opts.max_streams})" in help_text
    assert f"default {opts.stall_timeout:g}" in help_text
    assert f"(default {opts.window_ms / 1000:g})" in help_text


def test_send_cli_defaults_come_from_the_options() -> None:
    opts = SendOptions()
    args = build_parser().parse_args(["send", "f", "h:1"])
    assert args.max_retries == opts.max_retries
    assert args.stall_timeout == opts.stall_timeout
    assert args.deadline == opts.deadline
