"""``stx recv`` as a service (issue 15): ``--log-format json`` and ``--metrics HOST:PORT``.

Real processes on 127.0.0.1: a receiver with both on, a transfer that completes, one refused
for a wrong key and one cut off by killing its sender; every log line must parse and carry the
documented fields, and a scrape over HTTP must count exactly those transfers and bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from itest_support import (
    STX,
    assert_no_secrets,
    make_keyfile,
    run_stx,
    sha256_file,
    wait_for,
    write_random,
)
from tcp_relay import UplinkThrottle

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
CORE = ("time", "event", "peer", "file", "bytes", "seconds", "outcome", "error_code")


class ServiceReceiver:
    """``stx recv --log-format json --metrics 127.0.0.1:0`` with its stderr in a file."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        self.err_path = root / "recv.err"
        argv = [str(STX), "recv", "--listen", "127.0.0.1:0", "--dest", str(root / "dest")]
        argv += ["--psk-file", str(root / "stx.key"), "--log-format", "json", *extra]
        env = {k: v for k, v in os.environ.items() if k != "STX_PSK_FILE"}
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env
            )
        assert wait_for(lambda: self.first("listening") is not None, timeout=20), self.text()
        listening = self.first("listening")
        assert listening is not None
        self.port = listening["port"]
        metrics = self.first("metrics")
        self.metrics_port = metrics["port"] if metrics else None

    def text(self) -> str:
        return self.err_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """Every stderr line, parsed (each must be one JSON object)."""
        out = []
        for line in self.text().splitlines():
            obj = json.loads(line)
            assert isinstance(obj, dict), line
            out.append(obj)
        return out

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e["event"] == kind]

    def first(self, kind: str) -> dict[str, Any] | None:
        found = self.events(kind)
        return found[0] if found else None

    def scrape(self) -> dict[str, float]:
        """The metrics (sample name with labels -> value), fetched over HTTP."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def root() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="stx-service-", dir=base))
    for d in ("dest", "src"):
        (path / d).mkdir()
    make_keyfile(path / "stx.key")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _send(root: Path, port: int, path: Path, key: str = "stx.key") -> Any:
    return run_stx("send", path, f"127.0.0.1:{port}", "--psk-file", root / key, "--quiet")


def _send_and_kill(root: Path, recv: ServiceReceiver, path: Path) -> None:
    """Start a send of ``path`` and SIGKILL it once the receiver has accepted it and holds a
    few blocks."""
    argv = [str(STX), "send", str(path), f"127.0.0.1:{recv.port}"]
    argv += ["--psk-file", str(root / "stx.key"), "--quiet", "--block-size", "1M"]
    sender = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        partial = root / "dest" / f".{path.name}.stxpart"
        assert wait_for(
            lambda: partial.exists() and partial.stat().st_blocks > 0, timeout=30, step=0.005
        ), recv.text()
    finally:
        os.killpg(sender.pid, signal.SIGKILL)
        sender.wait(timeout=10)


def test_json_log_and_metrics_count_the_transfers(root: Path) -> None:
    recv = ServiceReceiver(root, "--metrics", "127.0.0.1:0")
    try:
        assert recv.metrics_port
        small = root / "src" / "small.bin"
        write_random(small, 3 * MiB + 17)
        tree = root / "src" / "tree"
        tree.mkdir()
        for i in range(20):
            write_random(tree / f"f{i}", 1000 + i)
        tree_bytes = sum(1000 + i for i in range(20))

        assert _send(root, recv.port, small).rc == 0
        assert _send(root, recv.port, tree).rc == 0
        make_keyfile(root / "wrong.key")  # another key
        bad = _send(root, recv.port, small, key="wrong.key")
        assert bad.rc == 3, bad.stderr
        big = root / "src" / "big.bin"
        write_random(big, 160 * MiB)
        _send_and_kill(root, recv, big)
        assert wait_for(lambda: recv.events("failed"), timeout=30), recv.text()

        # every line is one JSON object with the documented fields
        lines = recv.lines()
        assert lines
        for obj in lines:
            assert list(obj)[: len(CORE)] == list(CORE), obj
            assert obj["time"].endswith("Z") and "T" in obj["time"]
        received = recv.events("received")
        assert [(e["file"], e["bytes"], e["outcome"]) for e in received] == [
            (str(root / "dest" / "small.bin"), 3 * MiB + 17, "ok"),
            (str(root / "dest" / "tree"), tree_bytes, "ok"),
        ]
        assert all(e["peer"] == "127.0.0.1" and e["seconds"] >= 0 for e in received)
        assert [e["file"] for e in recv.events("accepted")] == ["small.bin", "tree", "big.bin"]
        rejected = recv.events("rejected")
        assert len(rejected) == 1 and rejected[0]["error_code"] == 3
        assert rejected[0]["outcome"] == "refused" and rejected[0]["peer"] == "127.0.0.1"
        (failed,) = recv.events("failed")
        assert failed["file"] == "big.bin" and failed["outcome"] == "failed"
        assert failed["error_code"] == 4 and failed["partial"] == "kept"
        assert 0 < failed["received_bytes"] <= 160 * MiB

        # the metrics count exactly that
        got = recv.scrape()
        assert got["stx_transfers_completed_total"] == 2
        assert (
            got["stx_received_bytes_total"] == 3 * MiB + 17 + tree_bytes + failed["received_bytes"]
        )
        assert got['stx_transfers_failed_total{reason="connect"}'] == 1
        assert got['stx_handshakes_refused_total{reason="auth"}'] == 1
        assert got["stx_active_sessions"] == 0
        assert got["stx_active_streams"] == 0
        assert got["stx_partial_bytes"] == failed["have_bytes"] > 0
    finally:
        rc = recv.stop()
    assert rc == 0, recv.text()
    assert_no_secrets(recv.text())


def test_metrics_are_bound_to_the_address_given_only(root: Path) -> None:
    recv = ServiceReceiver(root, "--metrics", "127.0.0.1:0")
    try:
        port = recv.metrics_port
        assert port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        # the receiver's listening sockets on that port: 127.0.0.1 only, not a wildcard
        bound = [
            c.laddr.ip
            for c in psutil.Process(recv.proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert bound == ["127.0.0.1"], bound
    finally:
        recv.stop()


def test_text_log_stays_the_default(root: Path) -> None:
    argv = [str(STX), "recv", "--listen", "127.0.0.1:0", "--dest", str(root / "dest")]
    argv += ["--psk-file", str(root / "stx.key"), "--once"]
    err_path = root / "recv.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_for(lambda: "listening on" in err_path.read_text(), timeout=20)
        port = err_path.read_text().split("listening on 127.0.0.1:")[1].split()[0]
        src = root / "src" / "f.bin"
        write_random(src, 1000)
        assert _send(root, int(port), src).rc == 0
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err_path.read_text()
    assert "received " in text and not text.lstrip().startswith("{")


def test_metrics_without_prometheus_client_say_how_to_get_it(root: Path) -> None:
    # The package hidden from this one process (sys.modules[name] = None makes imports fail).
    code = (
        "import sys; sys.modules['prometheus_client'] = None; from stxpar.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", code, "recv", "--listen", "127.0.0.1:0"]
    argv += ["--dest", str(root / "dest"), "--psk-file", str(root / "stx.key")]
    argv += ["--metrics", "127.0.0.1:0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'stxpar[metrics]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_metrics_on_an_address_in_use_is_a_clear_error(root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        run = run_stx(
            "recv",
            "--listen",
            "127.0.0.1:0",
            "--dest",
            root / "dest",
            "--psk-file",
            root / "stx.key",
            "--metrics",
            f"127.0.0.1:{port}",
        )
    assert run.rc == 2, run.stderr
    assert "--metrics" in run.stderr and "Traceback" not in run.stderr
    assert time.monotonic() - started < 30


def test_keys_rotate_on_sigusr1_without_stopping_a_transfer(root: Path) -> None:
    make_keyfile(root / "next.key")
    shutil.copy(root / "stx.key", root / "old.key")
    shutil.copy(root / "stx.key", root / "next.key")  # both paths hold the old key at first
    recv = ServiceReceiver(root, "--psk-file", str(root / "next.key"))
    relay = UplinkThrottle(("127.0.0.1", recv.port), 3 * MiB).start()
    try:
        slow = root / "src" / "slow.bin"
        digest = write_random(slow, 12 * MiB)
        argv = [str(STX), "send", str(slow), f"127.0.0.1:{relay.port}"]
        argv += ["--psk-file", str(root / "old.key"), "--quiet", "--block-size", "1M"]
        sender = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_for(lambda: recv.events("accepted"), timeout=20), recv.text()

        def reload() -> None:
            before = len(recv.events("keys_reloaded"))
            recv.proc.send_signal(signal.SIGUSR1)
            assert wait_for(lambda: len(recv.events("keys_reloaded")) > before, timeout=10)

        # a new key beside the old one: both are accepted
        make_keyfile(root / "new.key")
        shutil.copy(root / "new.key", root / "next.key")
        reload()
        one = root / "src" / "one.bin"
        write_random(one, 1000)
        assert _send(root, recv.port, one, key="new.key").rc == 0
        assert _send(root, recv.port, one, key="old.key").rc == 0
        # then only the new one: the old key is refused, the transfer under way goes on
        shutil.copy(root / "new.key", root / "stx.key")
        reload()
        assert _send(root, recv.port, one, key="old.key").rc == 3
        assert _send(root, recv.port, one, key="new.key").rc == 0
        assert sender.poll() is None, "the slow transfer should still be running"
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 0, err
        assert sha256_file(root / "dest" / "slow.bin") == digest
        # a key file that cannot be read keeps the keys there are
        (root / "next.key").write_text("not a key\n")
        recv.proc.send_signal(signal.SIGUSR1)
        assert wait_for(
            lambda: any(
                "keys not reloaded" in e.get("message", "") for e in recv.events("warning")
            ),
            timeout=10,
        )
        assert _send(root, recv.port, one, key="new.key").rc == 0
    finally:
        relay.stop()
        recv.stop()
    assert_no_secrets(recv.text())
