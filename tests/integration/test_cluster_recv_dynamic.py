"""Receiving helpers that join or die while a session runs (issue 14): a helper that joins
mid-transfer takes streams of that very session, and a dead helper's streams go to the
surviving helpers as well as to the receiver. Real ``stx recv``/``stx send``/``stx worker``
processes on 127.0.0.1; the sender's ``--limit-rate`` keeps the transfer going for a few
seconds, so that the change happens in its data phase."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from itest_support import sha256_file, wait_for, write_random
from test_cluster_recv import DATA_PORT, _joined, _landed, rig  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
REROUTED = re.compile(r"streams rerouted \(([^:]+): [^)]*\): (.*)")


def _reroutes(stderr: str, reason: str) -> list[dict[str, int]]:
    """The receiver's ``streams rerouted`` lines for ``reason``: place -> stream ids."""
    out = []
    for why, rest in REROUTED.findall(stderr):
        if why == reason:
            out.append({p: int(n) for n, p in re.findall(r"(\d+) to (\S+?)(?:,|$)", rest)})
    return out


def _data_port(helper: Any) -> str:
    m = DATA_PORT.search(helper.stderr)
    assert m, helper.stderr
    return str(m.group(1))


def test_helper_joining_mid_transfer_takes_streams(rig: dict[str, Any]) -> None:  # noqa: F811
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 48 * MIB)
    recv = rig["receiver"]("--cluster-workers", "1")
    first = rig["helper"]("--once")
    assert wait_for(lambda: _joined(first), timeout=20)
    send = rig["sender"](src, recv.address, "--workers", "4", "--limit-rate", "6M")
    dest: Path = rig["root"] / "dest"
    assert wait_for(lambda: "receiving big" in recv.stderr, timeout=20), recv.stderr
    time.sleep(1.0)
    assert send.proc.poll() is None, send.stderr  # still in its data phase
    late = rig["helper"]("--once")
    assert wait_for(lambda: _joined(late), timeout=20), late.stderr
    assert send.wait(timeout=80) == 0, send.stderr + recv.stderr
    assert recv.wait(timeout=20) == 0, recv.stderr
    assert sha256_file(dest / "big") == digest
    # The late helper landed blocks of this very transfer (--once: it then exits 0).
    assert late.wait(timeout=20) == 0, late.stderr
    assert _landed(late) and _landed(late)[0] > 0, late.stderr
    joined = _reroutes(recv.stderr, "helper joined")
    assert joined and _data_port(late) in joined[0], recv.stderr
    result = send.json()
    assert result["streams_moved"] > 0, result
    assert "Traceback" not in recv.stderr + send.stderr + late.stderr


def test_dead_helpers_streams_go_to_the_survivors_too(rig: dict[str, Any]) -> None:  # noqa: F811
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 64 * MIB)
    recv = rig["receiver"]("--cluster-workers", "2")
    victim, survivor = rig["helper"](), rig["helper"]()
    assert wait_for(lambda: _joined(victim) and _joined(survivor), timeout=20)
    send = rig["sender"](src, recv.address, "--workers", "6", "--limit-rate", "8M")
    assert wait_for(lambda: "receiving big" in recv.stderr, timeout=20), recv.stderr
    time.sleep(1.5)
    assert send.proc.poll() is None, send.stderr
    victim.kill_group()  # SIGKILL: the helper and its workers
    assert send.wait(timeout=90) == 0, send.stderr + recv.stderr
    assert recv.wait(timeout=20) == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    # The victim's stream ids were dealt over the survivor and the receiver (weighted 1:1).
    left = _reroutes(recv.stderr, "helper left")
    assert left, recv.stderr
    assert left[0].get(_data_port(survivor), 0) > 0, recv.stderr
    assert left[0].get("receiver", 0) > 0, recv.stderr
    assert wait_for(lambda: bool(_landed(survivor)), timeout=10), survivor.stderr
    assert "Traceback" not in recv.stderr + send.stderr
