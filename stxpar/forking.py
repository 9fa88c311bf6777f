"""Whether this process may fork now (its own module: ``stxpar.prescan`` asks before the rest
of stxpar, ZeroMQ included, is imported)."""

from __future__ import annotations

import os
import sys


def can_fork() -> bool:
    """Whether ``fork_worker`` may fork this process now: Linux, and one thread (a fork while
    another thread holds a lock leaves the child deadlocked; a ZeroMQ context has threads)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False
