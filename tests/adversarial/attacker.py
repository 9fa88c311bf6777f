"""The attacker's toolkit for the adversarial suite: raw sockets and the sans-IO classes.

Two kinds of attacker appear in the tests, and each test says which one it plays:

* a **network attacker without the key** (on-path or off-path): it can open connections, send
  any bytes, and record, drop, reorder, duplicate, replay or rewrite frames of honest peers;
* a **peer holding the PSK** (a buggy or hostile authenticated sender). Some attacks can only be
  *staged* with the key (the frames an honest sender would have produced are needed before a
  network attacker can move them around); the manipulation itself never uses the key.

The attacker never goes through the product's sender: frames are built with ``stxpar.wire``,
the handshake with ``ClientHandshake`` or by hand from ``stxpar.keyschedule``, and records with
``records.BlockSealer`` / ``ControlChannel`` / ``AckChannel``. Only ``Arena.still_serving``, the
legitimate sender every test ends with, uses ``stxpar.send``.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from transfers import one_file

import stxpar
from stxpar import keyschedule as ks
from stxpar import state
from stxpar.digest import block_digest, file_digest
from stxpar.errors import StxError
from stxpar.handshake import ClientHandshake
from stxpar.keyschedule import SessionKeys
from stxpar.manifest import chunks
from stxpar.receiver import STATE_SUFFIX
from stxpar.records import AckChannel, BlockContext, BlockSealer, ControlChannel, crc32, join_mac
from stxpar.transfer import Transfer
from stxpar.wire import (
    BLOCK_HEADER,
    CRC,
    HEADER,
    Ack,
    End,
    ErrorMsg,
    FrameType,
    Join,
    MetadataAck,
    Receipt,
    blocks_for,
    encode_frame,
)

#: seconds any single read of the attacker waits for the receiver
READ_TIMEOUT = 8.0
BLOCK = 4096

Frame = tuple[FrameType, bytes]


def now_ms() -> int:
    return int(time.time() * 1000)


def split_frame(frame: bytes) -> Frame:
    ftype, length = HEADER.unpack_from(frame)
    assert len(frame) == HEADER.size + length
    return FrameType(ftype), frame[HEADER.size :]


def raw_frame(ftype: int, payload: bytes, *, length: int | None = None) -> bytes:
    """A frame with any type byte and any length field (``length`` may lie)."""
    return HEADER.pack(ftype, len(payload) if length is None else length) + payload


# ---------------------------------------------------------------- one raw connection

#: every connection the attacker opened; fixtures close them all after each test, so that a
#: failed test cannot leave a session open on the shared receiver
OPEN_PEERS: list[Peer] = []


def close_all_peers() -> None:
    while OPEN_PEERS:
        OPEN_PEERS.pop().close()


class Peer:
    """One TCP connection to the receiver, driven byte by byte by the attacker.

    Every frame that is not ERROR, in either direction, goes into ``transcript`` (what the
    receiver hashes for its transcript hash, as long as the attacker sends well-formed
    frames). ERROR frames the receiver sends land in ``errors``.
    """

    def __init__(
        self, addr: tuple[str, int], *, source_ip: str | None = None, timeout: float = 5.0
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source_ip is not None:
            self.sock.bind((source_ip, 0))
        self.sock.connect(addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        OPEN_PEERS.append(self)
        self._buf = bytearray()
        self.transcript = hashlib.sha256()
        self.sent: list[bytes] = []
        self.received: list[Frame] = []
        self.errors: list[ErrorMsg] = []
        #: how many of ``errors`` came sealed under ``channel`` (an established session's)
        self.sealed_errors = 0
        #: the control channel once a handshake on this connection is established
        self.channel: ControlChannel | None = None
        self.eof = False

    # -- sending

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, ftype: FrameType, payload: bytes) -> bytes:
        frame = encode_frame(ftype, payload)
        if ftype is not FrameType.ERROR:
            self.transcript.update(frame)
        self.sent.append(frame)
        self.sock.sendall(frame)
        return frame

    def send_frames(self, frames: Iterable[bytes]) -> None:
        for frame in frames:
            self.send_frame(*split_frame(frame))

    # -- receiving

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the receiver said nothing")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
                return False
            self._buf += chunk
        return True

    def recv_frame(self, timeout: float = READ_TIMEOUT) -> Frame | None:
        """The next whole frame, or None when the receiver closed the connection."""
        deadline = time.monotonic() + timeout
        if not self._fill(HEADER.size, deadline):
            return None
        ftype, length = HEADER.unpack_from(self._buf)
        assert length <= 1 << 24, f"receiver announced a {length}-byte frame"
        if not self._fill(HEADER.size + length, deadline):
            return None
        frame = bytes(self._buf[: HEADER.size + length])
        del self._buf[: HEADER.size + length]
        got = split_frame(frame)
        self.received.append(got)
        if got[0] is FrameType.ERROR:
            self.errors.append(self._error(got[1]))
        else:
            self.transcript.update(frame)
        return got

    def _error(self, payload: bytes) -> ErrorMsg:
        """An ERROR payload: in the clear, or (after the handshake) sealed under the session's
        control channel, as the receiver may send it either way."""
        if self.channel is not None:
            try:
                body = self.channel.open(FrameType.ERROR, payload)
            except StxError:
                pass
            else:
                self.sealed_errors += 1
                return ErrorMsg.decode(body)
        return ErrorMsg.decode(payload)

    def drain(self, timeout: float = READ_TIMEOUT) -> list[Frame]:
        """Read until the receiver closes; every frame it sent on the way."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            got = self.recv_frame(timeout=max(0.0, deadline - time.monotonic()))
            if got is None:
                return frames
            frames.append(got)

    def closed_by_peer(self, wait: float = 0.0) -> bool:
        """True once the receiver has closed (EOF or reset); frames on the way are kept."""
        if self.eof:
            return True
        try:
            self.recv_frame(timeout=wait) if wait else self._poll()
        except TimeoutError:
            return False
        except OSError:
            return True
        return self.eof

    def _poll(self) -> None:
        if not select.select([self.sock], [], [], 0)[0]:
            return
        try:
            chunk = self.sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
        else:
            self._buf += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expect_refused(
    peer: Peer, code: int | None, message: str | None = None, *, timeout: float = READ_TIMEOUT
) -> list[Frame]:
    """The receiver ends ``peer``: with exactly one ERROR frame of ``code`` (and ``message``,
    if given) as its last frame when ``code`` is not None, else with no ERROR at all; then it
    closes. Returns every other frame the receiver sent on this connection."""
    peer.drain(timeout=timeout)
    assert peer.eof, "the receiver did not close the connection"
    frames = peer.received
    if code is None:
        assert not peer.errors, f"unexpected ERROR frames {peer.errors}"
    else:
        assert len(peer.errors) == 1, f"expected one ERROR frame, got {frames}"
        err = peer.errors[0]
        assert err.code == code, f"ERROR code {err.code} ({err.message!r}), expected {code}"
        if message is not None:
            assert err.message == message, f"ERROR message {err.message!r}, expected {message!r}"
        assert frames[-1][0] is FrameType.ERROR, "frames after the ERROR"
    return [f for f in frames if f[0] is not FrameType.ERROR]


# ---------------------------------------------------------------- handshake as a client

OutHook = Callable[[FrameType, bytes], list[Frame]]
InHook = Callable[[FrameType, bytes], Frame]


def _same_out(ftype: FrameType, payload: bytes) -> list[Frame]:
    return [(ftype, payload)]


def _same_in(ftype: FrameType, payload: bytes) -> Frame:
    return ftype, payload


def client_handshake(
    peer: Peer,
    psk: bytes,
    *,
    nonce: bytes | None = None,
    time_ms: int | None = None,
    out: OutHook = _same_out,
    inn: InHook = _same_in,
    until: FrameType | None = None,
) -> ClientHandshake:
    """Run ``ClientHandshake`` over ``peer``. ``out`` rewrites each outgoing frame into the
    frames actually sent (a man in the middle on the way up); ``inn`` rewrites each incoming
    frame before the client sees it (on the way down). With ``until``, stop as soon as a frame
    of that type arrives, before the client processes it. An ERROR from the receiver, or the
    client's own rejection, raises the StxError; a closed connection raises ConnectionError.
    """
    hs = ClientHandshake(psk=psk, now_ms=now_ms() if time_ms is None else time_ms, nonce=nonce)
    pending = hs.start()
    while True:
        for frame in pending:
            for ftype, payload in out(*split_frame(frame)):
                try:
                    peer.send_frame(ftype, payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the receiver already hung up: read why below
        if hs.established:
            assert hs.session is not None
            peer.channel = ControlChannel(session=hs.session, client=True)
            return hs
        got = peer.recv_frame()
        if got is None:
            raise ConnectionError("the receiver closed the connection during the handshake")
        if until is not None and got[0] is until:
            return hs
        pending = hs.receive(*inn(*got), now_ms=now_ms())


def key_share(psk: bytes, transcript_hash: bytes, public: bytes) -> bytes:
    """A KEY_NEGOTIATION payload for ``public`` with a valid MAC under ``psk``."""
    keys = ks.derive_psk_keys(psk=psk)
    tag = ks.mac(key=keys.client_auth, label="client key share", data=transcript_hash + public)
    return msgpack.packb([public, tag], use_bin_type=True)


def flip_field(payload: bytes, index: int) -> bytes:
    """Re-encode a msgpack array message with one field changed by one bit."""
    fields = msgpack.unpackb(payload, raw=False)
    value = fields[index]
    if isinstance(value, bytes):
        fields[index] = bytes([value[0] ^ 1]) + value[1:]
    elif isinstance(value, str):
        fields[index] = value[:-1] + chr(ord(value[-1]) ^ 1)
    elif isinstance(value, int):
        fields[index] = value ^ 1
    else:  # pragma: no cover - every handshake field is one of the above
        raise TypeError(type(value))
    return msgpack.packb(fields, use_bin_type=True)


# ---------------------------------------------------------------- sessions (with the key)


def make_metadata(
    name: str,
    size: int,
    *,
    block_size: int = BLOCK,
    streams: int = 2,
    file_id: bytes | None = None,
    run_id: bytes | None = None,
    mtime_ns: int = 1_700_000_000_000_000_000,
) -> Transfer:
    """The transfer of one regular file ``name`` of ``size`` bytes (no holes)."""
    return one_file(
        name,
        size,
        block_size=block_size,
        streams=streams,
        file_id=file_id,
        run_id=run_id,
        mtime_ns=mtime_ns,
    )


@dataclass
class Session:
    """An established control connection: its keys, its sealed channel, its metadata."""

    addr: tuple[str, int]
    peer: Peer
    keys: SessionKeys
    channel: ControlChannel
    md: Transfer | None = None
    held: list[int] = field(default_factory=list)

    @property
    def session_id(self) -> bytes:
        return self.keys.session_id

    def send_sealed(self, ftype: FrameType, body: bytes) -> bytes:
        frame = self.channel.seal(ftype, body)
        self.peer.send_frame(*split_frame(frame))
        return frame

    def send_metadata(self, md: Transfer) -> bytes:
        """METADATA (the transfer's header), then its MANIFEST chunks; returns the METADATA
        frame."""
        self.md = md
        frame = self.send_sealed(FrameType.METADATA, md.header.encode())
        for chunk in chunks(md.manifest.entries):
            self.send_sealed(FrameType.MANIFEST, chunk)
        return frame

    def recv_sealed(self, want: FrameType, timeout: float = READ_TIMEOUT) -> bytes | None:
        """The opened body of the next frame, which must be ``want``; None if the receiver
        answered with an ERROR (in ``peer.errors``) or closed."""
        got = self.peer.recv_frame(timeout=timeout)
        if got is None or got[0] is FrameType.ERROR:
            return None
        assert got[0] is want, f"expected {want.name}, got {got[0].name}"
        return self.channel.open(*got)

    def admitted(self) -> bool:
        """Read METADATA_ACK; True if the receiver admitted the metadata."""
        assert self.md is not None
        body = self.recv_sealed(FrameType.METADATA_ACK)
        if body is None:
            return False
        self.held = MetadataAck.decode(body).held(self.md.total_blocks)
        return True

    def send_end(self, data: bytes, *, digest: bytes | None = None) -> None:
        assert self.md is not None
        if digest is None:
            digest = whole_digest(data, self.md)
        self.send_sealed(FrameType.END, End(self.md.total_blocks, digest).encode())

    def receipt(self, timeout: float = READ_TIMEOUT) -> Receipt | None:
        body = self.recv_sealed(FrameType.RECEIPT, timeout=timeout)
        return None if body is None else Receipt.decode(body)

    def stream(self, number: int, **kw: Any) -> Stream:
        return Stream(self, number, **kw)

    def close(self) -> None:
        self.peer.close()


def handshake_session(addr: tuple[str, int], psk: bytes) -> Session:
    peer = Peer(addr)
    hs = client_handshake(peer, psk)
    assert hs.session is not None and peer.channel is not None
    return Session(addr, peer, hs.session, peer.channel)


def open_session(addr: tuple[str, int], psk: bytes, md: Transfer) -> Session:
    """Handshake, METADATA and METADATA_ACK; asserts the receiver admitted it."""
    s = handshake_session(addr, psk)
    s.send_metadata(md)
    assert s.admitted(), f"metadata refused: {s.peer.errors}"
    return s


class Stream:
    """One data stream of a session: JOIN, then sealed BLOCK frames out and ACKs in."""

    def __init__(
        self,
        session: Session,
        number: int,
        *,
        mac: bytes | None = None,
        session_id: bytes | None = None,
        join: bool = True,
    ) -> None:
        md = session.md
        assert md is not None
        self.session = session
        self.number = number
        secret = session.keys.stream_secret(number)
        self.ctx = BlockContext(
            session_id=session.session_id,
            stream=number,
            space=md.manifest.space,
            manifest_id=md.manifest.id,
            rekey_records=md.rekey_records,
            rekey_bytes=md.rekey_bytes,
        )
        self.sealer = BlockSealer(stream_secret=secret, ctx=self.ctx)
        self.acks = AckChannel(stream_secret=secret, ctx=self.ctx)
        self.join_frame = encode_frame(
            FrameType.JOIN,
            Join(
                session_id=session_id if session_id is not None else session.session_id,
                stream=number,
                mac=mac
                if mac is not None
                else join_mac(stream_secret=secret, session_id=session.session_id, stream=number),
            ).encode(),
        )
        self.peer = Peer(session.addr)
        if join:
            self.peer.send_bytes(self.join_frame)

    def seal(self, seq: int, data: bytes) -> bytes:
        """The BLOCK frame an honest sender of this stream would send next for block ``seq``."""
        md = self.session.md
        assert md is not None
        return bytes(self.sealer.seal(seq, block_of(data, seq, md.block_size)))

    def send(self, frame: bytes) -> None:
        self.peer.send_bytes(frame)

    def send_block(self, seq: int, data: bytes) -> bytes:
        frame = self.seal(seq, data)
        self.send(frame)
        return frame

    def read(self, timeout: float = READ_TIMEOUT) -> Ack | ErrorMsg | None:
        """The next ACK (MAC checked), the ERROR the receiver sent, or None when it closed."""
        got = self.peer.recv_frame(timeout=timeout)
        if got is None:
            return None
        if got[0] is FrameType.ERROR:
            return ErrorMsg.decode(got[1])
        assert got[0] is FrameType.ACK, got
        return Ack.decode(self.acks.open(got[1]))

    def wait_durable(self, blocks: Iterable[int], timeout: float = READ_TIMEOUT) -> None:
        want = set(blocks)
        deadline = time.monotonic() + timeout
        while want:
            msg = self.read(timeout=max(0.01, deadline - time.monotonic()))
            assert isinstance(msg, Ack), f"expected an ACK, got {msg!r}"
            want -= set(msg.durable)

    def finish(self) -> None:
        """Half-close like an honest sender worker and wait for the receiver to close."""
        self.peer.sock.shutdown(socket.SHUT_WR)
        self.peer.drain()

    def close(self) -> None:
        self.peer.close()


def block_of(data: bytes, seq: int, block_size: int) -> bytes:
    return data[seq * block_size : (seq + 1) * block_size]


def whole_digest(data: bytes, md: Transfer) -> bytes:
    """END's digest for one-file transfer ``md`` of ``data``: the manifest's tree digest
    (``Manifest.tree_digest``), computed here from the data."""
    block_size = md.block_size
    n = blocks_for(len(data), block_size)
    digests = b"".join(block_digest(block_of(data, i, block_size)) for i in range(n))
    h = hashlib.sha256(b"stx3 tree")
    h.update(md.manifest.digest)
    h.update(file_digest(block_digests=digests, block_size=block_size, size=len(data)))
    return h.digest()


def raw_transfer(
    addr: tuple[str, int], psk: bytes, md: Transfer, data: bytes
) -> tuple[Session, Receipt | None]:
    """A complete transfer as an honest sender would make it, over one stream, without the
    product's sender (so the metadata can say anything)."""
    s = open_session(addr, psk, md)
    need = [i for i in range(md.total_blocks) if i not in s.held]
    if need:
        st = s.stream(0)
        for i in need:
            st.send_block(i, data)
        st.wait_durable(need)
        st.finish()
    s.send_end(data)
    return s, s.receipt()


def rewrite_block(
    frame: bytes,
    *,
    seq: int | None = None,
    size: int | None = None,
    flip_at: int | None = None,
    fix_crc: bool = True,
) -> bytes:
    """A BLOCK frame with its header fields replaced and/or one bit flipped at ``flip_at``
    (an offset into the frame); the CRC recomputed unless ``fix_crc`` is false."""
    buf = bytearray(frame)
    old_seq, old_size = BLOCK_HEADER.unpack_from(buf, HEADER.size)
    BLOCK_HEADER.pack_into(
        buf,
        HEADER.size,
        old_seq if seq is None else seq,
        old_size if size is None else size,
    )
    if flip_at is not None:
        buf[flip_at] ^= 0x01
    if fix_crc:
        end = len(buf) - CRC.size
        CRC.pack_into(buf, end, crc32(bytes(buf[HEADER.size : end])))
    return bytes(buf)


class FrameFilter:
    """A ``TcpRelay`` transform for an on-path attacker that works on whole frames: each
    direction of each connection is cut into frames, and those ``drop(direction, type)``
    picks are silently left out (everything else goes through unchanged)."""

    def __init__(self, drop: Callable[[str, int], bool]) -> None:
        self._drop = drop
        self.dropped: list[tuple[str, int]] = []

    def __call__(self, conn: Any, direction: str, data: bytes) -> bytes:
        buf: bytearray = conn.state.setdefault(direction, bytearray())
        buf += data
        out = bytearray()
        while len(buf) >= HEADER.size:
            ftype, length = HEADER.unpack_from(buf)
            if len(buf) < HEADER.size + length:
                break
            frame = bytes(buf[: HEADER.size + length])
            del buf[: HEADER.size + length]
            if self._drop(direction, ftype):
                self.dropped.append((direction, ftype))
            else:
                out += frame
        return bytes(out)


# ---------------------------------------------------------------- the defender's checks


VICTIM = b"the attacker must not touch this\n"
LEGIT_SIZE = 3 * 4096 + 17


class Arena:
    """A live receiver and the directories around its destination."""

    def __init__(self, root: Path, psk: bytes, **receiver_kw: Any) -> None:
        self.root = root
        self.dest = root / "dest"
        self.outside = root / "outside"
        self.src = root / "src"
        for d in (self.dest, self.outside, self.src):
            d.mkdir()
        (self.outside / "victim").write_bytes(VICTIM)
        self.psk = psk
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._events_lock = threading.Lock()
        kw: dict[str, Any] = {"workers": 1, "handshake_timeout": 2.0}
        kw.update(receiver_kw)
        self.receiver = stxpar.Receiver(self.dest, psk=psk, on_event=self._on_event, **kw)
        self._legit = 0

    def _on_event(self, kind: str, fields: dict[str, Any]) -> None:
        with self._events_lock:
            self.events.append((kind, dict(fields)))

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        with self._events_lock:
            return [f for k, f in self.events if k == kind]

    @property
    def addr(self) -> tuple[str, int]:
        return self.receiver.address

    # ------------------------------------------------------------ the checks

    def settle(self, *, active: int = 0, timeout: float = 15.0) -> None:
        """Wait until the receiver holds no pre-auth slot and exactly ``active`` sessions (and
        names): what the test itself still keeps open."""
        r = self.receiver
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = r.snapshot()
            if (
                snap.sessions_active == active
                and len(snap.names_active) == active
                and not snap.preauth_by_source
            ):
                return
            time.sleep(0.02)
        snap = r.snapshot()
        raise AssertionError(
            f"receiver did not settle: sessions={snap.sessions_active} (expected {active}) "
            f"names={list(snap.names_active)} preauth={dict(snap.preauth_by_source)}"
        )

    def listing(self) -> set[str]:
        return {os.fspath(p.relative_to(self.root)) for p in self.root.rglob("*")}

    def assert_outside_untouched(self) -> None:
        """Nothing appeared beside the destination, and the victim file is intact."""
        beside = {
            p
            for p in self.listing()
            if p not in ("dest", "src") and not p.startswith(("dest/", "src/"))
        }
        assert beside == {"outside", "outside/victim"}, f"written outside: {sorted(beside)}"
        assert (self.outside / "victim").read_bytes() == VICTIM

    def nothing_written(self) -> None:
        self.settle()
        found = sorted(os.listdir(self.dest))
        assert found == [], f"the destination holds {found}"
        self.assert_outside_untouched()

    def nothing_marked(
        self, name: str, *, allowed: frozenset[int] | set[int] = frozenset(), active: int = 0
    ) -> None:
        """No final file for ``name``; its state log (if any) records only ``allowed``.
        ``active``: sessions the test still holds open (see ``settle``)."""
        self.settle(active=active)
        assert not (self.dest / name).exists(), f"{name} was committed"
        parsed = state.load(self.dest / f".{name}{STATE_SUFFIX}")
        if parsed is not None:
            marked = {i for i, v in enumerate(parsed.have) if v}
            assert marked <= allowed, f"blocks {sorted(marked - allowed)} were marked received"
        assert name not in {Path(f["file"]).name for f in self.kinds("received")}
        self.assert_outside_untouched()

    def leftovers(self) -> set[str]:
        return set(os.listdir(self.dest))

    def still_serving(self, **send_kw: Any) -> None:
        """A legitimate sender gets a small file through, verified; then it is removed."""
        self._legit += 1
        name = f"legit-{self._legit}.bin"
        src = self.src / name
        data = os.urandom(LEGIT_SIZE)
        src.write_bytes(data)
        before = len(self.receiver.completed)
        kw: dict[str, Any] = {"workers": 1, "block_size": 4096}
        kw.update(send_kw)
        result = stxpar.send(src, *self.addr, psk=self.psk, **kw)
        assert result.bytes == LEGIT_SIZE
        assert (self.dest / name).read_bytes() == data
        assert len(self.receiver.completed) == before + 1
        (self.dest / name).unlink()
        src.unlink()

    def unharmed(self, **send_kw: Any) -> None:
        """Nothing written anywhere, and the receiver still serves a legitimate sender."""
        self.nothing_written()
        self.still_serving(**send_kw)
        self.nothing_written()

    def clean(self) -> None:
        for p in self.dest.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
