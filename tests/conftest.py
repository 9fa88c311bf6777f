"""Shared fixtures: keys, scratch directories on /dev/shm when it exists."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stxpar import ipc


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private scratch directory, on tmpfs when available; always removed."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="stx-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def psk() -> bytes:
    return os.urandom(32)


@pytest.fixture(scope="session", autouse=True)
def _remove_ipc_dirs_of_killed_processes() -> Iterator[None]:
    """Tests SIGKILL coordinators on purpose, and a killed process cannot remove its private
    IPC directory (``stx-send-*``/``stx-recv-*`` in the temporary directory). Remove the ones
    this test session made whose process is gone, once it is over."""
    tmp = Path(tempfile.gettempdir())

    def ipc_dirs() -> set[Path]:
        return {*tmp.glob("stx-send-*"), *tmp.glob("stx-recv-*")}

    before = ipc_dirs()
    yield
    # Names carry their owner (pid, start time): remove only those whose owner is gone, never
    # the live directory of another process that shares this temporary directory.
    ipc.remove_stale_dirs()
    for p in ipc_dirs() - before:
        if p.is_dir() and not p.is_symlink() and not ipc.owner_known(p.name):
            shutil.rmtree(p, ignore_errors=True)
