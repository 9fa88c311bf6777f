"""Network faults injected by a proxy between a real ``stx send`` and a real receiver: resets,
stalls, a stream cut in the middle of a frame, flipped bits (the CRC catches them: the block is
sent again), forged blocks (CRC recomputed so only the GCM tag can catch them: authentication
failure), a dropped frame, nobody listening, and ``--deadline``.

The receiver is a ``stxpar.Receiver`` in this process (its worker processes are real); every
sender is the ``stx`` command. Each check compares bytes (sha256) and the ``--json`` counters
with what the proxy saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_relay import (
    BlackholeRelay,
    FaultRelay,
    FlipRelay,
    Frame,
    ProcGroup,
    ResetRelay,
    StallRelay,
    Truncate,
    TruncateRelay,
    damage_block,
    send_args,
)
from itest_support import (
    assert_dest_exactly,
    assert_one_line_error,
    expected_digest,
    free_port,
    run_stx,
    sha256_file,
    wait_for,
    write_random,
)
from stxpar.workers.receiver import MAX_CRC_RETRIES
from tcp_relay import RelayConnection
from transfers import context

import stxpar
from stxpar.errors import AuthError
from stxpar.records import BlockOpener, BlockSealer, CrcMismatch

BLOCK = 256 << 10
SIZE = 4 << 20
TOTAL = SIZE // BLOCK


@pytest.fixture
def relays() -> Iterator[Callable[[FaultRelay], FaultRelay]]:
    """``relays(SomeRelay(...))`` starts it; every relay is stopped at teardown."""
    started: list[FaultRelay] = []

    def start(relay: FaultRelay) -> FaultRelay:
        started.append(relay)
        return relay.start()

    try:
        yield start
    finally:
        for r in started:
            r.stop()


@pytest.fixture
def source(scratch: Path) -> tuple[Path, str]:
    path = scratch / "payload.bin"
    return path, write_random(path, SIZE)


def via(relay: FaultRelay) -> str:
    return f"127.0.0.1:{relay.port}"


def assert_arrived(dest: Path, src: Path, want_sha: str, result: dict[str, Any]) -> None:
    assert sha256_file(dest / src.name) == want_sha, "the copy differs from the source"
    assert_dest_exactly(dest, {src.name})
    assert result["blocks_total"] == TOTAL
    assert result["bytes"] == SIZE
    assert result["digest"] == expected_digest(src, BLOCK)
    assert result["blocks_resumed"] == 0, "nothing was there before this run"


def new_session(relay: FaultRelay, old: set[int]) -> bool:
    """A control connection (a new session) reached the proxy besides the ``old`` ones."""
    return any(c.id not in old and relay.kind_of(c) == "control" for c in relay.snapshot())


# ---------------------------------------------------------------- the proxy's own damage


@pytest.mark.timeout(30)
def test_damage_block_is_caught_by_crc_or_by_tag() -> None:
    """The proxy's two kinds of damage are what they claim: a flipped bit fails the CRC; a
    flipped bit with a recomputed CRC passes the CRC and fails the GCM tag."""
    ctx = context(
        session_id=bytes(range(16)),
        stream=3,
        size=3 * 4096 + 7,
        manifest_id=b"F" * 16,
        block_size=4096,
    )
    secret = bytes(range(32, 64))
    for fix_crc, expected in ((False, CrcMismatch), (True, AuthError)):
        sealer = BlockSealer(stream_secret=secret, ctx=ctx)
        opener = BlockOpener(stream_secret=secret, ctx=ctx)
        frame = bytes(sealer.seal(1, b"x" * 4096))
        # the untouched frame opens (so the failure below is the damage's doing)
        where, plain = opener.open(memoryview(frame)[5:])
        assert (where.block, bytes(plain)) == (1, b"x" * 4096)
        frame2 = bytes(sealer.seal(2, b"y" * 4096))
        bad = damage_block(frame2, fix_crc=fix_crc)
        assert bad != frame2 and len(bad) == len(frame2)
        with pytest.raises(expected):
            opener.open(memoryview(bad)[5:])


# ---------------------------------------------------------------- resets


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["data", "control"])
def test_reset_once_then_completes(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
    what: str,
) -> None:
    """``data``: both data streams are reset once after 512 KiB of blocks each; ``control``:
    the control connection is reset once mid data phase. The transfer completes, the JSON says
    how (streams replaced / reconnects) and the copy is exact."""
    src, sha = source
    relay = relays(
        ResetRelay(receiver.address, after=512 << 10, what=what, times=2 if what == "data" else 1)
    )
    run = run_stx(*send_args(src, via(relay), stx_key[0], extra=["--stall-timeout", "10"]))
    assert run.rc == 0, run.stderr
    assert "Traceback" not in run.stderr
    result = run.json()
    assert relay.cuts == (2 if what == "data" else 1), relay.log
    assert_arrived(dest, src, sha, result)
    if what == "data":
        assert result["streams_replaced"] + result["reconnects"] >= 1, result
    else:
        assert result["reconnects"] >= 1, result
    # every block went out at least once (that blocks_sent also covers every frame seen on
    # the wire is test_blocks_sent_counts_every_block_on_the_wire)
    assert relay.block_frames >= TOTAL
    assert result["blocks_sent"] >= TOTAL, result
    assert result["retransmits"] == 0, result


@pytest.mark.timeout(90)
def test_blocks_sent_counts_every_block_on_the_wire(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
) -> None:
    """The control connection is reset mid data phase (repeated: the loss is a race): every
    whole BLOCK frame the proxy saw was sent by a worker, so ``blocks_sent`` is at least
    their number."""
    src, _ = source
    for trial in range(8):
        relay = relays(ResetRelay(receiver.address, after=1 << 20, what="control"))
        run = run_stx(*send_args(src, via(relay), stx_key[0], extra=["--stall-timeout", "10"]))
        relay.stop()
        assert run.rc == 0, run.stderr
        result = run.json()
        assert relay.cuts == 1 and result["reconnects"] >= 1, (relay.log, result)
        assert result["blocks_sent"] >= relay.block_frames, (
            f"trial {trial}: blocks_sent {result['blocks_sent']}, whole BLOCK frames on the "
            f"wire {relay.block_frames}"
        )
        (dest / src.name).unlink()


# ---------------------------------------------------------------- stalls


@pytest.mark.timeout(60)
def test_stall_counts_as_failure_and_reconnects(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
) -> None:
    """Every connection of the first session freezes (both directions) for 5 s after 1 MiB of
    blocks; with a stall timeout of 2 s the sender declares a stall, reconnects and completes.
    (Through the API, whose events say why it reconnected; the workers are real processes.)"""
    src, sha = source
    relay = relays(StallRelay(receiver.address, after=1 << 20, seconds=5))
    events: list[tuple[str, dict[str, Any]]] = []
    result = stxpar.send(
        src,
        "127.0.0.1",
        relay.port,
        psk=stx_key[1],
        workers=2,
        block_size=BLOCK,
        options=stxpar.SendOptions(stall_timeout=2, max_retries=3),
        on_event=lambda kind, fields: events.append((kind, fields)),
    )
    assert relay.stalled, "the relay never stalled"
    assert_arrived(dest, src, sha, result.as_json())
    reasons = [f["reason"] for k, f in events if k == "reconnecting"]
    assert result.reconnects == len(reasons) >= 1, (result, events)
    assert "stalled" in reasons[0], reasons  # the reconnect's reason is the stall
    assert result.retransmits == 0, result
    # a new session got through the relay after the stall
    assert relay.accepted > len(relay.stalled)


@pytest.mark.timeout(60)
def test_stall_reconnect_is_prompt(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
    group: ProcGroup,
) -> None:
    """The first session freezes for good (30 s); with --stall-timeout 2 a new session must
    reach the proxy within a few seconds of the stall being declared."""
    src, _ = source
    relay = relays(StallRelay(receiver.address, after=1 << 20, seconds=30))
    proc = group.start(*send_args(src, via(relay), stx_key[0], extra=["--stall-timeout", "2"]))
    assert wait_for(lambda: relay.stalled is not None, timeout=15), "the relay never stalled"
    frozen = set(relay.stalled or ())
    reconnected = wait_for(lambda: new_session(relay, frozen), timeout=2 + 5)
    assert reconnected, (
        f"no new connection {time.monotonic() - relay.stall_started:.1f} s after the stall "
        f"began (stall timeout 2 s); sender stderr: {group.output(proc)[1]!r}"
    )
    assert proc.wait(timeout=30) == 0, group.output(proc)[1]


class _EndStallRelay(FaultRelay):
    """Freezes the control connection's END frame (type 0x09) of the first session."""

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if frame.kind == "control" and frame.ftype == 0x09:
            with self.lock:
                first = "END held" not in self.log
                if first:
                    self.log.append("END held")
            if first:
                self.stall(30)
                return None
        return frame.raw


@pytest.mark.timeout(60)
def test_stall_after_the_last_block_is_detected(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
    group: ProcGroup,
) -> None:
    src, sha = source
    relay = relays(_EndStallRelay(receiver.address))
    proc = group.start(*send_args(src, via(relay), stx_key[0], extra=["--stall-timeout", "2"]))
    assert wait_for(lambda: "END held" in relay.log, timeout=15), "END never came"
    held = {c.id for c in relay.snapshot()}
    reconnected = wait_for(lambda: new_session(relay, held), timeout=2 + 5)
    assert reconnected, f"no reconnect 7 s into a stall; stderr: {group.output(proc)[1]!r}"
    assert proc.wait(timeout=30) == 0, group.output(proc)[1]
    assert sha256_file(dest / src.name) == sha


# ---------------------------------------------------------------- truncation


@pytest.mark.timeout(60)
def test_stream_cut_in_the_middle_of_a_block_recovers(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
) -> None:
    """The first data stream is closed (FIN) after half of its third BLOCK frame: the receiver
    sees a frame cut short, drops it, and the sender sends the block again on another stream."""
    src, sha = source
    relay = relays(TruncateRelay(receiver.address, nth=2))
    run = run_stx(*send_args(src, via(relay), stx_key[0], extra=["--stall-timeout", "10"]))
    assert run.rc == 0, run.stderr
    assert relay.done, "the relay never truncated a block"
    result = run.json()
    assert_arrived(dest, src, sha, result)
    assert result["streams_replaced"] + result["reconnects"] >= 1, result
    assert result["blocks_sent"] > TOTAL, "the truncated block must have been sent again"
    assert result["retransmits"] == 0, result


# ---------------------------------------------------------------- damage


@pytest.mark.timeout(60)
def test_flipped_bit_is_sent_again(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
) -> None:
    """One ciphertext bit of block 5 flipped once: the CRC catches it, the receiver asks for
    it again (fresh nonce), the copy is exact and --json counts exactly that retransmission."""
    src, sha = source
    relay = relays(FlipRelay(receiver.address, seq=5, times=1))
    run = run_stx(*send_args(src, via(relay), stx_key[0]))
    assert run.rc == 0, run.stderr
    assert relay.hits == 1, relay.log
    result = run.json()
    assert_arrived(dest, src, sha, result)
    assert result["retransmits"] == 1, result
    assert result["blocks_sent"] == TOTAL + 1 == relay.block_frames, (result, relay.block_frames)
    assert result["reconnects"] == 0 and result["streams_replaced"] == 0, result


@pytest.mark.timeout(60)
def test_block_damaged_every_time_fails_with_exit_5(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
) -> None:
    """Block 5 damaged on every pass: asked for again a bounded number of times, then the
    transfer fails with exit 5 (integrity), one line on stderr, no traceback."""
    src, _ = source
    relay = relays(FlipRelay(receiver.address, seq=5, times=1000))
    run = run_stx(*send_args(src, via(relay), stx_key[0]))
    assert run.rc == 5, (run.rc, run.stderr)
    assert_one_line_error(run)
    lines = run.stderr_lines()
    assert len(lines) == 1, lines
    assert "block 5" in lines[0] and "damaged" in lines[0], lines
    assert relay.hits == MAX_CRC_RETRIES + 1, relay.log
    assert not run.stdout.strip(), "no JSON summary for a failed transfer"
    assert not (dest / src.name).exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["forge", "drop-frame"])
def test_forged_block_is_an_auth_failure(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
    how: str,
) -> None:
    """``forge``: a ciphertext bit of block 1 flipped AND its CRC recomputed: the CRC passes,
    the tag fails. ``drop-frame``: block 1's whole frame removed from its stream (the next
    record's nonce no longer matches). Either way: exit 3 with one line, no final file, and the
    receiver serves the next legitimate sender. (That the partial and its state are discarded
    is checked by ``test_forged_session_leaves_nothing_behind``.)"""
    src, sha = source
    relay = relays(
        FlipRelay(receiver.address, seq=1, times=1, forge=how == "forge", drop=how == "drop-frame")
    )
    run = run_stx(*send_args(src, via(relay), stx_key[0], extra=["--stall-timeout", "10"]))
    assert relay.hits == 1, relay.log
    assert run.rc == 3, (run.rc, run.stderr)
    assert_one_line_error(run)
    assert len(run.stderr_lines()) == 1, run.stderr
    assert "authentic" in run.stderr or "forged" in run.stderr, run.stderr
    assert not run.stdout.strip()
    assert not (dest / src.name).exists(), "a forged session produced a final file"

    again = run_stx(*send_args(src, f"127.0.0.1:{receiver.address[1]}", stx_key[0]))
    assert again.rc == 0, again.stderr
    result = again.json()
    assert sha256_file(dest / src.name) == sha
    assert_dest_exactly(dest, {src.name})
    assert result["blocks_sent"] + result["blocks_resumed"] == TOTAL, result


@pytest.mark.timeout(90)
def test_forged_session_leaves_nothing_behind(
    receiver: stxpar.Receiver,
    dest: Path,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
) -> None:
    """CRC right, tag wrong: nothing from that session is kept, not even the blocks that
    arrived intact before the forged one. Repeated, because the failure is a race."""
    src, _ = source
    for trial in range(10):
        relay = relays(FlipRelay(receiver.address, seq=1, times=1, forge=True))
        run = run_stx(*send_args(src, via(relay), stx_key[0], extra=["--stall-timeout", "10"]))
        relay.stop()
        assert run.rc == 3, (trial, run.rc, run.stderr)
        wait_for(lambda: not any(dest.iterdir()), timeout=2)
        left = sorted(p.name for p in dest.iterdir())
        assert not left, f"trial {trial}: the forged session left {left}"


# ---------------------------------------------------------------- giving up


@pytest.mark.timeout(30)
def test_nothing_listening_gives_up_after_max_retries(
    scratch: Path, stx_key: tuple[Path, bytes], source: tuple[Path, str]
) -> None:
    src, _ = source
    run = run_stx(
        *send_args(src, f"127.0.0.1:{free_port()}", stx_key[0], extra=["--max-retries", "2"]),
        timeout=20,
    )
    assert run.rc == 4, (run.rc, run.stderr)
    assert run.seconds < 6, f"took {run.seconds:.1f} s"
    assert_one_line_error(run)
    lines = run.stderr_lines()
    assert len(lines) == 1, lines
    assert "gave up after 3 attempts" in lines[0], lines  # the first one + --max-retries 2
    assert not run.stdout.strip()


@pytest.mark.timeout(30)
def test_backoff_is_exponential_with_jitter(scratch: Path, source: tuple[Path, str]) -> None:
    """The delays between attempts stay between half and all of the backoff's ceiling
    min(cap, initial * 2**n) (exponential, capped, never near zero: issue 11), are really
    slept, and are jittered (not all at their cap)."""
    src, _ = source
    delays: list[float] = []

    def on_event(kind: str, fields: dict[str, Any]) -> None:
        if kind == "reconnecting":
            delays.append(float(fields["delay"]))

    started = time.monotonic()
    with pytest.raises(stxpar.ConnectError):
        stxpar.send(
            src,
            "127.0.0.1",
            free_port(),
            psk=stxpar.generate_key(),
            workers=1,
            block_size=BLOCK,
            options=stxpar.SendOptions(max_retries=4),
            on_event=on_event,
        )
    elapsed = time.monotonic() - started
    assert len(delays) == 4, delays
    caps = [stxpar.SendOptions().backoff.ceiling(n) for n in range(4)]
    assert all(c / 2 - 1e-9 <= d <= c + 1e-9 for d, c in zip(delays, caps, strict=True)), (
        delays,
        caps,
    )
    assert elapsed >= sum(delays) - 0.05, (elapsed, delays)
    assert not all(d >= 0.95 * c for d, c in zip(delays, caps, strict=True)), "no jitter"


@pytest.mark.timeout(60)
def test_deadline_stops_a_transfer_that_stalls_in_the_handshake(
    receiver: stxpar.Receiver,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
    group: ProcGroup,
) -> None:
    src, _ = source
    relay = relays(BlackholeRelay(receiver.address))
    started = time.monotonic()
    proc = group.start(*send_args(src, via(relay), stx_key[0], extra=["--deadline", "1"]))
    finished = wait_for(lambda: proc.poll() is not None, timeout=6, step=0.05)
    assert finished, f"still running {time.monotonic() - started:.1f} s after --deadline 1"
    assert proc.returncode == 4, group.output(proc)


@pytest.mark.timeout(60)
def test_deadline_stops_a_transfer_that_stalls_in_the_data_phase(
    receiver: stxpar.Receiver,
    stx_key: tuple[Path, bytes],
    source: tuple[Path, str],
    relays: Callable[[FaultRelay], FaultRelay],
    group: ProcGroup,
) -> None:
    src, _ = source
    relay = relays(StallRelay(receiver.address, after=512 << 10, seconds=60))
    started = time.monotonic()
    proc = group.start(*send_args(src, via(relay), stx_key[0], extra=["--deadline", "2"]))
    finished = wait_for(lambda: proc.poll() is not None, timeout=7, step=0.05)
    assert relay.stalled, "the relay never stalled"
    assert finished, f"still running {time.monotonic() - started:.1f} s after --deadline 2"
    assert proc.returncode == 4, group.output(proc)
