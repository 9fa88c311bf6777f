"""``stx send``'s PATHs, HOST:PORT and options in any order, as scp and rsync take them."""

from __future__ import annotations

import argparse

import pytest

from stxpar.cli import _add_send_args, _Parser, build_parser

pytestmark = pytest.mark.timeout(30)

ORDERS = [
    ["a", "b", "h:1", "--psk-file", "k", "--workers", "3"],
    ["a", "b", "--psk-file", "k", "h:1", "--workers", "3"],
    ["--psk-file", "k", "a", "--workers", "3", "b", "h:1"],
    ["a", "--psk-file", "k", "b", "--workers", "3", "h:1"],
]


@pytest.mark.parametrize("argv", ORDERS, ids=["options-last", "between", "mixed", "each-between"])
def test_send_takes_options_anywhere(argv: list[str]) -> None:
    args = build_parser().parse_args(["send", *argv])
    assert (args.paths, args.address, args.psk_file, args.workers) == (
        ["a", "b"],
        ("h", 1),
        "k",
        3,
    )


def test_stx_send_alias_too() -> None:
    parser = _Parser(prog="stx-send")
    _add_send_args(parser)
    args = parser.parse_args(["a", "--psk-file", "k", "b", "h:1"])
    assert (args.paths, args.address) == (["a", "b"], ("h", 1))


def test_a_path_after_double_dash() -> None:
    args = build_parser().parse_args(["send", "--psk-file", "k", "--", "-odd", "h:1"])
    assert (args.paths, args.address) == (["-odd"], ("h", 1))


def test_no_address_is_one_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["send", "a", "--psk-file", "k"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HOST:PORT" in err[0], err


def test_other_commands_are_unchanged() -> None:
    args = build_parser().parse_args(["recv", "--listen", "127.0.0.1:0", "--dest", "d"])
    assert isinstance(args, argparse.Namespace) and args.command == "recv"
