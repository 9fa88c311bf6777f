"""The ``stx``, ``stx-send`` and ``stx-recv`` entry points: what must happen before the CLI's
imports.

``stx send`` of a tree starts its walk here, in a forked child (``stxpar.prescan``), before it
imports the CLI and what the CLI needs (the options, the handshake, ZeroMQ, the protocol's
messages: about a tenth of a second): the walk and the imports then take two cores instead of
one after the other. The PATHs are read from the command line as argparse will read them
(``SEND_VALUE_OPTIONS``, the options of ``stx send`` that take a value, is kept equal to the
parser's by a test); when the parser finds other PATHs, or another ``--quiet`` (an unusual
command line: abbreviated options, ``--`` tricks), the early walk is dropped and ``stx send``
walks as it would have. This module imports nothing heavy itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .prescan import Prescan

#: The options of ``stx send`` that take a value (the next argument, or after "=").
SEND_VALUE_OPTIONS = frozenset(
    {
        "--psk-file",
        "--workers",
        "--block-size",
        "--max-retries",
        "--stall-timeout",
        "--deadline",
        "--to",
        "--as",
        "--limit-rate",
        "--cluster",
        "--cluster-workers",
        "--cluster-wait",
    }
)
_QUIET = ("--quiet", "-q")


class EarlyWalk:
    """A walk started before the command line was parsed, and what it guessed."""

    def __init__(self, paths: list[str], quiet: bool, walk: Prescan) -> None:
        self.paths = paths
        self.quiet = quiet
        self.walk = walk


def guess(argv: Sequence[str]) -> tuple[list[str], bool] | None:
    """The PATHs and ``--quiet`` of ``stx send``'s arguments ``argv`` (what follows "send"),
    or None when there is nothing to walk."""
    positional: list[str] = []
    quiet = False
    take_value = False
    only_positional = False
    for arg in argv:
        if take_value:
            take_value = False
        elif only_positional or arg == "-" or not arg.startswith("-"):
            positional.append(arg)
        elif arg == "--":
            only_positional = True
        elif arg in _QUIET:
            quiet = True
        elif arg in SEND_VALUE_OPTIONS:
            take_value = True
        # else: a flag, or an option with its value after "="
    if len(positional) < 2:
        return None
    return positional[:-1], quiet  # the last is HOST:PORT


def _start(argv: Sequence[str]) -> EarlyWalk | None:
    got = guess(argv)
    if got is None:
        return None
    paths, quiet = got
    from .prescan import start

    def warn(text: str) -> None:
        if not quiet:
            print(f"warning: {text}", file=sys.stderr)

    walk = start(paths, warn)
    return None if walk is None else EarlyWalk(paths, quiet, walk)


def main() -> int:
    argv = sys.argv[1:]
    early = _start(argv[1:]) if argv[:1] == ["send"] else None
    from .cli import main as cli_main

    rc = cli_main(early=early)
    if argv[:1] == ["send"]:
        _exit_now(rc)
    return rc


def send_main() -> int:
    early = _start(sys.argv[1:])
    from .cli import send_main as cli_send_main

    _exit_now(cli_send_main(early=early))
    return 1  # (not reached)


def _exit_now(rc: int) -> None:
    """End ``stx send`` at once: it has closed its workers, connections and files itself,
    and the interpreter's own tear-down (every module, every object of a big tree's
    manifest) would add some milliseconds to every transfer for nothing."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


def recv_main() -> int:
    from .cli import recv_main as cli_recv_main

    return cli_recv_main()
