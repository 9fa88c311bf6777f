"""How many workers a sender and a receiver start when not told (``stxpar.config``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stxpar.config import default_workers, is_loopback

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("10.0.0.1", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("example.org", False),
        ("localhost.example.org", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, local: bool) -> None:
    assert is_loopback(host) is local


_PROBE = """
import os, sys
from stxpar.config import default_workers
os.sched_setaffinity(0, set(map(int, sys.argv[1].split(","))))
print(default_workers(), default_workers(peer_on_this_machine=True))
"""


def _defaults_on(cpus: list[int]) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(map(str, cpus))],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_defaults_follow_the_cpus_this_process_may_use() -> None:
    """One per CPU between 2 and 8; half that, between 1 and 8, when the receiver shares them.
    Affinity sets of 1, 2 and (where the machine has them) 4 and 16 CPUs, in a child process."""
    mine = sorted(os.sched_getaffinity(0))
    want = {1: (2, 1), 2: (2, 1), 4: (4, 2), 16: (8, 8)}
    for n, expected in want.items():
        if len(mine) >= n:
            assert _defaults_on(mine[:n]) == expected, f"{n} CPUs"


def test_defaults_in_this_process() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert default_workers() == max(2, min(8, cpus))
    assert default_workers(peer_on_this_machine=True) == max(1, min(8, cpus // 2))
