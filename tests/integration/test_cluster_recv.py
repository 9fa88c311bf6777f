"""Helpers that join a receiver (issue 14, part 2): ``stx recv --cluster`` with ``stx worker
--join ... --data-listen`` processes on 127.0.0.1, real processes throughout."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from itest_support import (
    CliReceiver,
    free_port,
    is_worker,
    make_keyfile,
    process_tree,
    sha256_file,
    wait_for,
    write_random,
)
from test_cluster_send import Proc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from treegen import compare_trees  # noqa: E402

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
DONE = re.compile(r"transfer done: (\d+) blocks landed")
DATA_PORT = re.compile(r"as receiver helper, \d+ workers, data port (\S+)")


@pytest.fixture
def rig(scratch: Path) -> Iterator[dict[str, Any]]:
    """Key, directories, and factories for receivers, senders and helpers (all stopped)."""
    for d in ("src", "dest", "logs"):
        (scratch / d).mkdir()
    key = scratch / "stx.key"
    make_keyfile(key)
    procs: list[Proc] = []
    receivers: list[CliReceiver] = []
    cluster = f"127.0.0.1:{free_port()}"

    def receiver(*extra: str, workers: int = 1, once: bool = True) -> CliReceiver:
        r = CliReceiver(
            key,
            scratch / "dest",
            scratch / "logs",
            workers=workers,
            once=once,
            extra=["--cluster", cluster, *extra],
        )
        receivers.append(r)
        return r.start()

    def helper(*extra: str, keyfile: Path = key, workers: int = 1) -> Proc:
        p = Proc(
            scratch / "logs",
            "helper",
            [
                "worker",
                "--join",
                cluster,
                "--psk-file",
                str(keyfile),
                "--workers",
                str(workers),
                "--data-listen",
                "127.0.0.1:0",
                *extra,
            ],
        )
        procs.append(p)
        return p

    def sender(path: Path, address: str, *extra: str) -> Proc:
        p = Proc(
            scratch / "logs",
            "send",
            [
                "send",
                str(path),
                address,
                "--psk-file",
                str(key),
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
            "cluster": cluster,
            "receiver": receiver,
            "helper": helper,
            "sender": sender,
        }
    finally:
        for p in procs:
            p.stop()
        for r in receivers:
            r.stop()


def _landed(p: Proc) -> list[int]:
    return [int(n) for n in DONE.findall(p.stderr)]


def _joined(p: Proc) -> bool:
    return "as receiver helper" in p.stderr


def test_two_helpers_receive(rig: dict[str, Any]) -> None:
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 64 * MIB)
    recv = rig["receiver"]("--cluster-workers", "2")
    helpers = [rig["helper"]("--once") for _ in range(2)]
    assert wait_for(lambda: all(_joined(h) for h in helpers), timeout=20)
    send = rig["sender"](src, recv.address, "--workers", "4")
    assert send.wait(timeout=60) == 0, send.stderr + recv.stderr
    assert recv.wait(timeout=20) == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "big") == digest
    for h in helpers:
        assert h.wait(timeout=20) == 0, h.stderr  # --once
        assert _landed(h) and _landed(h)[0] > 0, h.stderr  # each really landed blocks
    received = [j for j in recv.json_lines() if "hosts" in j]
    assert received, recv.stdout
    hosts = received[-1]["hosts"]
    assert sum(hosts.values()) >= 4, hosts
    assert list(hosts) == [socket.gethostname()], hosts  # one host name here: 127.0.0.1
    assert "Traceback" not in recv.stderr + send.stderr


def test_tree_through_helpers(rig: dict[str, Any]) -> None:
    tree = rig["root"] / "src" / "tree"
    for i in range(300):
        d = tree / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(os.urandom(i * 37 % 5000))
    for i in range(3):
        write_random(tree / f"big{i}.bin", 6 * MIB + i * 4097)
    recv = rig["receiver"]("--cluster-workers", "2")
    helpers = [rig["helper"]() for _ in range(2)]
    assert wait_for(lambda: all(_joined(h) for h in helpers), timeout=20)
    # Paced (about 0.6 s in all) so that every stream has blocks to carry: unpaced, the tree
    # went in 0.08 s, and on a loaded machine the receiver's own streams could take every
    # block before a helper's stream started.
    send = rig["sender"](tree, recv.address, "--workers", "4", "--limit-rate", "30M")
    assert send.wait(timeout=60) == 0, send.stderr + recv.stderr
    assert recv.wait(timeout=20) == 0, recv.stderr
    assert compare_trees(tree, rig["root"] / "dest" / "tree") == []
    # Helpers landed part of the tree (each gets streams; a stream whose worker started late
    # may still find no block left, so not necessarily both of them).
    assert wait_for(lambda: any(sum(_landed(h)) > 0 for h in helpers), timeout=10), [
        h.stderr for h in helpers
    ]


def test_helper_killed_mid_transfer(rig: dict[str, Any]) -> None:
    src = rig["root"] / "src" / "big"
    digest = write_random(src, 128 * MIB)
    recv = rig["receiver"]("--cluster-workers", "2", once=False)
    helpers = [rig["helper"]() for _ in range(2)]
    assert wait_for(lambda: all(_joined(h) for h in helpers), timeout=20)
    dest = rig["root"] / "dest"
    victim = helpers[0]
    # The victim's workers stop first (its streams hang mid-transfer, holding their blocks),
    # then the whole helper dies (SIGKILL): its connections break, its blocks go elsewhere.
    workers = [p for p in process_tree(victim.proc.pid) if is_worker(p, "stxpar.workers.receiver")]
    assert workers
    for p in workers:
        p.send_signal(signal.SIGSTOP)
    send = rig["sender"](src, recv.address, "--workers", "4")
    time.sleep(2.0)
    assert send.proc.poll() is None, send.stderr
    assert not (dest / "big").exists()
    victim.kill_group()
    assert send.wait(timeout=80) == 0, send.stderr + recv.stderr
    assert sha256_file(dest / "big") == digest
    # The receiver noticed (its connection dropped): put aside within seconds, not forgotten.
    assert wait_for(lambda: "put aside: its connection dropped" in recv.stderr, timeout=8), (
        recv.stderr
    )
    result = send.json()
    # The victim's streams broke and were replaced (new ids, routed to the living).
    assert result["streams_replaced"] + result["reconnects"] > 0, result


def test_wrong_key_helper(rig: dict[str, Any]) -> None:
    other = rig["root"] / "other.key"
    make_keyfile(other)
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 16 * MIB)
    recv = rig["receiver"]("--cluster-workers", "1", "--cluster-wait", "3")
    bad = rig["helper"](keyfile=other)
    assert bad.wait(timeout=15) == 3
    assert "refused this helper's key" in bad.stderr
    send = rig["sender"](src, recv.address, "--workers", "2")
    assert send.wait(timeout=40) == 0, send.stderr
    assert recv.wait(timeout=20) == 0, recv.stderr
    assert sha256_file(rig["root"] / "dest" / "f") == digest
    assert "only 0 of 1 remote workers joined" in recv.stderr, recv.stderr


def _frame(ftype: int, payload: bytes) -> bytes:
    return struct.pack(">BI", ftype, len(payload)) + payload


def test_forged_join_on_helper_port(rig: dict[str, Any]) -> None:
    from stxpar.wire import FrameType
    from stxpar.wire import Join as WireJoin

    recv = rig["receiver"](once=False)
    helper = rig["helper"]()
    assert wait_for(lambda: _joined(helper), timeout=20)
    m = DATA_PORT.search(helper.stderr)
    assert m, helper.stderr
    host, port = m.group(1).rsplit(":", 1)
    forged = [
        WireJoin(os.urandom(16), 0, os.urandom(32)).encode(),  # an unknown session
        b"\x93garbage",
    ]
    for payload in forged:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(_frame(FrameType.JOIN, payload))
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass  # dropped: the helper closes it (nothing but maybe an ERROR)
            except OSError:
                pass
    # An INIT (a handshake) is no use either: this port has no key.
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(_frame(FrameType.INIT, b"\x90"))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    assert helper.proc.poll() is None, helper.stderr
    assert "refused a connection" in helper.stderr, helper.stderr
    # Still serving: a real transfer through it afterwards.
    src = rig["root"] / "src" / "f"
    digest = write_random(src, 16 * MIB)
    send = rig["sender"](src, recv.address, "--workers", "3")
    assert send.wait(timeout=40) == 0, send.stderr + recv.stderr
    assert sha256_file(rig["root"] / "dest" / "f") == digest
    assert wait_for(lambda: bool(_landed(helper)), timeout=10), helper.stderr
    helper.proc.send_signal(signal.SIGTERM)
    assert helper.wait(timeout=10) == 143
    time.sleep(0)
