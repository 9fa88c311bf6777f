"""Shared fixtures: keys, scratch directories on /dev/shm when it exists."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


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
    this test session made, once it is over."""
    tmp = Path(tempfile.gettempdir())

    def ipc_dirs() -> set[Path]:
        return {*tmp.glob("stx-send-*"), *tmp.glob("stx-recv-*")}

    before = ipc_dirs()
    yield
    for p in ipc_dirs() - before:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
