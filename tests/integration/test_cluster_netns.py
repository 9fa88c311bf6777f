"""Helpers on other hosts (issue 14), with network namespaces as the hosts (tests/netlab.py):
every helper's link shaped with tbf, so that the links, not the CPUs, set the pace; a helper
"host" dies by losing its link and every one of its processes at once, as a machine that
crashes does (no FIN, no RST: its peers only hear silence).

Each process runs in its host's namespace under a UTS namespace named after the host (the
lab's namespaces share this machine's host name, and ``--json`` counts workers per host name).
The lab, and every process in it, is removed whatever happens (the ``netlab`` fixture).
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from itest_support import (
    STX,
    assert_no_secrets,
    last_json,
    make_keyfile,
    sha256_file,
    stx_env,
    wait_for,
    write_random,
)
from netlab import Host, Lab, netlab_fixture  # noqa: F401

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

MIB = 1 << 20
CLUSTER_PORT = 7000
RECV_PORT = 9000
DONE = re.compile(r"transfer done: (\d+) blocks")
#: Each shaped link: 25 MB/s, so that a file of tens of MiB takes seconds.
RATE = "200mbit"


class NsProc:
    """An ``stx`` command in a lab host (its own host name too); output to files, or stderr
    to a terminal (``tty``: a pseudo-terminal whose output is collected, as a user sees it)."""

    def __init__(self, host: Host, logdir: Path, args: list[str], *, tty: bool = False) -> None:
        self.host = host
        argv = [str(STX), *args]
        assert_no_secrets(argv)
        n = len(list(logdir.iterdir()))
        self.out_path = logdir / f"{n:02d}-{host.name}-{args[0]}.out"
        self.err_path = logdir / f"{n:02d}-{host.name}-{args[0]}.err"
        self.screen = ""
        self._reader: threading.Thread | None = None
        wrapped = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host.name, *argv]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            if tty:
                master, slave = pty.openpty()
                try:
                    self.proc = host.popen(wrapped, stdout=out, stderr=slave, env=stx_env())
                finally:
                    os.close(slave)
                self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
                self._reader.start()
            else:
                self.proc = host.popen(wrapped, stdout=out, stderr=err, env=stx_env())

    def _read(self, fd: int) -> None:
        try:
            while data := os.read(fd, 4096):
                self.screen += data.decode(errors="replace")
        except OSError:
            pass  # the terminal's last writer is gone (EIO)
        finally:
            os.close(fd)

    @property
    def stderr(self) -> str:
        return (
            self.screen if self._reader is not None else self.err_path.read_text("utf-8", "replace")
        )

    def json(self) -> dict[str, Any]:
        return last_json(self.out_path.read_text(), self.stderr)

    def blocks(self) -> list[int]:
        return [int(n) for n in DONE.findall(self.stderr)]

    def wait(self, timeout: float = 40.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(5)
        assert_no_secrets(self.stderr)
        return rc


def sent_bytes(host: Host) -> int:
    """Bytes ``host`` has sent: what its link's bridge port received."""
    return int(Path(f"/sys/class/net/{host.peer}/statistics/rx_bytes").read_text())


def received_bytes(host: Host) -> int:
    """Bytes ``host`` has received: what its link's bridge port sent it."""
    return int(Path(f"/sys/class/net/{host.peer}/statistics/tx_bytes").read_text())


def crash(host: Host) -> None:
    """The host dies: its link goes down first (nothing it says gets out, not even the RSTs
    of its closing sockets), then every process in it is SIGKILLed."""
    host.link_down()
    host.kill_all()


@pytest.fixture
def rig(netlab: Lab, scratch: Path) -> Iterator[dict[str, Any]]:
    """A lab, a key, directories and a ``run(host, *args)`` that starts ``stx`` there."""
    if shutil.which("unshare") is None:
        pytest.skip("'unshare' (util-linux) is not installed")
    for d in ("src", "dest", "logs"):
        (scratch / d).mkdir()
    key = scratch / "stx.key"
    make_keyfile(key)

    def run(host: Host, *args: str, tty: bool = False) -> NsProc:
        return NsProc(host, scratch / "logs", list(args), tty=tty)

    yield {"lab": netlab, "root": scratch, "key": str(key), "run": run}
    _print_logs(scratch / "logs")


def _print_logs(logdir: Path, lines: int = 40) -> None:
    """The end of every stx process's output (pytest shows it when the test failed)."""
    for path in sorted(logdir.iterdir()):
        text = path.read_text("utf-8", "replace").splitlines()[-lines:]
        if text:
            print(f"--- {path.name}", *text, sep="\n")


def _helper(rig: dict[str, Any], host: Host, join: Host, *extra: str, key: str = "") -> NsProc:
    args = ["worker", "--join", f"{join.addr}:{CLUSTER_PORT}", "--psk-file", key or rig["key"]]
    return rig["run"](host, *args, "--workers", "2", *extra)


def _receiver(rig: dict[str, Any], host: Host, *extra: str) -> NsProc:
    args = ["recv", "--listen", f"{host.addr}:{RECV_PORT}", "--psk-file", rig["key"]]
    args += ["--dest", str(rig["root"] / "dest"), "--once", "--json", *extra]
    recv = rig["run"](host, *args)
    assert wait_for(lambda: "listening on" in recv.stderr, timeout=20), recv.stderr
    return recv


def _sender(
    rig: dict[str, Any], host: Host, src: Path, to: Host, *extra: str, tty: bool = False
) -> NsProc:
    args = ["send", str(src), f"{to.addr}:{RECV_PORT}", "--psk-file", rig["key"]]
    return rig["run"](host, *args, "--block-size", "1M", "--json", *extra, tty=tty)


def _cluster(host: Host) -> list[str]:
    return ["--cluster", f"{host.addr}:{CLUSTER_PORT}"]


def _spares(helper: NsProc, n: int) -> set[int] | None:
    """The pids of the helper's ``n`` spare workers (named, one thread: nothing runs in them
    yet), or None while they are not all there."""
    try:
        kids = psutil.Process(helper.proc.pid).children()
        waiting = {p.pid for p in kids if p.name() == "stx-send-worker" and p.num_threads() == 1}
    except psutil.Error:
        return None
    return waiting if len(waiting) == n and len(kids) == n else None


def test_helper_workers_wait_ready_and_serve(rig: dict[str, Any]) -> None:
    """A helper starts its worker processes before any work exists (before it could even
    join), the transfer runs in those very processes, and new ones wait for the next."""
    lab = rig["lab"]
    recv_host, s0 = lab.add_host("recv"), lab.add_host("s0", rate=RATE)
    h1 = lab.add_host("h1", rate="50mbit")  # 8 MiB take more than a second: seen at work
    helper = _helper(rig, h1, s0)  # nothing listens yet
    assert wait_for(lambda: _spares(helper, 2) is not None, timeout=20), helper.stderr
    spares = _spares(helper, 2)
    assert spares is not None
    recv = _receiver(rig, recv_host)
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 8 * MIB)
    send = _sender(
        rig, s0, src, recv_host, "--workers", "0", *_cluster(s0), "--cluster-workers", "2"
    )

    def working() -> set[int]:
        try:
            kids = psutil.Process(helper.proc.pid).children()
            return {p.pid for p in kids if p.num_threads() > 1}
        except psutil.Error:
            return set()

    assert wait_for(lambda: len(working()) == 2, timeout=20), helper.stderr
    assert working() == spares  # the spares took the work: no new interpreter started for it
    assert send.wait() == 0, send.stderr
    assert recv.wait() == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "f") == digest
    assert send.json()["hosts"] == {"h1": 2}
    # Warm again for the next transfer: two new spares (new interpreters, this time), and the
    # next transfer runs in them.
    assert wait_for(lambda: (_spares(helper, 2) or spares).isdisjoint(spares), timeout=20)
    again = _spares(helper, 2)
    assert again is not None
    assert helper.blocks() == [8], helper.stderr
    recv = _receiver(rig, recv_host)
    src = rig["root"] / "src" / "g"
    digest = write_random(src, 8 * MIB)
    send = _sender(
        rig, s0, src, recv_host, "--workers", "0", *_cluster(s0), "--cluster-workers", "2"
    )
    assert wait_for(lambda: len(working()) == 2, timeout=20), helper.stderr
    assert working() == again
    assert send.wait() == 0, send.stderr
    assert recv.wait() == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "g") == digest
    assert wait_for(lambda: helper.blocks() == [8, 8], timeout=10), helper.stderr
    assert helper.proc.poll() is None


def test_spares_leave_with_their_helper(rig: dict[str, Any]) -> None:
    """A helper killed outright (SIGKILL, its spares spared) leaves no spare behind: each one
    reads the end of its pipe and exits."""
    lab = rig["lab"]
    s0, h1 = lab.add_host("s0"), lab.add_host("h1")
    helper = _helper(rig, h1, s0)
    assert wait_for(lambda: _spares(helper, 2) is not None, timeout=20), helper.stderr
    spares = [psutil.Process(pid) for pid in _spares(helper, 2) or ()]
    helper.proc.kill()
    helper.proc.wait(timeout=10)

    def gone(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert wait_for(lambda: all(gone(p) for p in spares), timeout=10), spares


def test_sender_helper_crashes_mid_transfer(rig: dict[str, Any]) -> None:
    """Two helpers; one "host" crashes (link down, every process SIGKILLed) while it sends:
    the transfer completes, identical, its blocks sent again by the others. The live progress
    line shows the workers per host, before and after."""
    lab = rig["lab"]
    recv_host = lab.add_host("recv")
    s0, h1, h2 = (lab.add_host(n, rate=RATE) for n in ("s0", "h1", "h2"))
    recv = _receiver(rig, recv_host)
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 64 * MIB)
    helpers = [_helper(rig, h, s0) for h in (h1, h2)]
    assert wait_for(lambda: all(_spares(h, 2) is not None for h in helpers), timeout=20)
    args = ("--workers", "1", *_cluster(s0), "--cluster-workers", "4")
    send = _sender(rig, s0, src, recv_host, *args, tty=True)
    base = sent_bytes(h1)
    assert wait_for(lambda: sent_bytes(h1) - base > 8 * MIB, timeout=20), send.stderr
    crash(h1)
    assert send.wait(timeout=45) == 0, send.stderr
    assert recv.wait() == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    assert "helper h1 put aside" in send.stderr, send.stderr
    result = send.json()
    assert result["hosts"] == {"s0": 1, "h1": 2, "h2": 2}, result
    assert result["remote_workers"] == 4 and result["retransmits"] == 0, result
    # Blocks h1 sent that never got through (its acknowledgements lost with it) were sent
    # again by the others: more blocks went out than the file has.
    assert result["blocks_sent"] > result["blocks_total"], result
    assert "hosts local:1 h1:2 h2:2" in send.stderr, send.stderr
    assert "hosts local:1 h2:2" in send.stderr, send.stderr  # h1 gone from the line


def _receiving_side(rig: dict[str, Any], *recv_args: str) -> tuple[NsProc, list[NsProc], Host]:
    """A receiver r0 and two receiving helpers r1, r2 (``--data-listen``), joined, each
    downlink shaped; and an unshaped sender host."""
    lab = rig["lab"]
    snd = lab.add_host("snd")
    r0, r1, r2 = (lab.add_host(n, rate_in=RATE) for n in ("r0", "r1", "r2"))
    helpers = [_helper(rig, h, r0, "--data-listen", f"{h.addr}:0") for h in (r1, r2)]
    args = ("--workers", "1", *_cluster(r0), "--cluster-workers", "4", *recv_args)
    recv = _receiver(rig, r0, *args)
    joined = "as receiver helper"
    assert wait_for(lambda: all(joined in h.stderr for h in helpers), timeout=20)
    return recv, helpers, snd


def _crash_while_landing(rig: dict[str, Any], snd: Host, *send_args: str) -> tuple[NsProc, str]:
    """Send 64 MiB from ``snd`` to r0; crash r1 once it has received 4 MiB (its share is
    about 2/5 of the file, but a loaded machine can start its streams late: the crash must
    come while it lands blocks, whatever its share turns out to be)."""
    lab = rig["lab"]
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 64 * MIB)
    send = _sender(rig, snd, src, lab["r0"], "--workers", "6", *send_args)
    r1 = lab["r1"]
    base = received_bytes(r1)
    assert wait_for(lambda: received_bytes(r1) - base > 4 * MIB, timeout=20), send.stderr
    crash(r1)
    return send, digest


def test_receiving_helper_crashes_mid_transfer(rig: dict[str, Any]) -> None:
    """The receiving side: two receiving helpers, each downlink shaped; one "host" crashes
    while it lands blocks: the transfer completes, identical.

    (With a stall timeout of 12 s on both sides and a short --cluster-wait: whichever comes
    first, the receiver putting r1 aside and the sender moving its streams, or a stall and a
    resumed session, the copy must come out whole; ``test_receiving_helper_crash_moves_its_
    streams`` asks for the first, with the default timeouts.)"""
    recv, _, snd = _receiving_side(rig, "--stall-timeout", "12", "--cluster-wait", "3")
    send, digest = _crash_while_landing(rig, snd, "--stall-timeout", "12")
    assert send.wait(timeout=45) == 0, send.stderr + recv.stderr
    assert recv.wait() == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    assert "helper r1 put aside" in recv.stderr, recv.stderr
    result = send.json()
    # r1's streams were moved or replaced (routed to the living), or the sender reconnected.
    moved = result["streams_moved"] + result["streams_replaced"] + result["reconnects"]
    assert moved > 0, result


def test_receiving_helper_crash_moves_its_streams(rig: dict[str, Any]) -> None:
    """The same with the default timeouts: the receiver puts the silent helper aside (5 s)
    and deals its stream ids over the receiver and the other helper in a new ROUTES; the
    sender moves the streams it had open there at once (no RST ever comes from a host whose
    link is down), without waiting for its 60 s stall timeout or reconnecting."""
    recv, _, snd = _receiving_side(rig)
    send, digest = _crash_while_landing(rig, snd)
    try:
        rc = send.proc.wait(timeout=25)  # 5 s to notice, then seconds
    except subprocess.TimeoutExpired:
        pytest.fail(f"not done 25 s after the crash: {recv.stderr}")
    assert rc == 0, send.stderr
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    result = send.json()
    assert result["reconnects"] == 0 and result["streams_moved"] > 0, result


def test_helper_joining_mid_transfer_takes_work(rig: dict[str, Any]) -> None:
    lab = rig["lab"]
    recv_host = lab.add_host("recv")
    s0 = lab.add_host("s0", rate="100mbit")  # alone: 40 MiB take over 3 s
    h1 = lab.add_host("h1", rate=RATE)
    recv = _receiver(rig, recv_host)
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 40 * MIB)
    send = _sender(rig, s0, src, recv_host, "--workers", "1", *_cluster(s0))
    base = sent_bytes(s0)
    assert wait_for(lambda: sent_bytes(s0) - base > 2 * MIB, timeout=20), send.stderr
    helper = _helper(rig, h1, s0, "--once")
    assert send.wait() == 0, send.stderr
    assert recv.wait() == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    assert helper.wait(timeout=20) == 0, helper.stderr
    assert helper.blocks() and helper.blocks()[0] > 0, helper.stderr
    result = send.json()
    assert result["hosts"] == {"s0": 1, "h1": 2} and result["remote_workers"] == 2, result
    assert "helper h1 joined with 2 workers" in send.stderr


def test_wrong_key_helper_refused_transfer_unaffected(rig: dict[str, Any]) -> None:
    lab = rig["lab"]
    recv_host = lab.add_host("recv")
    s0, h1, h2 = (lab.add_host(n, rate=RATE) for n in ("s0", "h1", "h2"))
    other = rig["root"] / "other.key"
    make_keyfile(other)
    recv = _receiver(rig, recv_host)
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 24 * MIB)
    args = ("--workers", "1", *_cluster(s0), "--cluster-workers", "2", "--cluster-wait", "20")
    send = _sender(rig, s0, src, recv_host, *args)
    bad = _helper(rig, h1, s0, key=str(other))
    assert bad.wait(timeout=20) == 3, bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and "waiting" not in ln]
    assert len(lines) == 1 and "refused this helper's key" in lines[0], bad.stderr
    good = _helper(rig, h2, s0, "--once")
    assert send.wait() == 0, send.stderr
    assert recv.wait() == 0, recv.stderr
    assert good.wait(timeout=20) == 0, good.stderr
    assert sha256_file(rig["root"] / "dest" / "f") == digest
    result = send.json()
    assert result["hosts"] == {"s0": 1, "h2": 2} and result["helpers"] == 1, result
    assert "helper h1" not in send.stderr, send.stderr  # refused before it could say a word
