"""``stx send``'s early walk (``stxpar.launch``): the PATHs it reads from the command line
before argparse runs, and the options list that reading depends on, kept equal to the
parser's."""

from __future__ import annotations

import argparse

import pytest

from stxpar import cli, launch


def _send_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["send"]


def test_the_value_options_are_the_parsers() -> None:
    parser = _send_parser()
    takes_value = {
        name
        for action in parser._actions
        if action.option_strings and action.nargs != 0
        for name in action.option_strings
    }
    assert takes_value == launch.SEND_VALUE_OPTIONS
    quiet = {n for a in parser._actions if a.dest == "quiet" for n in a.option_strings}
    assert quiet == set(launch._QUIET)


@pytest.mark.parametrize(
    ("argv", "paths", "quiet"),
    [
        (["tree", "h:1"], ["tree"], False),
        (["a", "b", "h:1", "--workers", "4", "-q"], ["a", "b"], True),
        (["--psk-file", "k", "a", "--json", "h:1"], ["a"], False),
        (["--block-size=1M", "a", "h:1", "--quiet"], ["a"], True),
        (["--to", "sub", "--as", "x", "a", "h:1"], ["a"], False),
        (["--", "-odd", "h:1"], ["-odd"], False),
        (["-", "h:1"], ["-"], False),
    ],
)
def test_the_paths_are_read_as_argparse_reads_them(
    argv: list[str], paths: list[str], quiet: bool
) -> None:
    assert launch.guess(argv) == (paths, quiet)
    args = _send_parser().parse_args(argv)
    assert args.paths == paths and args.quiet == quiet


@pytest.mark.parametrize("argv", [[], ["h:1"], ["--workers", "2", "h:1"], ["-q"]])
def test_nothing_to_walk(argv: list[str]) -> None:
    assert launch.guess(argv) is None
