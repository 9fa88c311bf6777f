"""``--limit-rate`` through a shaped link (issue 15: "without bursts that overflow a shaped
link"), in a network-namespace lab (tests/netlab.py): a sender host whose uplink is shaped
with tbf, a receiver host behind it. Sending below the link's rate with ``--limit-rate``, the
kernel paces every stream, so tbf never has to drop a packet; without a limit, TCP fills the
link's queue until tbf drops (the control that shows the check can fail).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
from itest_support import STX, make_keyfile, sha256_file, write_random
from netlab import Lab, netlab_fixture  # noqa: F401

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

MiB = 1 << 20


def _dropped(stats: str) -> int:
    m = re.search(r"dropped (\d+)", stats)
    assert m, stats
    return int(m.group(1))


def _send_through(lab: Lab, root: Path, limit: str | None, workers: int = 2) -> int:
    """One transfer from s to r; the packets tbf dropped on s's uplink meanwhile."""
    r, s = lab["r"], lab["s"]
    dest = root / f"dest-{limit or 'none'}"
    dest.mkdir()
    key = root / "stx.key"
    recv = r.popen(
        [
            str(STX),
            "recv",
            "--listen",
            f"{r.addr}:7000",
            "--dest",
            str(dest),
            "--psk-file",
            str(key),
            "--once",
            "--quiet",
        ],  # fmt: skip
    )
    try:
        before = _dropped(s.qdisc_stats())
        argv = [str(STX), "send", str(root / "f.bin"), f"{r.addr}:7000", "--psk-file", str(key)]
        argv += ["--quiet", "--workers", str(workers), "--max-retries", "20"]
        if limit:
            argv += ["--limit-rate", limit]
        done = s.run(argv, timeout=90, capture_output=True)
        assert done.returncode == 0, done.stderr
        assert recv.wait(timeout=30) == 0
        assert sha256_file(dest / "f.bin") == sha256_file(root / "f.bin")
        return _dropped(s.qdisc_stats()) - before
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def test_a_limit_below_the_link_rate_never_overflows_it(netlab: Lab) -> None:
    root = Path(tempfile.mkdtemp(prefix="stx-shaped-", dir="/dev/shm"))
    try:
        make_keyfile(root / "stx.key")
        write_random(root / "f.bin", 24 * MiB)
        netlab.add_host("r")
        netlab.add_host("s", rate="100mbit", burst="64kb", latency="2ms")
        # 8 MiB/s is about 70 Mbit/s on the wire, below the link's 100 Mbit/s
        assert _send_through(netlab, root, "8M") == 0
        # unpaced TCP overflows the same link (four streams: two alone do not always)
        assert _send_through(netlab, root, None, workers=4) > 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
