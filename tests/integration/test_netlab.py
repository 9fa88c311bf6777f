"""The network lab (tests/netlab.py): real TCP between namespaces, links down and up, tbf
installed at the asked rate, processes killed, and nothing left behind whatever happens.

No timings are asserted here: how close tbf gets to its rate is measured by perf/netlab_rate.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from netlab import Host, Lab, available, cleanup_stale, lab_names, netlab_fixture  # noqa: F401

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

TESTS_DIR = str(Path(__file__).resolve().parent.parent)

#: argv: ADDR. Prints its port, then for each connection reads to EOF and answers
#: "<peer address> <bytes read>".
SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept()
    n = 0
    while b := c.recv(1 << 16):
        n += len(b)
    c.sendall(f"{peer[0]} {n}\\n".encode())
    c.close()
"""

#: argv: ADDR PORT NBYTES TIMEOUT. Sends NBYTES, prints the server's answer.
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
c.sendall(bytes(int(sys.argv[3])))
c.shutdown(socket.SHUT_WR)
print(c.makefile().readline().strip())
"""


def start_server(host: Host) -> int:
    """Start the counting server on ``host``; its port."""
    p = host.popen([sys.executable, "-c", SERVER, host.addr], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip().isdigit(), f"server did not start: {line!r}"
    return int(line)


def send(
    client: Host, server: Host, port: int, nbytes: int, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", CLIENT, server.addr, str(port), str(nbytes), str(timeout)]
    return client.run(argv, capture_output=True, text=True, timeout=timeout + 20)


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def tbf(stats: str) -> tuple[int, int]:
    """(rate in bit/s, bytes sent) of the root tbf qdisc in ``tc -s qdisc show`` output."""
    m = re.search(r"qdisc tbf \S+ root .*?rate (\d+(?:\.\d+)?)([KMG]?)bit", stats)
    assert m, f"no root tbf qdisc in {stats!r}"
    rate = float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)]
    sent = re.search(r"Sent (\d+) bytes", stats)
    assert sent, stats
    return int(rate), int(sent.group(1))


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_nothing_left(tag: str) -> None:
    namespaces, links = lab_names(tag)
    assert namespaces == [] and links == [], (namespaces, links)


def test_available_here() -> None:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    assert reason is None


def test_tcp_between_hosts(netlab: Lab) -> None:
    a, b = netlab.add_host("a"), netlab.add_host("b")
    port = start_server(a)
    done = send(b, a, port, 1 << 20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b.addr, str(1 << 20)]


def test_isolated_from_root_namespace(netlab: Lab) -> None:
    a = netlab.add_host("a")
    for dev in (netlab.bridge, a.peer):
        assert sh("ip", "-o", "addr", "show", "dev", dev) == "", dev
        assert sh("ip", "route", "show", "dev", dev) == "", dev
    # the host knows its /24 and nothing else: no default route out of the lab
    routes = sh("ip", "-n", a.ns, "route", "show").splitlines()
    assert routes and all(r.startswith(f"{netlab.subnet}.0/24 ") for r in routes), routes
    assert ",UP," in sh("ip", "-n", a.ns, "-o", "link", "show", "lo")


def test_link_down_blocks_then_link_up_restores(netlab: Lab) -> None:
    a, b = netlab.add_host("a"), netlab.add_host("b")
    port = start_server(a)
    b.link_down()
    assert send(b, a, port, 10, timeout=2).returncode != 0  # b cannot reach out
    a_port_b = start_server(b)
    assert send(a, b, a_port_b, 10, timeout=2).returncode != 0  # nor be reached
    b.link_up()
    assert wait_until(lambda: send(b, a, port, 10, timeout=2).returncode == 0, timeout=20)
    assert send(a, b, a_port_b, 10, timeout=5).returncode == 0


def test_tbf_installed_at_the_asked_rate_and_counting(netlab: Lab) -> None:
    shaped = netlab.add_host("shaped", rate="400mbit", rate_in="200mbit")
    plain = netlab.add_host("plain")
    assert tbf(shaped.qdisc_stats())[0] == 400 * 10**6
    assert tbf(shaped.qdisc_stats(ingress=True))[0] == 200 * 10**6
    assert "tbf" not in sh("ip", "netns", "exec", plain.ns, "tc", "qdisc", "show")

    out0 = tbf(shaped.qdisc_stats())[1]
    size = 2 << 20
    up = send(shaped, plain, start_server(plain), size)  # the shaped host's uplink
    assert up.returncode == 0, up.stderr
    out1, in1 = tbf(shaped.qdisc_stats())[1], tbf(shaped.qdisc_stats(ingress=True))[1]
    assert out1 - out0 >= size
    down = send(plain, shaped, start_server(shaped), size)  # its downlink
    assert down.returncode == 0, down.stderr
    assert tbf(shaped.qdisc_stats(ingress=True))[1] - in1 >= size


def test_kill_all_leaves_no_process(netlab: Lab) -> None:
    h = netlab.add_host("h")
    ours = [h.popen(["sleep", "300"]), h.popen(["sh", "-c", "sleep 300 & sleep 300 & wait"])]
    stranger = subprocess.Popen(h.cmd(["sleep", "300"]))  # not started through the lab
    try:
        assert wait_until(lambda: len(h.pids()) >= 5)
        h.kill_all()
        assert h.pids() == []
        assert [p.returncode for p in ours] == [-signal.SIGKILL] * 2
        assert stranger.wait(timeout=10) == -signal.SIGKILL
    finally:
        stranger.kill()
        stranger.wait()


def test_cleanup_when_the_body_raises() -> None:
    if (reason := available()) is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        h = lab.add_host("h", rate="100mbit", rate_in="100mbit")
        lab.add_host("g")
        sleeper = h.popen(["sleep", "300"])
        assert len(lab_names(lab.tag)[0]) == 2
        raise RuntimeError("boom")
    assert lab.closed
    assert sleeper.returncode == -signal.SIGKILL
    assert_nothing_left(lab.tag)
    lab.close()  # again: nothing to do


LAB_IN_CHILD = f"""
import sys, time
sys.path.insert(0, {TESTS_DIR!r})
import netlab
lab = netlab.Lab()
lab.add_host("x", rate="100mbit").popen(["sleep", "300"])
lab.add_host("y")
print(lab.tag, flush=True)
if sys.argv[1] == "hang":
    time.sleep(300)
"""


def lab_in_child(mode: str) -> tuple[subprocess.Popen[str], str]:
    p = subprocess.Popen(
        [sys.executable, "-c", LAB_IN_CHILD, mode], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    return p, p.stdout.readline().strip()


def test_cleanup_at_interpreter_exit() -> None:
    if (reason := available()) is not None:
        pytest.skip(reason)
    p, tag = lab_in_child("exit")
    assert tag, "child made no lab"
    assert p.wait(timeout=30) == 0
    assert_nothing_left(tag)


def test_cleanup_stale_removes_a_crashed_run() -> None:
    if (reason := available()) is not None:
        pytest.skip(reason)
    p, tag = lab_in_child("hang")
    try:
        assert tag, "child made no lab"
        namespaces, links = lab_names(tag)
        assert len(namespaces) == 2 and len(links) == 3  # bridge and two peers
        pids = [int(x) for ns in namespaces for x in sh("ip", "netns", "pids", ns).split()]
        assert pids, "the sleeper should be running"
        assert tag not in " ".join(cleanup_stale()), "a live lab must be left alone"
        assert lab_names(tag) == (namespaces, links)
    finally:
        os.kill(p.pid, signal.SIGKILL)  # crashed: no atexit
        p.wait()
    assert lab_names(tag)[0], "a SIGKILLed run leaves its lab behind"
    removed = cleanup_stale()
    assert set(namespaces) | {f"{tag}b"} <= set(removed)  # veths may go with their namespace
    assert_nothing_left(tag)
    assert wait_until(lambda: all(gone(pid) for pid in pids))
