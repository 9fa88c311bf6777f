"""The STX handshake state machines, version ``stx3`` (sans-IO: frames in, frames out, clock
passed in).

Theory of operation
-------------------
The seed's flow, with SECURITY.md's fixes::

    client (sender)                                server (receiver)
    -- INIT("stx3") -->                              (the seed's "Init Connection")
                     <-- SERVER_HELLO(nonce_s, t) --
    -- CLIENT_HELLO(key_id, nonce_c, t) -->
    -- CLIENT_AUTH(MAC_c(TH)) -->                   checks the cheap PSK MAC first
                     <-- SERVER_AUTH(MAC_s(TH)) --
    -- KEY_NEGOTIATION(eph_c, MAC_c(TH|eph_c)) -->   only now any X25519 work
                     <-- KEY_CONFIRMATION(eph_s, MAC_fin(TH|eph_s)) --
    both: master = HKDF(PSK-early, X25519(eph_c, eph_s), TH, eph_s)

TH is the SHA-256 of every handshake frame so far (header and payload bytes), so every MAC and
the master secret bind every field of every earlier message. Client and server MACs use
different keys and labels (no reflection). The server's nonce makes each handshake unique; the
client's timestamp must fall in a window and its nonce must not be in a bounded replay cache.

Each side is a table ``(state, frame type) -> handler``; any pair not in the table is a
protocol error and the machine moves to ``FAILED``. An ERROR frame from the peer raises the
error it names. After ``ESTABLISHED`` the machine refuses every further frame.
"""

from __future__ import annotations

import enum
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import keyschedule as ks
from .errors import AuthError, ProtocolError, StxError, error_from_wire
from .wire import (
    MAX_HANDSHAKE_PAYLOAD,
    ClientHello,
    ErrorMsg,
    FrameType,
    Init,
    KeyShare,
    MacOnly,
    ServerHello,
    encode_frame,
)

AUTH_FAILED = "authentication failed"
DEFAULT_WINDOW_MS = 300_000


def now_ms() -> int:
    """The wall clock in milliseconds: what the drivers pass in as ``now_ms`` (the machines
    themselves never read a clock)."""
    return int(time.time() * 1000)


class ClockSkewError(AuthError):
    """The sender proved the key, but its clock is outside the receiver's window. Raised only
    after the MAC verified, so its precise text (unlike every other authentication failure's)
    tells nothing to someone without the key."""

    def __init__(self, *, skew_ms: int, window_ms: int) -> None:
        self.skew_ms, self.window_ms = skew_ms, window_ms
        side = "ahead" if skew_ms > 0 else "behind"
        super().__init__(
            f"clock skew: the sender's clock differs from the receiver's by"
            f" {_seconds(skew_ms)} s ({side}); allowed ±{_seconds(window_ms)} s"
            " (the receiver's --clock-window)"
        )


def _seconds(ms: int) -> str:
    """Whole seconds from 10 s on (the network's delay is in the measured skew anyway)."""
    if abs(ms) >= 10_000:
        return f"{round(abs(ms) / 1000):,}"
    return f"{abs(ms) / 1000:.3f}".rstrip("0").rstrip(".")


class State(enum.Enum):
    START = "start"
    WAIT_INIT = "wait-init"
    WAIT_SERVER_HELLO = "wait-server-hello"
    WAIT_CLIENT_HELLO = "wait-client-hello"
    WAIT_CLIENT_AUTH = "wait-client-auth"
    WAIT_SERVER_AUTH = "wait-server-auth"
    WAIT_KEY_NEGOTIATION = "wait-key-negotiation"
    WAIT_KEY_CONFIRMATION = "wait-key-confirmation"
    ESTABLISHED = "established"
    FAILED = "failed"


def handshake_cap(ftype: FrameType) -> int:
    """Payload cap for any frame during the handshake."""
    return MAX_HANDSHAKE_PAYLOAD


def _private_key(raw: bytes | None) -> X25519PrivateKey:
    return (
        X25519PrivateKey.from_private_bytes(raw) if raw is not None else X25519PrivateKey.generate()
    )


def warm_up() -> None:
    """Make and use one throwaway X25519 key: the first one a process makes costs several
    milliseconds (the library sets itself up), which a receiver pays when it starts rather
    than in its first handshake. No secret is involved."""
    x25519_shared(X25519PrivateKey.generate(), _public_bytes(X25519PrivateKey.generate()))


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def x25519_shared(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 that refuses low-order points (an all-zero shared secret)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise AuthError("key exchange failed: peer sent a low-order public key") from None
    if shared == bytes(32):  # cryptography already refuses this; keep the check explicit
        raise AuthError("key exchange failed: all-zero shared secret")
    return shared


class ReplayCache:
    """Bounded memory of recently seen client nonces, each kept for the timestamp window."""

    def __init__(self, *, max_entries: int = 65536, ttl_ms: int = 2 * DEFAULT_WINDOW_MS) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl_ms

    def check_and_add(self, nonce: bytes, *, now_ms: int) -> None:
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now_ms and len(self._seen) < self._max:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise AuthError("replayed handshake")
        self._seen[nonce] = now_ms + self._ttl

    def __len__(self) -> int:
        return len(self._seen)


class _Handshake:
    #: How an ERROR from the other side is labelled in the exception message.
    peer_label = "peer"
    _table: Mapping[tuple[State, FrameType], Callable[[Any, bytes, bytes], list[bytes]]] = {}

    def __init__(self) -> None:
        self.state = State.START
        self._th = hashlib.sha256()
        self.session: ks.SessionKeys | None = None

    @property
    def transcript_hash(self) -> bytes:
        return self._th.copy().digest()

    def _emit(self, ftype: FrameType, payload: bytes) -> bytes:
        frame = encode_frame(ftype, payload)
        self._th.update(frame)
        return frame

    def receive(self, ftype: FrameType, payload: bytes, *, now_ms: int) -> list[bytes]:
        """Consume one frame from the peer; return the frames to send back, in order."""
        if self.state in (State.FAILED, State.ESTABLISHED):
            raise ProtocolError(f"unexpected {ftype.name} after the handshake ended")
        if ftype is FrameType.ERROR:
            self.state = State.FAILED
            err = ErrorMsg.decode(payload)
            raise error_from_wire(err.code, err.message, peer=self.peer_label)
        handler = self._table.get((self.state, ftype))
        if handler is None:
            failed_in = self.state
            self.state = State.FAILED
            raise ProtocolError(f"unexpected {ftype.name} in state {failed_in.value}")
        try:
            before = self.transcript_hash
            self._th.update(encode_frame(ftype, payload))
            return handler(self, payload, before)
        except StxError:
            self.state = State.FAILED
            raise

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED


class ClientHandshake(_Handshake):
    """The sender's side. Feed it the server's frames; it returns what to send."""

    peer_label = "receiver"

    def __init__(
        self,
        *,
        psk: bytes,
        now_ms: int,
        nonce: bytes | None = None,
        ephemeral: bytes | None = None,
    ) -> None:
        super().__init__()
        self._psk = ks.derive_psk_keys(psk=psk)
        self._nonce = nonce if nonce is not None else os.urandom(32)
        self._eph = _private_key(ephemeral)
        self._now_ms = now_ms

    def start(self) -> list[bytes]:
        """The first frame to send (INIT)."""
        if self.state is not State.START:
            raise ProtocolError("handshake already started")
        self.state = State.WAIT_SERVER_HELLO
        return [self._emit(FrameType.INIT, Init().encode())]

    def _on_server_hello(self, payload: bytes, th: bytes) -> list[bytes]:
        ServerHello.decode(payload)
        hello = self._emit(
            FrameType.CLIENT_HELLO,
            ClientHello(key_id=self._psk.key_id, nonce=self._nonce, time_ms=self._now_ms).encode(),
        )
        tag = ks.mac(key=self._psk.client_auth, label="client auth", data=self.transcript_hash)
        auth = self._emit(FrameType.CLIENT_AUTH, MacOnly(tag).encode())
        self.state = State.WAIT_SERVER_AUTH
        return [hello, auth]

    def _on_server_auth(self, payload: bytes, th: bytes) -> list[bytes]:
        msg = MacOnly.decode(payload)
        try:
            ks.verify_mac(key=self._psk.server_auth, label="server auth", data=th, tag=msg.mac)
        except ValueError:
            raise AuthError(AUTH_FAILED + " (the receiver does not hold this key)") from None
        pub = _public_bytes(self._eph)
        tag = ks.mac(
            key=self._psk.client_auth, label="client key share", data=self.transcript_hash + pub
        )
        self.state = State.WAIT_KEY_CONFIRMATION
        return [self._emit(FrameType.KEY_NEGOTIATION, KeyShare(pub, tag).encode())]

    def _on_key_confirmation(self, payload: bytes, th: bytes) -> list[bytes]:
        msg = KeyShare.decode(payload)
        shared = x25519_shared(self._eph, msg.public)
        master = ks.derive_master(
            early=self._psk.early, shared=shared, transcript_hash=th, eph_s=msg.public
        )
        session = ks.derive_session_keys(master=master)
        try:
            ks.verify_mac(
                key=session.server_finished,
                label="server finished",
                data=th + msg.public,
                tag=msg.mac,
            )
        except ValueError:
            raise AuthError(AUTH_FAILED + " (bad key confirmation)") from None
        self.session = session
        self.state = State.ESTABLISHED
        return []

    _table = {
        (State.WAIT_SERVER_HELLO, FrameType.SERVER_HELLO): _on_server_hello,
        (State.WAIT_SERVER_AUTH, FrameType.SERVER_AUTH): _on_server_auth,
        (State.WAIT_KEY_CONFIRMATION, FrameType.KEY_CONFIRMATION): _on_key_confirmation,
    }


class ServerHandshake(_Handshake):
    """The receiver's side: feed it the client's frames (INIT first); it returns what to send.

    ``keyring`` maps key ids to PSKs; an unknown key id fails exactly like a wrong MAC.
    """

    peer_label = "sender"

    def __init__(
        self,
        *,
        keyring: Mapping[bytes, ks.PskKeys],
        now_ms: int,
        replay_cache: ReplayCache | None = None,
        window_ms: int = DEFAULT_WINDOW_MS,
        nonce: bytes | None = None,
        ephemeral: bytes | None = None,
    ) -> None:
        super().__init__()
        self._keyring = keyring
        self._psk: ks.PskKeys | None = None
        self._hello: ClientHello | None = None
        self._nonce = nonce if nonce is not None else os.urandom(32)
        self._eph_raw = ephemeral
        self._now_ms = now_ms
        self._window_ms = window_ms
        self._replay = replay_cache if replay_cache is not None else ReplayCache()

        self.state = State.WAIT_INIT

    def receive(self, ftype: FrameType, payload: bytes, *, now_ms: int) -> list[bytes]:
        self._now_ms = now_ms
        return super().receive(ftype, payload, now_ms=now_ms)

    def _on_init(self, payload: bytes, th: bytes) -> list[bytes]:
        Init.decode(payload)
        self.state = State.WAIT_CLIENT_HELLO
        return [self._emit(FrameType.SERVER_HELLO, ServerHello(self._nonce, self._now_ms).encode())]

    def _on_client_hello(self, payload: bytes, th: bytes) -> list[bytes]:
        self._hello = ClientHello.decode(payload)
        self._psk = self._keyring.get(self._hello.key_id)
        self.state = State.WAIT_CLIENT_AUTH
        return []

    def _on_client_auth(self, payload: bytes, th: bytes) -> list[bytes]:
        msg = MacOnly.decode(payload)
        assert self._hello is not None
        # Same error, same work, for an unknown key id and a wrong MAC.
        key = self._psk.client_auth if self._psk is not None else bytes(32)
        try:
            ks.verify_mac(key=key, label="client auth", data=th, tag=msg.mac)
            if self._psk is None:
                raise ValueError
        except ValueError:
            raise AuthError(AUTH_FAILED) from None
        skew = self._hello.time_ms - self._now_ms
        if abs(skew) > self._window_ms:
            raise ClockSkewError(skew_ms=skew, window_ms=self._window_ms)
        self._replay.check_and_add(self._hello.nonce, now_ms=self._now_ms)
        assert self._psk is not None
        tag = ks.mac(key=self._psk.server_auth, label="server auth", data=self.transcript_hash)
        self.state = State.WAIT_KEY_NEGOTIATION
        return [self._emit(FrameType.SERVER_AUTH, MacOnly(tag).encode())]

    def _on_key_negotiation(self, payload: bytes, th: bytes) -> list[bytes]:
        msg = KeyShare.decode(payload)
        assert self._psk is not None
        try:
            ks.verify_mac(
                key=self._psk.client_auth,
                label="client key share",
                data=th + msg.public,
                tag=msg.mac,
            )
        except ValueError:
            raise AuthError(AUTH_FAILED) from None
        eph = _private_key(self._eph_raw)
        self._eph_raw = None
        shared = x25519_shared(eph, msg.public)
        pub = _public_bytes(eph)
        th_now = self.transcript_hash
        master = ks.derive_master(
            early=self._psk.early, shared=shared, transcript_hash=th_now, eph_s=pub
        )
        session = ks.derive_session_keys(master=master)
        tag = ks.mac(key=session.server_finished, label="server finished", data=th_now + pub)
        self.session = session
        self.state = State.ESTABLISHED
        return [self._emit(FrameType.KEY_CONFIRMATION, KeyShare(pub, tag).encode())]

    _table = {
        (State.WAIT_INIT, FrameType.INIT): _on_init,
        (State.WAIT_CLIENT_HELLO, FrameType.CLIENT_HELLO): _on_client_hello,
        (State.WAIT_CLIENT_AUTH, FrameType.CLIENT_AUTH): _on_client_auth,
        (State.WAIT_KEY_NEGOTIATION, FrameType.KEY_NEGOTIATION): _on_key_negotiation,
    }


def keyring_for(psks: list[bytes]) -> dict[bytes, ks.PskKeys]:
    """Key id -> derived PSK keys, for a receiver that accepts any of ``psks``."""
    ring: dict[bytes, ks.PskKeys] = {}
    for psk in psks:
        keys = ks.derive_psk_keys(psk=psk)
        ring[keys.key_id] = keys
    return ring
