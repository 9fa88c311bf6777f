"""CurveZMQ on the cluster port: keys from the PSK, a ZAP check, and how a helper learns it failed.

Theory of operation
-------------------
A coordinator's cluster port (a ZeroMQ ROUTER) is where helpers on other hosts (``stx worker
--join``, DEALER) ask for work and receive stream secrets, so the channel is authenticated and
encrypted with CurveZMQ (RFC 26). Both long-term CURVE key pairs come from the PSK::

    prk         = HKDF-Extract(salt="stx1 cluster", ikm=PSK)
    coordinator = HKDF-Expand(prk, "stx1 cluster coordinator curve key", 32)  # X25519 secret
    helper      = HKDF-Expand(prk, "stx1 cluster helper curve key", 32)       # X25519 secret

(SHA-256, ``keyschedule.hkdf_extract`` / ``hkdf_expand``; the public keys are ZeroMQ's
``curve_public`` of each secret; everything is Z85 as ZeroMQ takes it.) Only a holder of the PSK
knows the coordinator's public key and the helper's secret key, so:

* a helper proves it holds the PSK by completing the handshake: the coordinator's ZAP handler
  (``ZapAuthenticator``, RFC 27, in the coordinator's process on the ROUTER's context) answers
  200 only for mechanism CURVE with the derived helper public key, 400 to anything else, and
  ``ZAP_ENFORCE_DOMAIN`` makes the ROUTER refuse everyone when no handler answers (libzmq 4.3
  otherwise lets every CURVE client in when no handler is bound: checked by experiment);
* the coordinator proves it holds the PSK by decrypting the helper's HELLO;
* CurveZMQ's per-connection short-term keys make the traffic unreadable even to someone who
  recorded it and learns the PSK later (forward secrecy); the long-term keys only authenticate.

Before the handshake a peer can send only the ZMTP greeting and handshake commands: libzmq
drops a bad greeting or command at once, ``MAXMSGSIZE`` bounds any frame it would buffer (a
header claiming 2**40 bytes is a dropped connection, not an allocation; see
``MAX_CLUSTER_MESSAGE`` for why it is small), and ``HANDSHAKE_IVL`` bounds how long a
silent peer holds a connection. Garbage that libzmq drops in its ZMTP layer (a bad greeting,
a frame over the cap) raises no monitor event, so ``Refusals`` does not count it.

What libzmq 4.3.5 tells each side (socket monitor events, observed on 127.0.0.1)
------------------------------------------------------------------------------------
========================================= ===============================================
case                                      events
========================================= ===============================================
right PSK                                 both: ``HANDSHAKE_SUCCEEDED``
wrong PSK (the helper derives the wrong   coordinator: ``HANDSHAKE_FAILED_PROTOCOL``
coordinator public key, so the            value ``PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC``,
coordinator cannot decrypt its HELLO;     then ``DISCONNECTED``; the ZAP handler is never
the ZAP handler is never asked)           asked. Helper: ``HANDSHAKE_FAILED_NO_DETAIL``
                                          (errno EPIPE or ECONNRESET), ``DISCONNECTED``,
                                          and ZeroMQ reconnects and fails again, forever
right coordinator key, wrong helper key   both: ``HANDSHAKE_FAILED_AUTH`` value 400 (the
(ZAP refuses)                             ZAP status code; CurveZMQ's ERROR command)
a plain (NULL mechanism) peer             both: ``HANDSHAKE_FAILED_PROTOCOL`` value
                                          ``PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH``
a peer that accepts and closes at once    helper: ``HANDSHAKE_FAILED_NO_DETAIL`` (EPIPE,
                                          ECONNRESET), as for a wrong PSK
a peer that accepts and stays silent      helper: ``HANDSHAKE_FAILED_NO_DETAIL`` (EAGAIN)
                                          after ``HANDSHAKE_IVL``
========================================= ===============================================

So a helper with the wrong PSK is never told so: the coordinator just closes the connection
mid-handshake. ``wait_handshake`` therefore reads ``DROPS_FOR_AUTH`` such drops in a row (a
TCP connection made, then closed by the peer before the handshake finished, without a
protocol error or a timeout) as the coordinator refusing the helper's key: an ``AuthError``
within about half a second instead of ZeroMQ reconnecting forever. The one thing this cannot
tell apart is a non-ZeroMQ service on that port that closes every connection at once; the
message says what is most likely (``wrong --psk-file?``). ``HANDSHAKE_FAILED_AUTH`` and a
cryptographic protocol error are an ``AuthError`` at once; anything else, or nothing within
the time given, is a ``ConnectError``.

The coordinator counts what it refused (``ZapAuthenticator.refusals``): the ZAP handler sees
the wrong helper keys, and, given the ROUTER to ``watch``, a monitor on it sees the
handshakes that failed before ZAP (the wrong PSKs, plain peers, garbage).

No key material appears in a repr, a log line or an exception: only public keys are shown.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import itertools
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import zmq
from zmq.utils import z85

from .errors import AuthError, ConnectError, LocalError, UsageError
from .keyschedule import KEY_LEN, hkdf_expand, hkdf_extract
from .psk import MIN_KEY_BYTES

SALT = b"stx1 cluster"
COORDINATOR_LABEL = b"stx1 cluster coordinator curve key"
HELPER_LABEL = b"stx1 cluster helper curve key"

#: Largest message on the cluster channel (ZeroMQ's MAXMSGSIZE on both ends), 1 MiB. It is
#: also what one connection can make the coordinator hold *before* it authenticated: libzmq
#: buffers a whole handshake command before the CURVE mechanism looks at it (measured, libzmq
#: 4.3.5: four connections each sending a greeting and a 12 MiB command grew the coordinator by
#: 48 MiB under a 16 MiB cap, by nothing under a 4 MiB one, where they were dropped). ZeroMQ
#: has no limit on pending connections, so the pre-authentication memory is about descriptors
#: x this cap, held at most ``HANDSHAKE_IVL_MS``: hence far below the local channel's 16 MiB
#: (``messages.MAX_MESSAGE``). A peer that sends more is disconnected, so the cluster channel's
#: messages must be kept below it (a batch of 32-byte digests: about 30,000 of them).
MAX_CLUSTER_MESSAGE = 1 << 20
#: Milliseconds a connection may take to finish the CURVE handshake (both sides; two round
#: trips and a ZAP check): a silent or slow peer, and what it made the coordinator buffer, is
#: dropped after this.
HANDSHAKE_IVL_MS = 5_000
#: The ZAP domain of the cluster port (RFC 27); the ZAP handler answers only for it.
ZAP_DOMAIN = b"stx-cluster"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: Connections the coordinator closed mid-handshake, in a row, that a helper takes for a
#: refusal of its key (see the table above; ZeroMQ reconnects about every 0.1 s).
DROPS_FOR_AUTH = 3
#: How often the ZAP thread looks whether it is asked to stop (s): a coordinator's last step
#: (``stop``) waits for it.
_POLL_S = 0.02

_CRYPTO_ERRORS = frozenset(
    {zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC, zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE}
)
#: errno values of a handshake that ran out of time (``HANDSHAKE_IVL``), not a dropped one.
_TIMEOUT_ERRNOS = frozenset({errno.EAGAIN, errno.ETIMEDOUT})
_CLIENT_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_SERVER_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_monitor_ids = itertools.count()


# ---------------------------------------------------------------- keys


@dataclass(frozen=True, repr=False)
class ClusterKeys:
    """The two long-term CURVE key pairs of a cluster, Z85-encoded (40 bytes each)."""

    coordinator_public: bytes
    coordinator_secret: bytes
    helper_public: bytes
    helper_secret: bytes

    def __repr__(self) -> str:
        return (
            f"ClusterKeys(coordinator_public={self.coordinator_public.decode()}, "
            f"helper_public={self.helper_public.decode()})"
        )


def derive_cluster_keys(*, psk: bytes) -> ClusterKeys:
    """Both CURVE key pairs of the cluster of ``psk`` (deterministic; see the module doc)."""
    if len(psk) < MIN_KEY_BYTES:
        raise ValueError(f"a PSK has at least {MIN_KEY_BYTES} bytes")
    prk = hkdf_extract(salt=SALT, ikm=psk)
    coordinator = z85.encode(hkdf_expand(prk=prk, info=COORDINATOR_LABEL, length=KEY_LEN))
    helper = z85.encode(hkdf_expand(prk=prk, info=HELPER_LABEL, length=KEY_LEN))
    return ClusterKeys(
        coordinator_public=zmq.curve_public(coordinator),
        coordinator_secret=coordinator,
        helper_public=zmq.curve_public(helper),
        helper_secret=helper,
    )


# ---------------------------------------------------------------- sockets


def _common(sock: zmq.Socket, max_message: int) -> None:
    if max_message <= 0:
        raise ValueError("max_message must be positive")
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)


def secure_server(
    sock: zmq.Socket, *, keys: ClusterKeys, max_message: int = MAX_CLUSTER_MESSAGE
) -> zmq.Socket:
    """Make the coordinator's ROUTER a CURVE server that admits only what the ZAP handler
    (``ZapAuthenticator``, on the same context) accepts, and nothing when none runs. Call it
    before ``bind``."""
    _common(sock, max_message)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.coordinator_secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    return sock


def secure_client(
    sock: zmq.Socket, *, keys: ClusterKeys, max_message: int = MAX_CLUSTER_MESSAGE
) -> zmq.Socket:
    """Make a helper's DEALER a CURVE client with the helper key pair, expecting the
    coordinator's public key. Call it before ``connect`` (or ``wait_handshake``)."""
    _common(sock, max_message)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.coordinator_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.helper_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.helper_secret)
    return sock


def _monitor(sock: zmq.Socket, events: int) -> tuple[str, zmq.Socket]:
    """Attach a monitor to ``sock`` (replacing any other) and a PAIR reading it, in this thread."""
    addr = f"inproc://stx-cluster-monitor-{next(_monitor_ids)}"
    sock.monitor(addr, events)
    pair = sock.context.socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(addr)
    return addr, pair


def _event(frames: list[bytes]) -> tuple[int, int] | None:
    """(event, value) of a monitor message: [u16 event + u32 value, endpoint]. Parsed here,
    since zmq.utils.monitor would import asyncio into every helper (as ``channel`` does)."""
    if len(frames) != 2 or len(frames[0]) != 6:
        return None
    event, value = struct.unpack("=HI", frames[0])
    return event, value


def _peer(endpoint: str) -> str:
    return endpoint.removeprefix("tcp://")


def wait_handshake(sock: zmq.Socket, *, endpoint: str, timeout_s: float) -> None:
    """Connect ``sock`` (made a client by ``secure_client``) to the coordinator at ``endpoint``
    and return once the CURVE handshake succeeded.

    ``AuthError`` if the coordinator refused this helper's key (or held another one), at once
    or after ``DROPS_FOR_AUTH`` connections closed mid-handshake; ``ConnectError`` if the
    handshake failed otherwise or did not complete within ``timeout_s``. After an error, close
    the socket: until then libzmq keeps reconnecting with the refused key (4.3.5 ignores a
    ``disconnect`` of an endpoint it is reconnecting to, libzmq#4052, and the option that
    would stop it, ``RECONNECT_STOP``, is draft API). The monitor this uses is removed before
    returning: the caller may attach its own afterwards.
    """
    peer = _peer(endpoint)
    _, monitor = _monitor(sock, _CLIENT_EVENTS)
    try:
        sock.connect(endpoint)
        _await_handshake(monitor, peer=peer, timeout_s=timeout_s)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EINVAL:
            raise UsageError(f"not a coordinator address: {peer}") from None
        raise ConnectError(f"cannot connect to the coordinator at {peer}: {exc}") from None
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)


def _await_handshake(monitor: zmq.Socket, *, peer: str, timeout_s: float) -> None:
    refused = f"the coordinator at {peer} refused this helper's key (wrong --psk-file?)"
    deadline = time.monotonic() + timeout_s
    connected = False
    drops = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if connected:
                raise ConnectError(
                    f"no CURVE handshake with the coordinator at {peer} within {timeout_s:g} s"
                )
            raise ConnectError(f"could not reach the coordinator at {peer} within {timeout_s:g} s")
        if not monitor.poll(max(1, int(left * 1000))):
            continue
        parsed = _event(monitor.recv_multipart())
        if parsed is None:
            continue
        event, value = parsed
        if event == zmq.EVENT_CONNECTED:
            connected = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise AuthError(refused)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value in _CRYPTO_ERRORS:
                raise AuthError(
                    f"the coordinator at {peer} does not hold this cluster's key (wrong --psk-file?)"
                )
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                raise ConnectError(f"{peer} is not a stx cluster port (it does not speak CURVE)")
            raise ConnectError(
                f"{peer} is not a stx cluster port (ZeroMQ handshake error 0x{value:08x})"
            )
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value not in _TIMEOUT_ERRNOS:
            drops += 1
            if drops >= DROPS_FOR_AUTH:
                raise AuthError(refused)


# ---------------------------------------------------------------- the coordinator's ZAP handler


@dataclass(frozen=True)
class Refusals:
    """What a coordinator's cluster port refused so far (connections, not distinct peers)."""

    #: Handshakes with another key: the ZAP handler refused the helper key, or (seen by the
    #: monitor of a watched ROUTER) the helper's HELLO could not be decrypted: another PSK.
    wrong_key: int = 0
    #: Peers without CURVE (NULL or PLAIN mechanism).
    not_curve: int = 0
    #: Anything else: malformed greetings or commands, garbage, handshakes dropped or timed out.
    other: int = 0

    @property
    def total(self) -> int:
        return self.wrong_key + self.not_curve + self.other


class ZapAuthenticator:
    """The coordinator's ZAP handler (RFC 27) for the cluster port, on a thread of its own.

    It binds ``inproc://zeromq.zap.01`` on ``ctx`` (the ROUTER's context; one per context) and
    answers 200 only to a CURVE request in ``ZAP_DOMAIN`` whose client key is the derived helper
    public key, 400 to every other request. With ``watch`` (the ROUTER, configured by
    ``secure_server``), it also monitors that socket's failed handshakes, which never reach ZAP
    (see the module doc); ``watch`` then must not carry another monitor. Bounded: one request
    at a time; what libzmq queues for it is capped by its high-water marks, and an event that
    finds the monitor queue full is dropped (so counts are a lower bound under a flood).

    ``start()`` returns once the handler is bound; ``stop()`` (idempotent) joins the thread and
    must come before the context is terminated and before ``watch`` is closed.
    """

    def __init__(
        self, ctx: zmq.Context, *, keys: ClusterKeys, watch: zmq.Socket | None = None
    ) -> None:
        self._ctx = ctx
        self._helper_key = z85.decode(keys.helper_public)
        self._watch = watch
        self._monitor_addr: str | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"wrong_key": 0, "not_curve": 0, "other": 0}
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    def __enter__(self) -> ZapAuthenticator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def refusals(self) -> Refusals:
        with self._lock:
            return Refusals(**self._counts)

    def start(self) -> None:
        if self._thread is not None:
            return
        if self._watch is not None:
            self._monitor_addr = f"inproc://stx-cluster-monitor-{next(_monitor_ids)}"
            self._watch.monitor(self._monitor_addr, _SERVER_EVENTS)
        self._thread = threading.Thread(target=self._run, name="stx-cluster-zap", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            self._unwatch()
            raise LocalError(self._failure)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._unwatch()

    def _unwatch(self) -> None:
        if self._monitor_addr is not None and self._watch is not None and not self._watch.closed:
            with contextlib.suppress(zmq.ZMQError):
                self._watch.disable_monitor()
        self._monitor_addr = None

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def _run(self) -> None:
        handler = self._ctx.socket(zmq.REP)
        handler.setsockopt(zmq.LINGER, 0)
        monitor: zmq.Socket | None = None
        try:
            try:
                handler.bind(ZAP_ENDPOINT)
            except zmq.ZMQError as exc:
                self._failure = f"cannot serve ZAP for the cluster port: {exc}"
                return
            poller = zmq.Poller()
            poller.register(handler, zmq.POLLIN)
            if self._monitor_addr is not None:
                monitor = self._ctx.socket(zmq.PAIR)
                monitor.setsockopt(zmq.LINGER, 0)
                monitor.connect(self._monitor_addr)
                poller.register(monitor, zmq.POLLIN)
            self._ready.set()
            while not self._stopping.is_set():
                ready = dict(poller.poll(int(_POLL_S * 1000)))
                if handler in ready:
                    handler.send_multipart(self._answer(handler.recv_multipart()))
                if monitor is not None and monitor in ready:
                    self._observe(monitor.recv_multipart())
        except zmq.ContextTerminated:
            pass
        finally:
            self._ready.set()
            handler.close(linger=0)
            if monitor is not None:
                monitor.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request: [version, request id, domain, address, identity,
        mechanism, credentials...] -> [version, request id, status, text, user id, metadata]."""
        request_id = frames[1] if len(frames) > 1 else b""
        if len(frames) < 6 or frames[0] != b"1.0":
            self._count("other")
            return [b"1.0", request_id, b"400", b"malformed ZAP request", b"", b""]
        domain, mechanism, credentials = frames[2], frames[5], frames[6:]
        if domain != ZAP_DOMAIN:
            self._count("other")
            return [b"1.0", request_id, b"400", b"unknown domain", b"", b""]
        if mechanism != b"CURVE":
            self._count("not_curve")
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        if len(credentials) != 1 or not hmac.compare_digest(credentials[0], self._helper_key):
            self._count("wrong_key")
            return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", b"helper", b""]

    def _observe(self, frames: list[bytes]) -> None:
        parsed = _event(frames)
        if parsed is None:
            return
        event, value = parsed
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value in _CRYPTO_ERRORS:
            self._count("wrong_key")
        elif (
            event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        ):
            self._count("not_curve")
        else:
            self._count("other")
