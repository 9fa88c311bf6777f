"""One receiver, many peers at once.

* Four good transfers of different files run at the same time (a throttling proxy makes sure
  they overlap) while a sender with the wrong key, a sender whose block is forged in transit, a
  socket spewing random bytes and a socket that never speaks hit the same port: the four files
  arrive intact, the bad peers get their own errors.
* Two senders of different files with the same name at once: exactly one wins, the other gets
  a clear "in progress" error, and the destination holds exactly the winner's bytes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_relay import (
    FlipRelay,
    GarbageSpewer,
    GateRelay,
    Idler,
    ProcGroup,
    ThrottleRelay,
    send_args,
)
from itest_support import (
    assert_dest_exactly,
    make_keyfile,
    run_stx,
    sha256_file,
    wait_for,
    write_random,
)

import stxpar

MB = 1 << 20


class Events:
    """The receiver's events with their times."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[float, str, dict[str, Any]]] = []

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        with self.lock:
            self.items.append((time.monotonic(), kind, dict(fields)))

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [(t, f) for t, k, f in self.items if k == kind]


def finish(group: ProcGroup, procs: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        left = max(0.1, deadline - time.monotonic())
        assert wait_for(lambda p=p: p.poll() is not None, timeout=left, step=0.05), (
            f"a sender is still running: {group.output(p)[1][-1500:]!r}"
        )


@pytest.mark.timeout(120)
def test_four_transfers_and_bad_peers_at_once(
    scratch: Path, stx_key: tuple[Path, bytes], group: ProcGroup
) -> None:
    keyfile, key = stx_key
    wrong = scratch / "wrong.key"
    make_keyfile(wrong)
    dest = scratch / "dst"
    dest.mkdir()
    sources = []
    for i in range(4):
        src = scratch / f"good-{i}.bin"
        sources.append((src, write_random(src, 8 * MB)))
    forged_src = scratch / "forged.bin"
    write_random(forged_src, 4 * MB)
    wrong_src = scratch / "wrongkey.bin"
    write_random(wrong_src, 4 * MB)

    events = Events()
    with stxpar.Receiver(dest, psk=key, workers=4, on_event=events) as receiver:
        addr = receiver.address
        with (
            ThrottleRelay(addr, rate=2 * MB) as slow,
            FlipRelay(addr, seq=3, forge=True) as forger,
        ):
            idler = Idler(addr)
            spewer = GarbageSpewer(addr)
            spewer.start()
            try:
                good = [
                    group.start(*send_args(src, f"127.0.0.1:{slow.port}", keyfile))
                    for src, _ in sources
                ]
                forged = group.start(*send_args(forged_src, f"127.0.0.1:{forger.port}", keyfile))
                wrong_key = group.start(*send_args(wrong_src, f"127.0.0.1:{addr[1]}", wrong))
                finish(group, [*good, forged, wrong_key], timeout=90)
            finally:
                spewer.stop()
            idler.close()

        for p, (src, sha) in zip(good, sources, strict=True):
            out, err = group.output(p)
            assert p.returncode == 0, (src.name, p.returncode, err)
            assert sha256_file(dest / src.name) == sha, f"{src.name} arrived damaged"
        for p, what in ((forged, "forged"), (wrong_key, "wrong key")):
            out, err = group.output(p)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert p.returncode == 3, (what, p.returncode, err)
            assert len(lines) == 1 and "Traceback" not in err, (what, err)
            assert "authentic" in lines[0] or "forged" in lines[0], (what, lines)
            assert not out.strip()
        assert forger.hits == 1, forger.log
        assert spewer.connections >= 1 and spewer.bytes_sent > 0

        # the good transfers really overlapped: all four were admitted before any finished
        accepted = [t for t, f in events.of("accepted") if f["file"].startswith("good-")]
        received = [t for t, f in events.of("received") if "good-" in f["file"]]
        assert len(received) == 4, events.of("received")
        assert len(accepted) >= 4
        assert sorted(accepted)[3] < min(received), "the four transfers did not overlap"

        finals = {p.name for p in dest.iterdir() if not p.name.startswith(".")}
        assert finals == {src.name for src, _ in sources}, finals
        assert not any(p.name.startswith(".good-") for p in dest.iterdir())

        # and the receiver still serves
        again = scratch / "after.bin"
        sha_again = write_random(again, 1 * MB)
        run = run_stx(*send_args(again, f"127.0.0.1:{addr[1]}", keyfile))
        assert run.rc == 0, run.stderr
        assert sha256_file(dest / again.name) == sha_again


def _same_name_sources(scratch: Path, size: int) -> tuple[Path, str, Path, str]:
    a, b = scratch / "a", scratch / "b"
    a.mkdir()
    b.mkdir()
    sha_a = write_random(a / "same.bin", size)
    sha_b = write_random(b / "same.bin", size)
    assert sha_a != sha_b
    return a / "same.bin", sha_a, b / "same.bin", sha_b


@pytest.mark.timeout(90)
def test_two_senders_of_one_name_race(
    scratch: Path, stx_key: tuple[Path, bytes], group: ProcGroup
) -> None:
    """Started together (through a proxy slow enough that they overlap): one wins."""
    keyfile, key = stx_key
    src_a, sha_a, src_b, sha_b = _same_name_sources(scratch, 4 * MB)
    dest = scratch / "dst"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=key, workers=2) as receiver:
        with ThrottleRelay(receiver.address, rate=1 * MB) as slow:
            pa = group.start(*send_args(src_a, f"127.0.0.1:{slow.port}", keyfile))
            pb = group.start(*send_args(src_b, f"127.0.0.1:{slow.port}", keyfile))
            finish(group, [pa, pb], timeout=60)
        results = {pa.returncode, pb.returncode}
        assert 0 in results and len(results) == 2, (group.output(pa), group.output(pb))
        winner, loser = (pa, pb) if pa.returncode == 0 else (pb, pa)
        want = sha_a if winner is pa else sha_b
        _, err = group.output(loser)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "in progress" in lines[0], lines
        assert sha256_file(dest / "same.bin") == want, "the file is not exactly the winner's"
        assert_dest_exactly(dest, {"same.bin"})
        assert len(receiver.completed) == 1


@pytest.mark.timeout(90)
def test_second_sender_of_a_name_in_progress_is_refused(
    scratch: Path, stx_key: tuple[Path, bytes], group: ProcGroup
) -> None:
    """The first transfer is held mid-way by a proxy; a second sender of another file with the
    same name is refused at once; the first then completes with its own bytes."""
    keyfile, key = stx_key
    src_a, sha_a, src_b, _ = _same_name_sources(scratch, 4 * MB)
    dest = scratch / "dst"
    dest.mkdir()
    with stxpar.Receiver(dest, psk=key, workers=2) as receiver:
        with GateRelay(receiver.address, after=4) as gate:
            pa = group.start(*send_args(src_a, f"127.0.0.1:{gate.port}", keyfile))
            assert wait_for(lambda: gate.closed_at is not None, timeout=30), "never got going"
            run = run_stx(*send_args(src_b, f"127.0.0.1:{receiver.address[1]}", keyfile))
            assert run.rc == 1, (run.rc, run.stderr)
            assert len(run.stderr_lines()) == 1 and "Traceback" not in run.stderr, run.stderr
            assert "in progress" in run.stderr, run.stderr
            assert pa.poll() is None, "the first transfer must not be disturbed"
            gate.open()
            finish(group, [pa], timeout=30)
        assert pa.returncode == 0, group.output(pa)
        assert sha256_file(dest / "same.bin") == sha_a
        assert_dest_exactly(dest, {"same.bin"})
