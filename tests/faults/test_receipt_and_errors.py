"""A lost receipt, a forgery in a resumed session, and what an ERROR shows on the wire.

Real receiver (API, worker processes), real `stx send` processes, a fault relay in between.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fault_relay import FaultRelay, Frame, Truncate, damage_block
from itest_support import BLOCK, run_stx, sha256_file, wait_for, write_random
from tcp_relay import RelayConnection

import stxpar
from stxpar.digest import block_digest
from stxpar.state import load as load_state

SIZE = 4 << 20
TOTAL = SIZE // BLOCK
T_END = 0x09


def via(relay: FaultRelay) -> str:
    return f"127.0.0.1:{relay.port}"


def send_args(src: Path, address: str, keyfile: Path, *extra: str) -> list[str]:
    return [
        "send",
        str(src),
        address,
        "--psk-file",
        str(keyfile),
        "--workers",
        "2",
        "--block-size",
        str(BLOCK),
        "--json",
        "--quiet",
        "--stall-timeout",
        "5",
        *extra,
    ]


class LoseReceipt(FaultRelay):
    """Cut the first control connection at the moment the receiver answers END (the
    receipt never reaches the sender)."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.cut = 0

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if frame.ftype == T_END:
            conn.state["end"] = True
        return frame.raw

    def on_down(self, conn: RelayConnection, data: bytes) -> bytes | None:
        if conn.state.get("end") and self.cut == 0:
            self.cut += 1
            self.note(f"receipt on connection {conn.id} dropped")
            return None
        return data


@pytest.mark.timeout(90)
def test_a_lost_receipt_is_answered_again_without_sending_the_file_twice(
    receiver: stxpar.Receiver, dest: Path, scratch: Path, stx_key: tuple[Path, bytes]
) -> None:
    src = scratch / "payload.bin"
    want = write_random(src, SIZE)
    with LoseReceipt(receiver.address) as relay:
        run = run_stx(*send_args(src, via(relay), stx_key[0]))
    assert relay.cut == 1, relay.log
    assert run.rc == 0, run.stderr
    result = run.json()
    assert result["reconnects"] == 1
    # The reconnect found the completed file: nothing was sent again.
    assert result["blocks_sent"] == TOTAL, result
    assert sha256_file(dest / src.name) == want
    assert sorted(p.name for p in dest.iterdir()) == [src.name]


class ResetThenForge(FaultRelay):
    """Session 1: reset the control connection after ``after`` BLOCK frames (the sender
    reconnects and resumes). Session 2: forge the first BLOCK frame it carries."""

    def __init__(self, target: tuple[str, int], *, after: int, recorded: Callable[[], int]) -> None:
        super().__init__(target)
        self.after = after
        self.recorded = recorded
        self.blocks = 0
        self.controls = 0
        self.forged = 0
        self.cut_done = False

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        with self.lock:
            if frame.ftype == 0x00:  # INIT: a new control connection, i.e. a new session
                self.controls += 1
                conn.state["session"] = self.controls
            elif frame.ftype == 0x10:  # JOIN: a data stream of the latest session
                conn.state["session"] = self.controls
            if not frame.is_block:
                return frame.raw
            session = conn.state.get("session")
            if session == 1:
                self.blocks += 1
                if self.blocks <= self.after:
                    return frame.raw
                cut_control = not self.cut_done
                self.cut_done = True
            else:
                cut_control = False
                forge = self.forged == 0
                self.forged += forge
        if session == 1:
            if cut_control:
                # The premise: session 1 has recorded blocks (its workers acknowledge in
                # batches, so give the receiver a moment to log what it already holds).
                wait_for(lambda: self.recorded() > 0, timeout=10)
                for c in self.snapshot():
                    if self.kind_of(c) == "control" and c.state.get("session") == 1:
                        c.close()
            return None  # session 1 ends here: its streams are cut too
        if forge:
            self.note(f"forged block {frame.seq} in session {session}")
            return damage_block(frame.raw, fix_crc=True)
        return frame.raw


@pytest.mark.timeout(90)
def test_a_forgery_in_a_resumed_session_forgets_only_that_session(
    receiver: stxpar.Receiver, dest: Path, scratch: Path, stx_key: tuple[Path, bytes]
) -> None:
    src = scratch / "payload.bin"
    write_random(src, SIZE)
    data = src.read_bytes()
    statep = dest / f".{src.name}.stxstate"

    def recorded() -> int:
        state = load_state(statep)
        return 0 if state is None else state.count

    with ResetThenForge(receiver.address, after=TOTAL // 2, recorded=recorded) as relay:
        run = run_stx(*send_args(src, via(relay), stx_key[0]))
    assert relay.forged == 1, relay.log
    assert run.rc == 3, run.stderr
    state = load_state(statep)
    assert state is not None, "the earlier session's progress was thrown away"
    claimed = [i for i in range(TOTAL) if state.have[i]]
    assert claimed, "nothing of the first session is kept"
    part = (dest / f".{src.name}.stxpart").read_bytes()
    for i in claimed:  # every block still claimed is the source's, byte for byte
        chunk = data[i * BLOCK : (i + 1) * BLOCK]
        assert part[i * BLOCK : (i + 1) * BLOCK] == chunk
        assert bytes(state.digests[i * 16 : (i + 1) * 16]) == block_digest(chunk)
    # The next honest run resumes from exactly what the first session recorded.
    again = run_stx(*send_args(src, f"127.0.0.1:{receiver.address[1]}", stx_key[0]))
    assert again.rc == 0, again.stderr
    assert again.json()["blocks_resumed"] == len(claimed)
    assert (dest / src.name).read_bytes() == data


class Capture(FaultRelay):
    """Keeps every byte the receiver sent back."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.down = bytearray()

    def on_down(self, conn: RelayConnection, data: bytes) -> bytes | None:
        with self.lock:
            self.down += data
        return data


@pytest.mark.timeout(90)
def test_an_error_after_the_handshake_does_not_show_the_file_name_on_the_wire(
    dest: Path, scratch: Path, stx_key: tuple[Path, bytes]
) -> None:
    """The receiver refuses a name it considers unsafe; its message names the file, so it goes
    sealed: the sender shows it, the wire does not."""
    odd = scratch / ".very-secret-name.bin"
    write_random(odd, 1000)
    with stxpar.Receiver(dest, psk=stx_key[1], workers=1) as receiver:
        with Capture(receiver.address) as relay:
            run = run_stx(*send_args(odd, via(relay), stx_key[0]))
    assert run.rc == 1, run.stderr
    assert "very-secret-name" in run.stderr  # the sender could open the sealed ERROR
    assert b"very-secret-name" not in bytes(relay.down), "the ERROR went out in clear"
    assert list(dest.iterdir()) == []
