"""Fixtures for the integration tests: real processes, real loopback sockets.

The helpers live in ``itest_support`` (a uniquely named module, so that test modules can import
them whatever other conftest.py files exist).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):  # itest_support and tests/tcp_relay.py
    if _p not in sys.path:
        sys.path.insert(0, _p)

from itest_support import CliReceiver, make_keyfile  # noqa: E402


@pytest.fixture
def cli_receiver(scratch: Path) -> Iterator[Callable[..., CliReceiver]]:
    """A factory: ``cli_receiver(keyfile, dest, **kw)`` starts ``stx recv``; all are stopped."""
    started: list[CliReceiver] = []
    logdir = scratch / "logs"
    logdir.mkdir(exist_ok=True)

    def factory(keyfile: Path, dest: Path, **kw: Any) -> CliReceiver:
        r = CliReceiver(keyfile, dest, logdir, **kw)
        started.append(r)
        return r.start()

    try:
        yield factory
    finally:
        for r in started:
            r.stop()


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[Path]:
    """A module-wide scratch directory on tmpfs when available; always removed."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="stx-itest-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keyfile(scratch: Path) -> tuple[Path, bytes]:
    """A key file made by ``stx keygen -o`` (mode 0600) and the key in it."""
    path = scratch / "stx.key"
    return path, make_keyfile(path)
