"""A fault-injecting TCP proxy for the fault tests, built on ``tests/tcp_relay.py``.

:class:`FaultRelay` is a :class:`tcp_relay.TcpRelay` that reassembles the client -> server
direction of every connection into whole STX frames (``u8 type | u32 length | payload``) and
hands each frame to :meth:`FaultRelay.on_frame`. A connection whose first frame is JOIN (0x10)
is a data stream; one that starts with INIT (0x00) is a control connection. On a data stream a
BLOCK frame (0x11) carries ``u32 seq | u32 size | ciphertext | tag[16] | crc32[4]``, the CRC-32
covering everything in the payload before it (docs/protocol.md), so the relay can find a chosen
block and damage it:

* :func:`damage_block` with ``fix_crc=False`` flips one ciphertext bit: the CRC no longer
  matches, which the receiver treats as damage in transit (it asks for the block again);
* with ``fix_crc=True`` it also recomputes the CRC-32 (``zlib.crc32``, the same IEEE CRC as
  ISA-L's), so the CRC passes and the AES-GCM tag fails: a forgery (authentication failure, the
  session ends).

Subclasses below drop (reset) connections, stall them, truncate a stream in the middle of a
frame, throttle, gate, black-hole and flip bytes. The existing relay is used unchanged: only
its documented hooks (``transform``, ``on_connect``, ``RelayConnection.state``) are used.

This module also puts ``tests/`` and ``tests/integration/`` on ``sys.path`` (as
``tests/integration/conftest.py`` does) so the fault tests can import ``tcp_relay`` and
``itest_support`` whichever conftest files were loaded, and it holds a few process helpers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
for _p in (str(_TESTS), str(_TESTS / "integration")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from itest_support import STX, assert_no_secrets  # noqa: E402
from tcp_relay import DOWN, Direction, RelayConnection, TcpRelay  # noqa: E402

# Wire constants, written out here from docs/protocol.md and stxpar/wire.py on purpose: the
# proxy is an independent reading of the byte layout, not a user of the code under test.
HEADER = struct.Struct(">BI")
BLOCK_HEADER = struct.Struct(">II")
TAG_LEN = 16
CRC_LEN = 4
T_INIT = 0x00
T_JOIN = 0x10
T_BLOCK = 0x11
KNOWN_TYPES = frozenset({*range(0x00, 0x0C), 0x0F, 0x10, 0x11, 0x12})
#: anything longer is not an STX frame (64 MiB blocks + headers)
MAX_FRAME_PAYLOAD = (136 << 20) + 64
#: offset of the ciphertext in a whole BLOCK frame (frame header + block header)
CT_OFFSET = HEADER.size + BLOCK_HEADER.size


@dataclass
class Frame:
    """One whole frame read from the client side of a connection."""

    #: "control", "data" or "other" (from the connection's first frame)
    kind: str
    #: 0 for the connection's first frame
    index: int
    ftype: int
    raw: bytes

    @property
    def is_block(self) -> bool:
        return self.kind == "data" and self.ftype == T_BLOCK and len(self.raw) >= CT_OFFSET

    @property
    def seq(self) -> int:
        return BLOCK_HEADER.unpack_from(self.raw, HEADER.size)[0]

    @property
    def size(self) -> int:
        return BLOCK_HEADER.unpack_from(self.raw, HEADER.size)[1]


def damage_block(raw: bytes, *, fix_crc: bool, at: int | None = None) -> bytes:
    """A whole BLOCK frame with one ciphertext bit flipped (``at``: offset in the ciphertext,
    default its middle); with ``fix_crc`` the CRC-32 (over ``seq | size | ciphertext | tag``,
    the payload before the CRC) is recomputed to match."""
    out = bytearray(raw)
    _, size = BLOCK_HEADER.unpack_from(out, HEADER.size)
    if len(out) != CT_OFFSET + size + TAG_LEN + CRC_LEN:
        raise ValueError("not a whole BLOCK frame")
    # a zero-length block has only the tag to flip
    i = CT_OFFSET + ((size // 2 if at is None else at) if size else 0)
    out[i] ^= 0x01
    if fix_crc:
        covered = bytes(out[HEADER.size : len(out) - CRC_LEN])
        struct.pack_into(">I", out, len(out) - CRC_LEN, zlib.crc32(covered))
    return bytes(out)


@dataclass(frozen=True)
class Truncate:
    """``on_frame`` result: forward ``data`` (part of a frame), then close both sides with a
    FIN (not a reset), so the server sees a frame cut off in the middle and then end of file."""

    data: bytes


class _Splitter:
    """Sans-IO frame reassembly for one direction; gives up (passes bytes through) on anything
    that does not look like STX framing."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.broken = False
        self.kind = ""
        self.count = 0

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        frames: list[Frame] = []
        while len(self.buf) >= HEADER.size:
            ftype, length = HEADER.unpack_from(self.buf, 0)
            if ftype not in KNOWN_TYPES or length > MAX_FRAME_PAYLOAD:
                self.broken = True
                return frames
            end = HEADER.size + length
            if len(self.buf) < end:
                break
            if not self.kind:
                self.kind = {T_INIT: "control", T_JOIN: "data"}.get(ftype, "other")
            frames.append(Frame(self.kind, self.count, ftype, bytes(self.buf[:end])))
            self.count += 1
            del self.buf[:end]
        return frames

    def take_rest(self) -> bytes:
        rest = bytes(self.buf)
        self.buf.clear()
        return rest


class FaultRelay(TcpRelay):
    """A TcpRelay whose client -> server bytes go through :meth:`on_frame` one whole frame at a
    time (held back until the frame is complete), and server -> client bytes through
    :meth:`on_down`. ``on_frame`` returns the bytes to forward, ``None`` to cut the connection
    with a reset, or :class:`Truncate`. Hooks may sleep with :meth:`stall`, which ``stop()``
    ends early."""

    def __init__(self, target: tuple[str, int], *, connect_timeout: float = 5.0) -> None:
        super().__init__(target, connect_timeout=connect_timeout)
        self.lock = threading.Lock()
        #: set by stop(): every stall ends at once
        self.released = threading.Event()
        #: what the relay did, for assertion messages
        self.log: list[str] = []
        #: whole BLOCK frames that reached ``on_frame`` (forwarded or not)
        self.block_frames = 0

    def stop(self) -> None:
        self.released.set()
        super().stop()

    def stall(self, seconds: float) -> None:
        self.released.wait(seconds)

    def note(self, what: str) -> None:
        with self.lock:
            self.log.append(what)

    def kind_of(self, conn: RelayConnection) -> str:
        sp = conn.state.get("splitter")
        return sp.kind if isinstance(sp, _Splitter) else ""

    # hooks for subclasses
    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        return frame.raw

    def on_down(self, conn: RelayConnection, data: bytes) -> bytes | None:
        return data

    def on_garbage(self, conn: RelayConnection, data: bytes) -> bytes | None:
        return data

    def transform(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        if direction == DOWN:
            return self.on_down(conn, data)
        sp = conn.state.setdefault("splitter", _Splitter())
        assert isinstance(sp, _Splitter)
        if sp.broken:
            return self.on_garbage(conn, data)
        out = bytearray()
        for frame in sp.feed(data):
            if frame.is_block:
                with self.lock:
                    self.block_frames += 1
            result = self.on_frame(conn, frame)
            if result is None:
                self._forward(conn, out)
                return None
            if isinstance(result, Truncate):
                self._forward(conn, out + result.data)
                conn.close(reset=False)
                return None
            out += result
        if sp.broken:
            out += self.on_garbage(conn, sp.take_rest()) or b""
        return bytes(out)

    @staticmethod
    def _forward(conn: RelayConnection, data: bytes | bytearray) -> None:
        if data:
            with contextlib.suppress(OSError):
                conn.upstream.sendall(data)


class ResetRelay(FaultRelay):
    """Cut connections with a TCP reset once enough data went through.

    ``what="data"``: each of the first ``times`` data streams is reset once it has forwarded
    ``after`` bytes of BLOCK frames. ``what="control"``: the first control connection is reset
    once the data streams together forwarded ``after`` bytes (mid data phase)."""

    def __init__(
        self, target: tuple[str, int], *, after: int, what: str = "data", times: int = 1
    ) -> None:
        super().__init__(target)
        assert what in ("data", "control")
        self.after, self.what, self.cuts_left = after, what, times
        self.data_bytes = 0
        self.cuts = 0

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if not frame.is_block:
            return frame.raw
        cut_this = False
        control: RelayConnection | None = None
        with self.lock:
            self.data_bytes += len(frame.raw)
            seen = conn.state.get("block_bytes", 0)
            mine = (seen if isinstance(seen, int) else 0) + len(frame.raw)
            conn.state["block_bytes"] = mine
            if self.what == "data":
                if self.cuts_left > 0 and mine >= self.after and not conn.state.get("cut"):
                    self.cuts_left -= 1
                    self.cuts += 1
                    conn.state["cut"] = True
                    cut_this = True
            elif self.cuts_left > 0 and self.data_bytes >= self.after:
                controls = [c for c in self.snapshot() if self.kind_of(c) == "control"]
                if controls:
                    self.cuts_left -= 1
                    self.cuts += 1
                    control = controls[0]
        if cut_this:
            self.note(f"reset data stream {conn.id} after {mine} bytes")
            return None
        if control is not None:
            self.note(f"reset control connection {control.id}")
            control.close()
        return frame.raw


class StallRelay(FaultRelay):
    """Once the data streams forwarded ``after`` bytes of BLOCK frames, every connection open
    at that moment (the whole first session) stops moving in both directions for ``seconds``,
    then is reset. Connections made later pass untouched."""

    def __init__(self, target: tuple[str, int], *, after: int, seconds: float) -> None:
        super().__init__(target)
        self.after, self.seconds = after, seconds
        self.data_bytes = 0
        self.stalled: set[int] | None = None
        self.stall_started = 0.0

    def _hold(self, conn: RelayConnection) -> bool:
        with self.lock:
            frozen = self.stalled is not None and conn.id in self.stalled
        if frozen:
            self.stall(self.seconds)
        return frozen

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if self._hold(conn):
            return None
        if frame.is_block:
            with self.lock:
                self.data_bytes += len(frame.raw)
                if self.stalled is None and self.data_bytes >= self.after:
                    self.stalled = {c.id for c in self.snapshot()}
                    self.stall_started = time.monotonic()
                    self.log.append(f"stalled connections {sorted(self.stalled)}")
        return frame.raw

    def on_down(self, conn: RelayConnection, data: bytes) -> bytes | None:
        return None if self._hold(conn) else data


class TruncateRelay(FaultRelay):
    """The ``nth`` BLOCK frame (0-based) of the first data stream is forwarded only in part
    (its first ``keep`` bytes, default half), then that stream is closed."""

    def __init__(self, target: tuple[str, int], *, nth: int = 2, keep: int | None = None) -> None:
        super().__init__(target)
        self.nth, self.keep = nth, keep
        self.first_data: int | None = None
        self.done = False
        self.blocks_seen = 0

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if not frame.is_block:
            return frame.raw
        with self.lock:
            if self.first_data is None:
                self.first_data = conn.id
            if self.done or conn.id != self.first_data:
                return frame.raw
            if self.blocks_seen < self.nth:
                self.blocks_seen += 1
                return frame.raw
            self.done = True
        keep = len(frame.raw) // 2 if self.keep is None else self.keep
        self.note(f"truncated block {frame.seq} on stream {conn.id} after {keep} bytes")
        return Truncate(frame.raw[:keep])


class FlipRelay(FaultRelay):
    """Damage block ``seq`` the first ``times`` times it goes through: flip one ciphertext bit
    (``forge=False``: the CRC catches it) or flip it and recompute the CRC (``forge=True``: the
    CRC passes, the tag fails). ``drop=True`` instead removes that whole BLOCK frame from the
    stream (the record counters of the two ends then disagree)."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        seq: int,
        times: int = 1,
        forge: bool = False,
        drop: bool = False,
    ) -> None:
        super().__init__(target)
        self.seq, self.times, self.forge, self.drop = seq, times, forge, drop
        self.hits = 0

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if not frame.is_block or frame.seq != self.seq:
            return frame.raw
        with self.lock:
            if self.hits >= self.times:
                return frame.raw
            self.hits += 1
            self.log.append(f"damaged block {frame.seq} on stream {conn.id} ({self.hits})")
        if self.drop:
            return b""
        return damage_block(frame.raw, fix_crc=self.forge)


class GateRelay(FaultRelay):
    """Lets the first ``after`` BLOCK frames through, then holds every further BLOCK frame
    until :meth:`open` (or ``stop()``)."""

    def __init__(self, target: tuple[str, int], *, after: int) -> None:
        super().__init__(target)
        self.after = after
        self.passed = 0
        self.gate = threading.Event()
        self.closed_at: float | None = None

    def open(self) -> None:
        self.gate.set()

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if frame.is_block:
            with self.lock:
                self.passed += 1
                hold = self.passed > self.after
                if hold and self.closed_at is None:
                    self.closed_at = time.monotonic()
            while hold and not self.gate.is_set() and not self.released.is_set():
                self.gate.wait(0.05)
        return frame.raw


class ThrottleRelay(FaultRelay):
    """Data streams move at most ``rate`` bytes per second each (BLOCK frames are delayed)."""

    def __init__(self, target: tuple[str, int], *, rate: float) -> None:
        super().__init__(target)
        self.rate = rate

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        if frame.is_block:
            self.stall(len(frame.raw) / self.rate)
        return frame.raw


class BlackholeRelay(FaultRelay):
    """Accepts and connects, then forwards nothing in either direction: a peer that stalls
    forever."""

    def on_frame(self, conn: RelayConnection, frame: Frame) -> bytes | Truncate | None:
        return b""

    def on_garbage(self, conn: RelayConnection, data: bytes) -> bytes | None:
        return b""

    def on_down(self, conn: RelayConnection, data: bytes) -> bytes | None:
        return b""


# ---------------------------------------------------------------- processes


class ProcGroup:
    """CLI processes started in their own process groups; ``kill_all`` ends each group (the
    sender's worker processes with it). Output goes to files, never to a pipe that can fill."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []

    def start(
        self,
        *args: str | os.PathLike[str],
        preexec_fn: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        argv = [str(STX), *(os.fspath(a) for a in args)]
        assert_no_secrets(argv)
        n = len(self.procs)
        out, err = self.logdir / f"p{n}.out", self.logdir / f"p{n}.err"
        env = dict(os.environ)
        env.pop("STX_PSK_FILE", None)
        env.pop("STX_DEBUG", None)
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env=env,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        self.procs.append((proc, out, err))
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> tuple[str, str]:
        for p, out, err in self.procs:
            if p is proc:
                texts = (out.read_text(errors="replace"), err.read_text(errors="replace"))
                assert_no_secrets(*texts)
                return texts
        raise KeyError(proc)

    def kill_all(self) -> None:
        """SIGKILL the group of every process still running (its workers with it). A process
        that already exited is left alone: its workers end by themselves when their parent or
        their sockets go away."""
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


def start_receiver(
    group: ProcGroup,
    keyfile: Path,
    dest: Path,
    *,
    workers: int = 2,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = 20.0,
) -> tuple[subprocess.Popen[bytes], int]:
    """``stx recv --json`` (serving until killed) on a free loopback port; (process, port)."""
    proc = group.start(
        "recv",
        "--listen",
        "127.0.0.1:0",
        "--psk-file",
        os.fspath(keyfile),
        "--dest",
        os.fspath(dest),
        "--workers",
        str(workers),
        "--json",
        preexec_fn=preexec_fn,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _LISTENING.search(group.output(proc)[1])
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"stx recv exited with {proc.returncode}: {group.output(proc)}")
        time.sleep(0.02)
    raise AssertionError(f"stx recv did not report listening: {group.output(proc)}")


_LISTENING = re.compile(r"listening on \S+:(\d+)\b")


def send_args(
    src: Path,
    address: str,
    keyfile: Path,
    *,
    workers: int = 2,
    block_size: str = "256K",
    extra: Sequence[str] = (),
) -> list[str]:
    """Arguments of ``stx send`` with JSON output (never quiet: the stderr lines are checked)."""
    return [
        "send",
        os.fspath(src),
        address,
        "--psk-file",
        os.fspath(keyfile),
        "--workers",
        str(workers),
        "--block-size",
        block_size,
        "--json",
        *extra,
    ]


class Idler:
    """A TCP connection that never speaks (held open until ``close``)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class GarbageSpewer(threading.Thread):
    """Connects again and again and writes random bytes until the peer hangs up; counts the
    connections and whether the peer ever sent anything back."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(daemon=True, name="garbage")
        self.address = address
        self.stopping = threading.Event()
        self.connections = 0
        self.bytes_sent = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with socket.create_connection(self.address, timeout=2) as s:
                    self.connections += 1
                    while not self.stopping.is_set():
                        self.bytes_sent += s.send(os.urandom(4096))
            except OSError:
                pass
            self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
