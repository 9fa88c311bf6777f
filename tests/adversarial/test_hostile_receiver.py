"""A hostile receiver facing the real sender: ``stxpar.send`` (API) and ``stx send`` (CLI).

The receiver here is fake: a thread with a listening socket on 127.0.0.1, written in this file.
Depending on the case it plays

* a **network attacker without the key**: garbage right after accept, a real server handshake
  with a wrong PSK, a RECEIPT frame in the clear or sealed under another session's key, an
  unauthenticated ACK on a data stream;
* a **receiver holding the key** that is broken or lies (``ServerHandshake`` with the right
  keyring and ``records.ControlChannel``): it claims to hold every block with bogus digests and
  answers END with a wrong receipt, or hangs up at END. Where a case needs a staged session for
  the attack proper (a forged receipt, a replayed ACK), the key is used only to stage it; the
  forged message itself is made without the session's keys.

Every case: the sender fails (``send()`` raises an ``StxError``, never returns a
``TransferResult``; the CLI exits non-zero with one line on stderr, no traceback, nothing on
stdout), with the exit code the case calls for, and the key's hex appears nowhere in its
output or exception text. Files are 256 KiB in 64 KiB blocks; retries and stall timeouts are
small so that the cases that reconnect end quickly.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from itest_support import CliRun, assert_no_secrets, assert_one_line_error, register_key, run_stx

import stxpar
from stxpar import keyschedule as ks
from stxpar.digest import BLOCK_DIGEST_LEN, FILE_DIGEST_LEN, block_digest, file_digest
from stxpar.errors import (
    AuthError,
    ConnectError,
    IntegrityError,
    ProtocolError,
    StxError,
)
from stxpar.handshake import ClientHandshake, ServerHandshake, handshake_cap, keyring_for
from stxpar.manifest import Builder, Header, Limits, Manifest
from stxpar.netio import Backoff, FramedSocket
from stxpar.psk import load_key_file, write_key_file
from stxpar.records import AckChannel, BlockContext, BlockOpener, ControlChannel
from stxpar.scan import scan
from stxpar.transfer import Transfer
from stxpar.wire import (
    Ack,
    End,
    ErrorMsg,
    FrameType,
    Join,
    KeyShare,
    MacOnly,
    MetadataAck,
    Receipt,
    ServerHello,
    bitmap,
    blocks_for,
    encode_frame,
)

BLOCK = 64 << 10
SIZE = 256 << 10
WORKERS = 2
#: seconds one fake connection waits for the sender before it gives up
FAKE_TIMEOUT = 10.0

pytestmark = pytest.mark.timeout(90)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _any_cap(ftype: FrameType) -> int:
    return 1 << 20


# ---------------------------------------------------------------- the fake receiver


@dataclass
class Fake:
    """A listening socket; each accepted connection runs ``serve(fake, fs, index)`` in a thread.

    Exceptions of the product's kinds (``StxError``, ``OSError``) end a connection quietly (the
    sender hanging up is normal here); anything else is a bug of the fake and is kept in
    ``bugs`` for the test to report.
    """

    serve: Callable[[Fake, FramedSocket, int], None]
    psk: bytes
    path: Path
    sock: socket.socket = field(init=False)
    accepted: int = 0
    bugs: list[str] = field(default_factory=list)
    #: session id -> (keys, metadata), for the data streams of a key-holding fake
    sessions: dict[bytes, tuple[ks.SessionKeys, Transfer]] = field(default_factory=dict)
    #: block index -> digest of what a key-holding fake really received and acknowledged
    landed: dict[int, bytes] = field(default_factory=dict)
    conns: list[socket.socket] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(FAKE_TIMEOUT)
            with self.lock:
                index = self.accepted
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn, index), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        fs = FramedSocket(conn, peer="sender")
        try:
            self.serve(self, fs, index)
        except (StxError, OSError):
            pass
        except BaseException:
            self.bugs.append(traceback.format_exc())
        finally:
            fs.close()

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()
        self.thread.join(timeout=5)
        with self.lock:
            for conn in self.conns:
                try:
                    conn.close()
                except OSError:
                    pass


class _Prefed(FramedSocket):
    """A FramedSocket whose first ``recv_frame`` returns a frame the dispatcher already read."""

    def __init__(self, fs: FramedSocket, frame: tuple[FrameType, bytes]) -> None:
        super().__init__(fs.sock, peer=fs.peer)
        self._first: tuple[FrameType, bytes] | None = frame

    def recv_frame(self, *, cap: Callable[[FrameType], int]) -> tuple[FrameType, bytes]:
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        return super().recv_frame(cap=cap)


def linger(fs: FramedSocket, seconds: float = FAKE_TIMEOUT) -> None:
    """Read and ignore whatever comes until the sender closes (or ``seconds`` pass)."""
    fs.sock.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if not fs.sock.recv(1 << 16):
                return
        except TimeoutError:
            continue
        except OSError:
            return


def hang_up(fs: FramedSocket) -> None:
    """Send FIN, then wait for the sender's close (no RST racing what we sent)."""
    try:
        fs.sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    linger(fs)


def server_handshake(fs: FramedSocket, psk: bytes) -> ks.SessionKeys:
    """The real server side of the handshake (``ServerHandshake``) over ``fs``."""
    ftype, payload = fs.recv_frame(cap=handshake_cap)
    hs = ServerHandshake(keyring=keyring_for([psk]), now_ms=_now_ms())
    frames = hs.receive(ftype, payload, now_ms=_now_ms())
    while True:
        for frame in frames:
            fs.send(frame)
        if hs.established:
            break
        ftype, payload = fs.recv_frame(cap=handshake_cap)
        frames = hs.receive(ftype, payload, now_ms=_now_ms())
    assert hs.session is not None
    return hs.session


def admit(fake: Fake, fs: FramedSocket) -> tuple[ks.SessionKeys, ControlChannel, Transfer]:
    """Handshake with the key, then read the sealed METADATA and MANIFEST chunks."""
    session = server_handshake(fs, fake.psk)
    channel = ControlChannel(session=session, client=False)
    ftype, payload = fs.recv_frame(cap=_any_cap)
    assert ftype is FrameType.METADATA
    header = Header.decode(channel.open(ftype, payload))
    builder = Builder(header, Limits())
    while not builder.done:
        ftype, payload = fs.recv_frame(cap=_any_cap)
        assert ftype is FrameType.MANIFEST, ftype
        builder.feed(channel.open(ftype, payload))
    md = Transfer(header, builder.manifest())
    assert md.block_size == BLOCK and md.size == SIZE
    with fake.lock:
        fake.sessions[session.session_id] = (session, md)
    return session, channel, md


def claim_all(channel: ControlChannel, md: Transfer, digests: bytes) -> bytes:
    """A METADATA_ACK saying every block is already held, with ``digests``."""
    have = bitmap(b"\x01" * md.total_blocks)
    return channel.seal(FrameType.METADATA_ACK, MetadataAck(have=have, digests=digests).encode())


def true_digests(path: Path) -> bytes:
    data = path.read_bytes()
    return b"".join(block_digest(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK))


def read_end(fs: FramedSocket, channel: ControlChannel, md: Transfer) -> End:
    ftype, payload = fs.recv_frame(cap=_any_cap)
    assert ftype is FrameType.END, ftype
    end = End.decode(channel.open(ftype, payload))
    assert end.total_blocks == md.total_blocks
    return end


def stream_ctx(session: ks.SessionKeys, md: Transfer, stream: int) -> BlockContext:
    return BlockContext(
        session_id=session.session_id,
        stream=stream,
        space=md.manifest.space,
        manifest_id=md.manifest.id,
        rekey_records=md.rekey_records,
        rekey_bytes=md.rekey_bytes,
    )


def tree_digest(manifest: Manifest, block_digests: bytes) -> bytes:
    """The whole-transfer digest (END, RECEIPT) of one-file ``manifest`` whose blocks have
    ``block_digests`` (``Manifest.tree_digest``, computed the same way)."""
    (entry,) = manifest.entries
    h = hashlib.sha256(b"stx3 tree")
    h.update(manifest.digest)
    h.update(file_digest(block_digests=block_digests, block_size=BLOCK, size=entry.data_bytes))
    return h.digest()


def scanned(path: Path) -> Manifest:
    """The manifest the real sender makes of ``path`` (as long as the file does not change)."""
    return Manifest(scan([path]).entries, block_size=BLOCK)


def read_join(fake: Fake, payload: bytes) -> tuple[Join, ks.SessionKeys, Transfer]:
    join = Join.decode(payload)
    with fake.lock:
        session, md = fake.sessions[join.session_id]
    return join, session, md


# ---------------------------------------------------------------- running the real sender


@dataclass
class Target:
    path: Path
    keyfile: Path
    psk: bytes


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    base = tmp_path_factory.mktemp("hostile")
    path = base / "payload.bin"
    path.write_bytes(random.Random(7).randbytes(SIZE))
    keyfile = write_key_file(base / "stx.key")
    return Target(path, keyfile, register_key(load_key_file(keyfile)))


@pytest.fixture
def fake_receiver(target: Target) -> Iterator[Callable[..., Fake]]:
    made: list[Fake] = []

    def factory(serve: Callable[[Fake, FramedSocket, int], None]) -> Fake:
        fake = Fake(serve, target.psk, target.path)
        made.append(fake)
        return fake

    try:
        yield factory
    finally:
        for fake in made:
            fake.stop()
        for fake in made:
            assert not fake.bugs, "the fake receiver itself failed:\n" + "\n".join(fake.bugs)


def api_send(
    target: Target, fake: Fake, capfd: pytest.CaptureFixture[str], *, stall: float = 5.0
) -> StxError:
    """``stxpar.send`` must raise; returns the error (after the secret checks)."""
    opts = stxpar.SendOptions(
        workers=WORKERS,
        block_size=BLOCK,
        max_retries=1,
        connect_timeout=3.0,
        handshake_timeout=3.0,
        stall_timeout=stall,
        backoff=Backoff(initial=0.05, factor=2.0, cap=0.1),
    )
    with pytest.raises(StxError) as info:
        result = stxpar.send(target.path, "127.0.0.1", fake.port, psk=target.psk, options=opts)
        pytest.fail(f"send() reported success against a hostile receiver: {result}")
    exc = info.value
    out, err = capfd.readouterr()
    text = "".join(traceback.format_exception(exc))
    assert_no_secrets(out, err, str(exc), repr(exc), text)
    assert "Traceback" not in out + err  # no worker died with a traceback either
    return exc


def cli_send(target: Target, fake: Fake, *, stall: float = 5.0) -> CliRun:
    """``stx send`` must fail with one line on stderr; returns the run."""
    run = run_stx(
        "send",
        target.path,
        f"127.0.0.1:{fake.port}",
        "--psk-file",
        target.keyfile,
        "--workers",
        str(WORKERS),
        "--block-size",
        "64K",
        "--max-retries",
        "1",
        "--stall-timeout",
        str(stall),
        "--json",
        timeout=60,
    )  # run_stx checks argv, stdout and stderr for the key
    assert run.rc != 0, f"stx send reported success: {run.stdout!r} {run.stderr!r}"
    assert not run.stdout.strip(), f"a failed send printed a result: {run.stdout!r}"
    assert_one_line_error(run)
    assert len(run.stderr_lines()) == 1, run.stderr
    assert run.stderr.startswith("stx: error: "), run.stderr  # not the "sent ..." summary
    return run


def check(
    how: str,
    target: Target,
    fake: Fake,
    capfd: pytest.CaptureFixture[str],
    *,
    errors: tuple[type[StxError], ...],
    codes: tuple[int, ...],
    match: str,
    stall: float = 5.0,
) -> None:
    """The sender fails with one of ``errors`` / exit ``codes``, for the reason ``match``
    (a regular expression searched in the error text)."""
    if how == "api":
        exc = api_send(target, fake, capfd, stall=stall)
        assert isinstance(exc, errors), f"{type(exc).__name__}: {exc}"
        assert exc.exit_code in codes
        assert re.search(match, str(exc)), f"{type(exc).__name__}: {exc}"
    else:
        run = cli_send(target, fake, stall=stall)
        assert run.rc in codes, f"exit {run.rc}, expected one of {codes}: {run.stderr!r}"
        assert re.search(match, run.stderr), run.stderr
    assert fake.accepted >= 1, "the sender never reached the fake receiver"


HOW = pytest.mark.parametrize("how", ["api", "cli"])


# ---------------------------------------------------------------- (a) garbage after accept


#: why the sender refuses each kind of garbage (random bytes: their first byte is no frame type)
GARBAGE_REASON = {
    "random": "unknown frame type",
    "hello-shaped": "malformed ServerHello",
    "huge-length": "exceeds the limit of 512",
    "error-noise": "malformed Error message",
}


def _garbage(kind: str) -> bytes:
    rng = random.Random(f"garbage-{kind}")
    if kind == "random":
        return rng.randbytes(4096)
    if kind == "hello-shaped":  # a SERVER_HELLO header, a payload of noise
        return encode_frame(FrameType.SERVER_HELLO, rng.randbytes(83))
    if kind == "huge-length":  # a plausible type with a 4 GiB length
        return bytes([FrameType.SERVER_HELLO]) + b"\xff\xff\xff\xff" + rng.randbytes(64)
    if kind == "error-noise":  # an ERROR frame whose payload is not msgpack
        return encode_frame(FrameType.ERROR, rng.randbytes(40))
    raise AssertionError(kind)


@HOW
@pytest.mark.parametrize("kind", ["random", "hello-shaped", "huge-length", "error-noise"])
def test_garbage_right_after_accept(
    how: str, kind: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        fs.send(_garbage(kind))
        hang_up(fs)

    fake = fake_receiver(serve)
    check(
        how,
        target,
        fake,
        capfd,
        errors=(ProtocolError, AuthError, ConnectError),
        codes=(1, 3, 4),
        match=GARBAGE_REASON[kind],
    )


def test_random_garbage_of_any_length_many_seeds(
    target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """A small fuzz of (a): 8 sends (up to 16 connections) of noise, 1 to 600 bytes each, some
    short of a whole frame (the sender then sees the hang-up), all refused without success."""

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        rng = random.Random(f"fuzz-{index}")
        fs.send(rng.randbytes(rng.randint(1, 600)))
        hang_up(fs)

    fake = fake_receiver(serve)
    for _ in range(8):  # each send() may connect twice (one retry after a hang-up)
        exc = api_send(target, fake, capfd)
        assert isinstance(exc, ProtocolError | AuthError | ConnectError), repr(exc)
    assert fake.accepted >= 8


# ---------------------------------------------------------------- (b) a receiver without the key


@HOW
def test_real_server_handshake_with_a_wrong_key(
    how: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """``ServerHandshake`` holding another PSK: it fails the client's MAC and says so, as the
    real receiver does (a clear ERROR, code 3)."""
    wrong = os.urandom(32)

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        try:
            server_handshake(fs, wrong)
        except AuthError:
            fs.send(encode_frame(FrameType.ERROR, ErrorMsg(3, "authentication failed").encode()))
            hang_up(fs)
            return
        raise AssertionError("a handshake with the wrong key completed")

    fake = fake_receiver(serve)
    check(
        how,
        target,
        fake,
        capfd,
        errors=(AuthError,),
        codes=(3,),
        match="receiver: authentication failed",
    )


@HOW
def test_receiver_without_the_key_answers_server_auth_anyway(
    how: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """A receiver without the key ignores the failed check and sends SERVER_AUTH made with
    its own (wrong) PSK over the real transcript: the sender's own check must refuse it."""
    wrong = ks.derive_psk_keys(psk=os.urandom(32))

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        th = hashlib.sha256()
        ftype, payload = fs.recv_frame(cap=handshake_cap)
        assert ftype is FrameType.INIT
        th.update(encode_frame(ftype, payload))
        hello = encode_frame(
            FrameType.SERVER_HELLO, ServerHello(os.urandom(32), _now_ms()).encode()
        )
        fs.send(hello)
        th.update(hello)
        for want in (FrameType.CLIENT_HELLO, FrameType.CLIENT_AUTH):
            ftype, payload = fs.recv_frame(cap=handshake_cap)
            assert ftype is want
            th.update(encode_frame(ftype, payload))
        tag = ks.mac(key=wrong.server_auth, label="server auth", data=th.digest())
        fs.send(encode_frame(FrameType.SERVER_AUTH, MacOnly(tag).encode()))
        linger(fs)

    fake = fake_receiver(serve)
    check(how, target, fake, capfd, errors=(AuthError,), codes=(3,), match="does not hold this key")


#: X25519 public keys of small order: every private key gives an all-zero shared secret
LOW_ORDER = {
    "zero": "00" * 32,
    "order-8": "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
}


@HOW
@pytest.mark.parametrize("point", sorted(LOW_ORDER))
def test_key_holder_confirms_with_a_low_order_point(
    how: str, point: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """A receiver that holds the PSK runs the real ``ServerHandshake`` up to SERVER_AUTH, then
    answers KEY_NEGOTIATION with a low-order ephemeral key and a finished MAC that is correct
    for the resulting all-zero secret: the sender must refuse the key exchange itself."""
    public = bytes.fromhex(LOW_ORDER[point])

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        th = hashlib.sha256()  # our own copy of the transcript, frame by frame
        hs = ServerHandshake(keyring=keyring_for([fake.psk]), now_ms=_now_ms())
        for want in (FrameType.INIT, FrameType.CLIENT_HELLO, FrameType.CLIENT_AUTH):
            ftype, payload = fs.recv_frame(cap=handshake_cap)
            assert ftype is want
            th.update(encode_frame(ftype, payload))
            for frame in hs.receive(ftype, payload, now_ms=_now_ms()):
                th.update(frame)
                fs.send(frame)
        ftype, payload = fs.recv_frame(cap=handshake_cap)
        assert ftype is FrameType.KEY_NEGOTIATION
        th.update(encode_frame(ftype, payload))
        early = ks.derive_psk_keys(psk=fake.psk).early
        master = ks.derive_master(
            early=early, shared=bytes(32), transcript_hash=th.digest(), eph_s=public
        )
        session = ks.derive_session_keys(master=master)
        tag = ks.mac(
            key=session.server_finished, label="server finished", data=th.digest() + public
        )
        fs.send(encode_frame(FrameType.KEY_CONFIRMATION, KeyShare(public, tag).encode()))
        linger(fs)

    fake = fake_receiver(serve)
    check(
        how,
        target,
        fake,
        capfd,
        errors=(AuthError,),
        codes=(3,),
        match="key exchange failed",
    )


# ---------------------------------------------------------------- (c) a lying key holder


@HOW
@pytest.mark.parametrize("lie", ["wrong-digest", "wrong-size"])
def test_key_holder_claims_every_block_then_sends_a_wrong_receipt(
    how: str, lie: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """METADATA_ACK: every block held, bogus digests. END then carries a digest built from
    them; the RECEIPT that answers it does not match it (digest or size): no success."""

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        _, channel, md = admit(fake, fs)
        bogus = os.urandom(BLOCK_DIGEST_LEN * md.total_blocks)
        fs.send(claim_all(channel, md, bogus))
        end = read_end(fs, channel, md)
        # the sender folded the bogus digests in (threat model §7.3), nothing else
        assert end.digest == tree_digest(md.manifest, bogus)
        if lie == "wrong-digest":
            receipt = Receipt(digest=os.urandom(FILE_DIGEST_LEN), size=md.size)
        else:
            receipt = Receipt(digest=end.digest, size=md.size + 1)
        fs.send(channel.seal(FrameType.RECEIPT, receipt.encode()))
        linger(fs)

    fake = fake_receiver(serve)
    check(
        how,
        target,
        fake,
        capfd,
        errors=(IntegrityError,),
        codes=(5,),
        match="receipt does not match",
    )


# ---------------------------------------------------------------- (d) forged receipts


def _other_session(psk: bytes) -> ks.SessionKeys:
    """A complete handshake of another session (same PSK), in memory."""
    client = ClientHandshake(psk=psk, now_ms=_now_ms())
    server = ServerHandshake(keyring=keyring_for([psk]), now_ms=_now_ms())
    pending = [(server, f) for f in client.start()]
    while pending:
        side, frame = pending.pop(0)
        peer = client if side is server else server
        out = side.receive(FrameType(frame[0]), frame[5:], now_ms=_now_ms())
        pending.extend((peer, f) for f in out)
    assert client.session is not None and client.session == server.session
    return client.session


def test_receipt_in_place_of_server_hello_without_the_key(
    target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """No key at all: a RECEIPT frame (plain msgpack with the right digest) straight away."""
    digest = tree_digest(scanned(target.path), true_digests(target.path))

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        fs.recv_frame(cap=handshake_cap)
        fs.send(encode_frame(FrameType.RECEIPT, Receipt(digest=digest, size=SIZE).encode()))
        hang_up(fs)

    fake = fake_receiver(serve)
    check(
        "api", target, fake, capfd, errors=(ProtocolError,), codes=(1,), match="unexpected RECEIPT"
    )


@HOW
@pytest.mark.parametrize("forgery", ["plaintext", "other-session", "reflected"])
def test_forged_receipt_after_a_staged_session(
    how: str, forgery: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """The session is staged with the key and claims every block with its TRUE digest, so
    END carries the right whole-file digest; the RECEIPT that answers it says exactly the right
    thing (digest, size) but is not sealed by this session's receiver key: in the clear, sealed
    under another session's key (same PSK, same record counter), or sealed with this session's
    own sender-to-receiver key (a reflection)."""

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        session, channel, md = admit(fake, fs)
        fs.send(claim_all(channel, md, true_digests(fake.path)))
        end = read_end(fs, channel, md)
        body = Receipt(digest=end.digest, size=md.size).encode()
        if forgery == "plaintext":
            frame = encode_frame(FrameType.RECEIPT, body)
        elif forgery == "other-session":
            other = ControlChannel(session=_other_session(fake.psk), client=False)
            other.seal(FrameType.METADATA_ACK, b"")  # same counter as this session's receipt
            frame = other.seal(FrameType.RECEIPT, body)
        else:
            mirror = ControlChannel(session=session, client=True)
            mirror.seal(FrameType.METADATA, b"")
            frame = mirror.seal(FrameType.RECEIPT, body)
        fs.send(frame)
        linger(fs)

    fake = fake_receiver(serve)
    check(
        how,
        target,
        fake,
        capfd,
        errors=(AuthError,),
        codes=(3,),
        match="RECEIPT failed authentication",
    )


# ---------------------------------------------------------------- (e) forged and replayed acks


def _serve_control_none_held(fake: Fake, fs: FramedSocket) -> None:
    """Key holder: nothing held yet; then wait for END (it must never come) and hang up."""
    _, channel, md = admit(fake, fs)
    empty = bitmap(bytes(md.total_blocks))
    fs.send(channel.seal(FrameType.METADATA_ACK, MetadataAck(have=empty).encode()))
    fs.sock.settimeout(FAKE_TIMEOUT)
    ftype, _ = fs.recv_frame(cap=_any_cap)
    raise AssertionError(f"the sender sent {ftype.name} although no block was acknowledged")


@HOW
@pytest.mark.parametrize("forgery", ["random-mac", "other-stream", "replayed"])
def test_forged_or_replayed_ack_on_a_data_stream(
    how: str, forgery: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """Data streams get an ACK that does not verify on them: any MAC (no key), an ACK that
    verifies on another stream of the session, or this stream's own first ACK a second time.
    The worker reports an authentication failure; the sender fails."""

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        ftype, payload = fs.recv_frame(cap=_any_cap)
        if ftype is FrameType.INIT:
            _serve_control_none_held(fake, _Prefed(fs, (ftype, payload)))
            return
        assert ftype is FrameType.JOIN
        join, session, md = read_join(fake, payload)
        if forgery == "random-mac":
            body = Ack(durable=(0, 1, 2, 3), resend=()).encode()
            fs.send(encode_frame(FrameType.ACK, body + os.urandom(ks.HASH_LEN)))
        elif forgery == "other-stream":
            other = join.stream + 1
            acks = AckChannel(
                stream_secret=session.stream_secret(other), ctx=stream_ctx(session, md, other)
            )
            fs.send(acks.seal(Ack(durable=(0, 1, 2, 3), resend=()).encode()))
        else:
            acks = AckChannel(
                stream_secret=session.stream_secret(join.stream),
                ctx=stream_ctx(session, md, join.stream),
            )
            ftype, block = fs.recv_frame(cap=_any_cap)
            assert ftype is FrameType.BLOCK
            seq = int.from_bytes(block[:4], "big")
            frame = acks.seal(Ack(durable=(seq,), resend=()).encode())
            fs.send(frame)  # genuine
            fs.send(frame)  # the same bytes again
        linger(fs)

    fake = fake_receiver(serve)
    check(
        how,
        target,
        fake,
        capfd,
        errors=(AuthError,),
        codes=(3,),
        match="forged or replayed acknowledgement",
    )


# ---------------------------------------------------------------- (f) no receipt


def _serve_data_honestly(fake: Fake, fs: FramedSocket, payload: bytes) -> None:
    """Open every block for real and acknowledge it with a genuine ACK."""
    join, session, md = read_join(fake, payload)
    secret = session.stream_secret(join.stream)
    ctx = stream_ctx(session, md, join.stream)
    opener = BlockOpener(stream_secret=secret, ctx=ctx)
    acks = AckChannel(stream_secret=secret, ctx=ctx)
    while True:
        header = fs.recv_header_or_eof(cap=_any_cap)
        if header is None:
            return
        ftype, length = header
        assert ftype is FrameType.BLOCK
        body = bytearray(length)
        fs.recv_into(memoryview(body))
        where, plain = opener.open(memoryview(body))
        seq = where.block
        with fake.lock:
            fake.landed[seq] = block_digest(plain)
        fs.send(acks.seal(Ack(durable=(seq,), resend=()).encode()))


@pytest.mark.parametrize(
    ("how", "after_end"), [("api", "close"), ("cli", "close"), ("api", "silent")]
)
def test_no_receipt_after_end(
    how: str, after_end: str, target: Target, fake_receiver: Callable[..., Fake], capfd
) -> None:
    """A key holder receives every block for real and acknowledges each one genuinely, but
    at END it hangs up (or says nothing): the sender reconnects (the fake then claims every
    block with the digests it really got), and again gets no receipt: it gives up, exit 4."""
    ends: list[End] = []

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        ftype, payload = fs.recv_frame(cap=_any_cap)
        if ftype is FrameType.JOIN:
            _serve_data_honestly(fake, fs, payload)
            return
        pre = _Prefed(fs, (ftype, payload))
        _, channel, md = admit(fake, pre)
        with fake.lock:
            landed = dict(fake.landed)
        if len(landed) == md.total_blocks:
            digests = b"".join(landed[i] for i in range(md.total_blocks))
            fs.send(claim_all(channel, md, digests))
        else:
            empty = bitmap(bytes(md.total_blocks))
            fs.send(channel.seal(FrameType.METADATA_ACK, MetadataAck(have=empty).encode()))
        fs.sock.settimeout(FAKE_TIMEOUT)
        ends.append(read_end(fs, channel, md))
        if after_end == "close":
            hang_up(fs)
        else:
            linger(fs)

    fake = fake_receiver(serve)
    # the stall timeout also bounds the first session's data phase (worker start-up on a busy
    # machine): long enough for that, short enough for the "silent" case to end soon
    check(
        how,
        target,
        fake,
        capfd,
        errors=(ConnectError,),
        codes=(4,),
        match=r"gave up after 2 attempts",
        stall=3.0,
    )
    want = tree_digest(scanned(target.path), true_digests(target.path))
    assert len(ends) == 2, "expected END once per session (the first try and one retry)"
    assert all(e.digest == want for e in ends)
    assert len(fake.landed) == blocks_for(SIZE, BLOCK)


# ---------------------------------------------------------------- (g) a trickling receiver


def test_trickled_server_hello_cannot_stretch_the_handshake(
    target: Target, fake_receiver: Callable[..., Fake]
) -> None:
    drip = 0.25  # seconds per byte: every single read finishes well inside the timeout
    timeout = 1.0

    def serve(fake: Fake, fs: FramedSocket, index: int) -> None:
        fs.recv_frame(cap=handshake_cap)
        hello = encode_frame(
            FrameType.SERVER_HELLO, ServerHello(os.urandom(32), _now_ms()).encode()
        )
        for byte in hello:
            if fake.stopping.is_set():
                return
            fs.send(bytes([byte]))
            time.sleep(drip)
        linger(fs)

    fake = fake_receiver(serve)
    opts = stxpar.SendOptions(
        workers=1, block_size=BLOCK, max_retries=0, handshake_timeout=timeout, connect_timeout=2.0
    )
    outcome: list[BaseException | stxpar.TransferResult] = []

    def run() -> None:
        try:
            outcome.append(
                stxpar.send(target.path, "127.0.0.1", fake.port, psk=target.psk, options=opts)
            )
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=4 * timeout)
    held_for = time.monotonic() - started
    fake.stop()  # ends the trickle: the sender fails promptly now, whatever happened before
    thread.join(timeout=20)
    assert outcome and not isinstance(outcome[0], stxpar.TransferResult), outcome
    assert isinstance(outcome[0], StxError), repr(outcome[0])
    assert held_for < 4 * timeout, (
        f"a keyless receiver held send() in the handshake for {held_for:.1f} s "
        f"with handshake_timeout={timeout} s"
    )
