"""Fixtures for the adversarial suite: a real ``stxpar.Receiver`` (its worker processes are real
processes) on a loopback port, its destination inside a scratch parent directory, and the checks
every attack ends with:

* ``arena.nothing_written()``: once the receiver has settled (no session, no reserved name, no
  pre-authentication slot held), the destination is empty and nothing appeared beside it;
* ``arena.nothing_marked(name, ...)``: after a legitimate admission, the state log records no
  block the attack forged, and no final file exists;
* ``arena.still_serving()``: a legitimate ``stxpar.send`` of a small file succeeds.
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
for _p in (str(_HERE), str(_HERE.parent), str(_HERE.parent / "integration")):
    # attacker.py, tests/tcp_relay.py, tests/integration/itest_support.py
    if _p not in sys.path:
        sys.path.insert(0, _p)

from attacker import Arena, close_all_peers  # noqa: E402

import stxpar  # noqa: E402


def _tmp_root() -> Path:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return Path(tempfile.mkdtemp(prefix="stx-adv-", dir=base))


@pytest.fixture(scope="module")
def module_psk() -> bytes:
    return stxpar.generate_key()


@pytest.fixture(scope="module")
def module_arena(module_psk: bytes) -> Iterator[Arena]:
    """One receiver for a whole module (workers=2 so streams can land on different workers)."""
    root = _tmp_root()
    arena = Arena(root, module_psk, workers=2, handshake_timeout=1.5)
    try:
        with arena.receiver:
            yield arena
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def arena(module_arena: Arena) -> Iterator[Arena]:
    """The module's receiver, with an empty destination at the start and the end of a test."""
    module_arena.settle()
    module_arena.clean()
    with module_arena._events_lock:
        module_arena.events.clear()
    yield module_arena
    close_all_peers()
    try:
        module_arena.settle()
    finally:
        module_arena.clean()


@pytest.fixture
def make_arena() -> Iterator[Callable[..., Arena]]:
    """A factory for a receiver of one's own: ``make_arena(max_pending=8, ...)``."""
    made: list[tuple[Arena, Path]] = []

    def factory(**receiver_kw: Any) -> Arena:
        root = _tmp_root()
        arena = Arena(root, stxpar.generate_key(), **receiver_kw)
        made.append((arena, root))
        arena.receiver.start()
        return arena

    try:
        yield factory
    finally:
        close_all_peers()
        for arena, root in made:
            arena.receiver.stop()
            shutil.rmtree(root, ignore_errors=True)
