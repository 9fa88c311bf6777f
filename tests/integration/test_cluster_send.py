"""Helpers that join a sender (issue 14, part 1): ``stx send --cluster`` with ``stx worker
--join`` processes on 127.0.0.1, real processes throughout."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from itest_support import (
    STX,
    CliReceiver,
    WriteMeter,
    assert_no_secrets,
    free_port,
    last_json,
    make_keyfile,
    sha256_file,
    stx_env,
    wait_for,
    write_random,
)
from tcp_relay import UplinkThrottle

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
DONE = re.compile(r"transfer done: (\d+) blocks")


class Proc:
    """A CLI process in its own session (so that its workers can be killed with it); output
    to files."""

    def __init__(self, logdir: Path, name: str, args: list[str]) -> None:
        self.argv = [str(STX), *args]
        assert_no_secrets(self.argv)
        fd, out = tempfile.mkstemp(prefix=f"{name}-out-", dir=logdir)
        os.close(fd)
        fd, err = tempfile.mkstemp(prefix=f"{name}-err-", dir=logdir)
        os.close(fd)
        self.out_path, self.err_path = Path(out), Path(err)
        with open(out, "wb") as o, open(err, "wb") as e:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                env=stx_env(),
                start_new_session=True,
            )

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def json(self) -> dict[str, Any]:
        return last_json(self.stdout, self.stderr)

    def blocks(self) -> list[int]:
        return [int(n) for n in DONE.findall(self.stderr)]

    def wait(self, timeout: float = 40.0) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()  # the workers too, whatever happened
        assert_no_secrets(self.stdout, self.stderr)


@pytest.fixture
def rig(scratch: Path) -> Iterator[dict[str, Any]]:
    """Key, directories, and factories for receivers, senders and helpers (all stopped)."""
    for d in ("src", "dest", "logs"):
        (scratch / d).mkdir()
    key = scratch / "stx.key"
    make_keyfile(key)
    procs: list[Proc] = []
    receivers: list[CliReceiver] = []

    def receiver(**kw: Any) -> CliReceiver:
        r = CliReceiver(key, scratch / "dest", scratch / "logs", **kw)
        receivers.append(r)
        return r.start()

    def helper(join: str, *extra: str, keyfile: Path = key, workers: int = 1) -> Proc:
        p = Proc(
            scratch / "logs",
            "helper",
            [
                "worker",
                "--join",
                join,
                "--psk-file",
                str(keyfile),
                "--workers",
                str(workers),
                *extra,
            ],
        )
        procs.append(p)
        return p

    def sender(path: Path, address: str, cluster: str, *extra: str) -> Proc:
        p = Proc(
            scratch / "logs",
            "send",
            [
                "send",
                str(path),
                address,
                "--psk-file",
                str(key),
                "--cluster",
                cluster,
                "--block-size",
                "1M",
                "--json",
                *extra,
            ],
        )
        procs.append(p)
        return p

    try:
        yield {
            "root": scratch,
            "key": key,
            "receiver": receiver,
            "helper": helper,
            "sender": sender,
        }
    finally:
        for p in procs:
            p.stop()
        for r in receivers:
            r.stop()


def _cluster() -> str:
    return f"127.0.0.1:{free_port()}"


def test_two_helpers_send_everything(rig: dict[str, Any]) -> None:
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 64 * MIB)
    # Throttled to 16 MB/s a stream: on a busy machine a worker starting late (a new
    # interpreter) must still find blocks left to send.
    recv, relay = _throttled(rig, 16e6)
    cluster = _cluster()
    address = "{}:{}".format(*relay.address)
    send = rig["sender"](src, address, cluster, "--workers", "0", "--cluster-workers", "2")
    helpers = [rig["helper"](cluster, "--once") for _ in range(2)]
    try:
        assert send.wait() == 0, send.stderr
    finally:
        relay.stop()
    result = send.json()
    assert result["remote_workers"] == 2 and result["helpers"] == 2, result
    assert sum(result["hosts"].values()) == 2, result
    assert result["hosts"] == {socket.gethostname(): 2}
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    for h in helpers:
        assert h.wait(timeout=20) == 0, h.stderr  # --once
        assert "joined 127.0.0.1:" in h.stderr and "as sender helper, 1 workers" in h.stderr
        assert h.blocks() and h.blocks()[0] > 0, h.stderr  # each really sent
    assert sum(h.blocks()[0] for h in helpers) >= 64
    assert "Traceback" not in send.stderr


def test_helper_started_first_serves_two_transfers(rig: dict[str, Any]) -> None:
    cluster = _cluster()
    helper = rig["helper"](cluster)  # nothing listens yet: it keeps trying
    time.sleep(1.5)
    recv = rig["receiver"](once=False)
    for i in range(2):
        src = rig["root"] / "src" / f"f{i}"
        digest = write_random(src, 8 * MIB)
        send = rig["sender"](src, recv.address, cluster, "--workers", "0", "--cluster-workers", "1")
        assert send.wait() == 0, send.stderr
        assert send.json()["remote_workers"] == 1
        assert sha256_file(rig["root"] / "dest" / f"f{i}") == digest
        assert wait_for(lambda n=i: len(helper.blocks()) == n + 1, timeout=10), helper.stderr
    assert helper.proc.poll() is None  # still serving
    assert "lost the coordinator" not in helper.stderr, helper.stderr
    helper.proc.send_signal(signal.SIGTERM)
    assert helper.wait(timeout=10) == 143


def test_wrong_key_helper_refused_transfer_unaffected(rig: dict[str, Any]) -> None:
    other = rig["root"] / "other.key"
    make_keyfile(other)
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 16 * MIB)
    recv = rig["receiver"]()
    cluster = _cluster()
    send = rig["sender"](
        src,
        recv.address,
        cluster,
        "--workers",
        "1",
        "--cluster-workers",
        "1",
        "--cluster-wait",
        "4",
    )
    started = time.monotonic()
    bad = rig["helper"](cluster, keyfile=other)
    assert bad.wait(timeout=15) == 3
    assert time.monotonic() - started < 10
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip() and "waiting" not in ln]
    assert len(lines) == 1 and "refused this helper's key" in lines[0], bad.stderr
    assert send.wait() == 0, send.stderr
    assert "only 0 of 1 remote workers joined" in send.stderr
    assert send.json()["remote_workers"] == 0
    assert sha256_file(rig["root"] / "dest" / "f") == digest


def _throttled(rig: dict[str, Any], rate: float) -> tuple[CliReceiver, UplinkThrottle]:
    recv = rig["receiver"]()
    relay = UplinkThrottle((recv.host, recv.port), rate).start()
    return recv, relay


def test_helper_killed_mid_transfer(rig: dict[str, Any]) -> None:
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 24 * MIB)
    recv, relay = _throttled(rig, 6e6)
    try:
        cluster = _cluster()
        send = rig["sender"](
            src, "{}:{}".format(*relay.address), cluster, "--workers", "1", "--cluster-workers", "1"
        )
        helper = rig["helper"](cluster)
        # Its worker has a stream and has sent some blocks: then it dies, workers and all.
        assert wait_for(lambda: relay.accepted >= 2 and relay.bytes_up > 6 * MIB, timeout=20)
        helper.kill_group()
        assert send.wait(timeout=45) == 0, send.stderr
        assert "put aside" in send.stderr, send.stderr
        result = send.json()
        assert result["remote_workers"] == 1, result
        assert sha256_file(rig["root"] / "dest" / "f") == digest
    finally:
        relay.stop()


def test_helper_joining_mid_transfer_takes_work(rig: dict[str, Any]) -> None:
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 24 * MIB)
    recv, relay = _throttled(rig, 4e6)
    try:
        cluster = _cluster()
        send = rig["sender"](src, "{}:{}".format(*relay.address), cluster, "--workers", "1")
        assert wait_for(lambda: relay.bytes_up > 2 * MIB, timeout=20)
        helper = rig["helper"](cluster, "--once")
        assert send.wait(timeout=45) == 0, send.stderr
        assert helper.wait(timeout=15) == 0, helper.stderr
        assert helper.blocks() and helper.blocks()[0] > 0, helper.stderr
        assert send.json()["remote_workers"] == 1
        assert sha256_file(rig["root"] / "dest" / "f") == digest
    finally:
        relay.stop()


def _garbage(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(os.urandom(4096))
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        # a ZMTP 3 greeting, then a long frame claiming 2**40 bytes
        greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\0")
        s.sendall(greeting + b"\0" * 31)
        s.sendall(b"\x06" + (1 << 40).to_bytes(8, "big") + os.urandom(65536))
        time.sleep(0.2)


def test_garbage_on_cluster_port(rig: dict[str, Any]) -> None:
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 16 * MIB)
    recv, relay = _throttled(rig, 6e6)
    try:
        port = free_port()
        cluster = f"127.0.0.1:{port}"
        send = rig["sender"](src, "{}:{}".format(*relay.address), cluster, "--workers", "1")
        assert wait_for(lambda: relay.bytes_up > MIB, timeout=20)
        coordinator = psutil.Process(send.proc.pid)
        before = coordinator.memory_info().rss
        peak = before
        for _ in range(5):
            _garbage(port)
            peak = max(peak, coordinator.memory_info().rss)
        assert send.wait(timeout=45) == 0, send.stderr
        assert peak - before < 32 * MIB
        assert sha256_file(rig["root"] / "dest" / "f") == digest
    finally:
        relay.stop()


def test_helper_that_cannot_see_the_files_refuses(rig: dict[str, Any]) -> None:
    """A real helper, a coordinator's cluster port in this process, and a layout naming a file
    the helper finds with another inode: Refuse, and the port puts the helper aside."""
    from stxpar import layout as layout_file
    from stxpar.cluster import ClusterPort, Helper
    from stxpar.messages import FileRef
    from stxpar.psk import load_key_file

    real = rig["root"] / "src" / "f"
    real.write_bytes(b"x" * 1000)
    st = real.stat()
    ref = FileRef(str(real), st.st_dev, st.st_ino + 1, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    data = layout_file.Layout(1 << 16, ((0, 1000),), (ref,)).encode()
    events: list[tuple[str, dict[str, Any]]] = []
    port = ClusterPort(
        _cluster(), psk=load_key_file(str(rig["key"])), on_event=lambda k, f: events.append((k, f))
    )
    try:

        class Phase:
            def adopt(self, helper: Helper) -> None:
                port.assign(helper, (0,))

            def remote_request(self, route: Any, msg: Any, now: float) -> None:
                raise AssertionError("no worker may start")

            def remote_report(self, msg: Any, now: float) -> None:
                raise AssertionError("no worker may start")

        port.begin(Phase(), data)
        helper = rig["helper"](port.address)

        def refused() -> bool:
            port.pump(0.05)
            return any(k == "helper_left" for k, _ in events)

        assert wait_for(refused, timeout=20), helper.stderr
        left = next(f for k, f in events if k == "helper_left")
        assert "not visible here" in left["reason"] and str(real) in left["reason"]
        assert [h.state for h in port.helpers.values()] == ["refused"]
        assert "refused the transfer" in helper.stderr
        # Only its spare, still waiting for work (one thread: no worker runs in it).
        children = psutil.Process(helper.proc.pid).children()
        assert len(children) == 1 and children[0].num_threads() == 1, children
    finally:
        port.end()
        port.close()


def test_cli_checks(rig: dict[str, Any]) -> None:
    from itest_support import run_stx

    bad = run_stx("send", rig["root"], "127.0.0.1:1", "--workers", "0", "--psk-file", rig["key"])
    assert bad.rc == 2 and "--workers 0 needs --cluster" in bad.stderr
    addr = run_stx("worker", "--join", "nowhere", "--psk-file", rig["key"])
    assert addr.rc == 2 and "HOST:PORT" in addr.stderr
    helptext = run_stx("worker", "--help")
    assert helptext.rc == 0 and "--data-listen" in helptext.stdout and "--once" in helptext.stdout


def test_rate_limit_covers_the_helpers(
    rig: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--limit-rate is the whole transfer's, helpers' streams included (issue 15)."""
    monkeypatch.setenv("STX_LANDING", "pwrite")  # blocks land by pwrite: /proc counts them
    rate = 8 * MIB
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 24 * MIB)
    recv = rig["receiver"](once=False)
    cluster = _cluster()
    assert recv.proc is not None
    with WriteMeter(recv.proc.pid) as meter:
        send = rig["sender"](
            src, recv.address, cluster, "--workers", "1", "--cluster-workers", "2",
            "--limit-rate", "8M",
        )  # fmt: skip
        helpers = [rig["helper"](cluster, "--once") for _ in range(2)]
        assert send.wait(timeout=60) == 0, send.stderr
    result = send.json()
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    assert result["remote_workers"] == 2 and result["limit_rate"] == rate, result
    for h in helpers:
        assert h.wait(timeout=20) == 0, h.stderr
        assert h.blocks() and h.blocks()[0] > 0, h.stderr  # the helpers sent their share
    assert result["seconds"] >= 24 * MIB / rate * 0.95, result
    busiest = meter.busiest_window(1.0)
    assert busiest <= rate * 1.05 + 3 * MIB, (busiest / MIB, "MiB in 1 s")
