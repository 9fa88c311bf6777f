"""The coordinator's cluster port: helpers on other hosts whose workers join its data phase.

(A receiver's port, ``role="recv"``, is the same machinery driven by ``recv_cluster``: see
there; what follows is the sender's use.)

Theory of operation
-------------------
With ``SendOptions.cluster`` a ``send()`` binds one ``ClusterPort`` for its whole run (so
helpers stay across reconnects): a ZeroMQ ROUTER made a CurveZMQ server with keys derived from
the PSK, behind the ZAP handler of ``stxpar.cluster_auth`` (a helper proves it holds the PSK
before it is heard at all). A helper (``stx worker --join``, ``stxpar.helper``) says ``Join``
(its host name and how many worker processes it offers) and is welcomed as a sender's helper.

When a data phase starts (``begin``) every helper gets the session's layout file
(``LayoutPart``s) and an ``Assign`` of global worker slots; each slot is a ``RemoteWorker``
under the session's ``Supervisor`` and a worker of its ``Scheduler``, like a local one. The
helper starts the ordinary sender workers on its host and relays: their requests come here as
``Up`` (the worker's own encoded ``Hello``/``Get``) and are answered with ``Down``, their
reports come as ``Report``. A helper is only served for its own slots, so it only ever
receives the ``Setup`` (the stream secret) of its own streams. A helper that joins during a
data phase is put to work at once; one that refuses (it cannot see the files), says ``Bye``,
breaks the protocol, cannot be sent to, or is silent for ``HELPER_TIMEOUT`` is put aside: its
workers count as exited (status 1), and the data phase requeues their blocks. ``close``
releases every helper (``Release``).

The port is driven by its owner's thread (``pump``): the data phase polls ``router`` with its
other sockets; ``RemoteWorker.wait`` pumps while it waits for a worker's ``Exited``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from . import cluster_auth as ca
from .errors import ProtocolError, StxError, UsageError
from .messages import (
    CLUSTER_UP,
    LAYOUT_PART,
    SENDER_REPORTS,
    SENDER_REQUESTS,
    Assign,
    Bye,
    Done,
    Down,
    Exited,
    HelperBeat,
    Join,
    LayoutPart,
    Message,
    Offered,
    Refuse,
    Release,
    Report,
    Stop,
    Up,
    Welcome,
    decode,
    decode_cluster,
    encode,
)
from .netio import parse_hostport
from .wire import MAX_STREAMS

#: The cluster protocol's version (``Join.version``).
CLUSTER_VERSION = 1
#: Seconds between a helper's beats.
BEAT_S = 0.5
#: Seconds a helper may stay silent (no beat, no message) before it counts as gone.
HELPER_TIMEOUT = 5.0
#: ZeroMQ heartbeats on the cluster connections (ms), as on the local channel.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 10_000
#: Messages handled per ``pump`` call at most (a flood must not starve the data phase).
PUMP_BATCH = 1000
#: Messages queued for one helper before it counts as not reading (a layout of
#: ``layout.MAX_LAYOUT`` bytes is 2048 parts).
SNDHWM = 4096
#: The longest host name or address a helper may give.
MAX_NAME = 255

#: A reply route to a remote worker: (helper identity on the ROUTER, worker identity on the
#: helper's own ROUTER).
Route = tuple[bytes, bytes]
EventFn = Callable[[str, dict[str, Any]], None]


class Phase(Protocol):
    """What the port needs of a data phase."""

    def adopt(self, helper: Helper) -> None:
        """Give ``helper`` work now (slots, ``ClusterPort.assign``)."""

    def remote_request(self, route: Route, msg: Message, now: float) -> None: ...

    def remote_report(self, msg: Message, now: float) -> None: ...


class RecvPhase(Protocol):
    """What the port needs of a receiver's cluster (``recv_cluster.RecvCluster``)."""

    def adopt(self, helper: Helper) -> None: ...

    def helper_message(self, helper: Helper, msg: Message, now: float) -> None: ...

    def helper_left(self, helper: Helper) -> None: ...


@dataclass(eq=False)
class Helper:
    """One joined helper."""

    identity: bytes
    host: str
    workers: int
    data_listen: str
    last_heard: float
    #: "joined", "refused" (cannot serve this run), "gone" (left, died, broke the protocol)
    state: str = "joined"
    #: this session's slots, and the exit status of those whose worker exited
    slots: set[int] = field(default_factory=set)
    exits: dict[int, int] = field(default_factory=dict)
    layout_sent: bool = False

    @property
    def usable(self) -> bool:
        return self.state == "joined"


class RemoteWorker:
    """A ``supervisor.WorkerHandle`` for a worker process on a helper's host."""

    def __init__(self, slot: int, helper: Helper, port: ClusterPort) -> None:
        self.slot = slot
        self.helper = helper
        self.port = port
        self.killed = False

    def exit_status(self) -> int | None:
        got = self.helper.exits.get(self.slot)
        if got is not None:
            return got
        if self.killed:
            return -9
        return None if self.helper.usable else 1

    def terminate(self) -> None:
        if self.exit_status() is None:
            self.port.stop(self.helper, (self.slot,))

    def kill(self) -> None:
        self.terminate()
        self.killed = True

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.exit_status()
            if status is not None:
                return status
            left = 0.05 if end is None else min(0.05, end - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"remote sender worker {self.slot} still runs")
            self.port.pump(left)


def _endpoint(host: str, port: int) -> str:
    host = "*" if host in ("", "0.0.0.0") else host
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class ClusterPort:
    """The coordinator's end of the cluster channel: bind, ZAP, the helpers, relaying."""

    def __init__(
        self, address: str, *, psk: bytes, on_event: EventFn | None = None, role: str = "send"
    ) -> None:
        host, port = parse_hostport(address)
        self.on_event = on_event
        #: "send": a sender's helpers (``phase``); "recv": a receiver's (``recv_phase``)
        self.role = role
        self.recv_phase: RecvPhase | None = None
        self.helpers: dict[bytes, Helper] = {}
        self.phase: Phase | None = None
        self.layout = b""
        self._bound = self.address = ""
        self.ctx = zmq.Context()
        keys = ca.derive_cluster_keys(psk=psk)
        self.router = ca.secure_server(self.ctx.socket(zmq.ROUTER), keys=keys)
        r = self.router
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)
        r.setsockopt(zmq.SNDHWM, SNDHWM)
        r.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        r.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        r.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        if ":" in host:
            r.setsockopt(zmq.IPV6, 1)
        self.auth = ca.ZapAuthenticator(self.ctx, keys=keys, watch=r)
        try:
            self.auth.start()
            r.bind(_endpoint(host, port))
        except (zmq.ZMQError, StxError) as exc:
            self.close()
            raise UsageError(f"cannot listen for helpers on {address}: {exc}") from None
        bound = r.getsockopt(zmq.LAST_ENDPOINT)
        self._bound = bound.decode() if isinstance(bound, bytes) else str(bound)
        self.address = self._bound.removeprefix("tcp://")
        self._event("cluster_listening", address=self.address)

    # ------------------------------------------------------------ membership

    def _event(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, fields)

    def remote_workers(self) -> int:
        """Worker processes offered by the helpers that can take work."""
        return sum(h.workers for h in self.helpers.values() if h.usable)

    def wait_workers(self, want: int, wait_s: float) -> int:
        """Pump until helpers offer ``want`` worker processes or ``wait_s`` passed; how many
        they offer then."""
        end = time.monotonic() + wait_s
        while self.remote_workers() < want:
            left = end - time.monotonic()
            if left <= 0:
                break
            self.pump(min(left, 0.1))
        return self.remote_workers()

    def _put_aside(self, helper: Helper, state: str, why: str) -> None:
        if not helper.usable:
            return
        helper.state = state
        self._event("helper_left", host=helper.host, workers=helper.workers, reason=why)
        if self.recv_phase is not None:
            self.recv_phase.helper_left(helper)

    # ------------------------------------------------------------ sessions

    def begin(self, phase: Phase, layout: bytes) -> None:
        """A data phase starts: every usable helper is given work (``phase.adopt``)."""
        self.pump(0)  # what the helpers said meanwhile (who left, who is still there)
        self.phase, self.layout = phase, layout
        for h in list(self.helpers.values()):
            h.slots.clear()
            h.exits.clear()
            h.layout_sent = False
            if h.usable:
                phase.adopt(h)

    def end(self) -> None:
        self.phase = None

    def assign(self, helper: Helper, slots: tuple[int, ...]) -> None:
        """Send ``helper`` the session's layout (once a session) and these slots."""
        helper.slots.update(slots)
        if not helper.layout_sent:
            data = self.layout
            parts = max(1, -(-len(data) // LAYOUT_PART))
            for i in range(parts):
                chunk = data[i * LAYOUT_PART : (i + 1) * LAYOUT_PART]
                self._send(helper, LayoutPart(i, i == parts - 1, chunk))
            helper.layout_sent = True
        self._send(helper, Assign(slots))

    def down(self, route: Route, msg: Message) -> None:
        helper = self.helpers.get(route[0])
        if helper is not None:
            self._send(helper, Down(route[1], encode(msg)))

    def stop(self, helper: Helper, slots: tuple[int, ...]) -> None:
        self._send(helper, Stop(slots))

    def host_of(self, route: Route) -> str:
        helper = self.helpers.get(route[0])
        return helper.host if helper is not None else "?"

    def send(self, helper: Helper, msg: Message) -> None:
        """Send ``msg`` to ``helper`` (put aside when it cannot be reached)."""
        self._send(helper, msg)

    def _send(self, helper: Helper, msg: Message) -> None:
        if helper.state == "gone":
            return
        try:
            self.router.send_multipart([helper.identity, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: disconnected (ROUTER_MANDATORY); EAGAIN: it stopped reading.
            self._put_aside(helper, "gone", f"cannot reach it ({exc.strerror})")

    # ------------------------------------------------------------ input

    def pump(self, timeout_s: float = 0.0) -> None:
        """Handle what arrived (waiting up to ``timeout_s`` for the first), then look for
        silent helpers."""
        router = self.router
        if router.poll(max(0, int(timeout_s * 1000))):
            now = time.monotonic()
            for _ in range(PUMP_BATCH):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) == 2:
                    self._dispatch(frames[0], frames[1], now)
            else:
                return  # more is waiting: silence is judged once it is read
        self.check(time.monotonic())

    def check(self, now: float) -> None:
        for h in self.helpers.values():
            if h.usable and now - h.last_heard > HELPER_TIMEOUT:
                self._put_aside(h, "gone", f"silent for {now - h.last_heard:.0f} s")

    def _dispatch(self, identity: bytes, body: bytes, now: float) -> None:
        helper = self.helpers.get(identity)
        try:
            msg = decode_cluster(body, expect=CLUSTER_UP)
        except ProtocolError as exc:
            if helper is not None:
                self._put_aside(helper, "gone", f"protocol error: {exc}")
            return
        if helper is None:
            if type(msg) is Join:
                self._join(identity, msg, now)
            return  # anything else from an unknown peer: a helper already put aside
        helper.last_heard = now
        if helper.state == "gone":
            return
        kind = type(msg)
        try:
            if self.role == "recv" and kind in (Report, Offered, Up, Exited):
                if self.recv_phase is not None and kind is not Up and kind is not Exited:
                    self.recv_phase.helper_message(helper, msg, now)
            elif kind is Up:
                assert isinstance(msg, Up)
                self._up(helper, msg, now)
            elif kind is Report:
                assert isinstance(msg, Report)
                report = decode(msg.body, expect=SENDER_REPORTS)
                if report.slot in helper.slots and self.phase is not None:  # type: ignore[attr-defined]
                    self.phase.remote_report(report, now)
            elif kind is Exited:
                assert isinstance(msg, Exited)
                if msg.slot in helper.slots:
                    helper.exits[msg.slot] = msg.status
            elif kind is Refuse:
                assert isinstance(msg, Refuse)
                self._put_aside(helper, "refused", msg.reason[:500])
            elif kind is Bye:
                self._put_aside(helper, "gone", "it left")
            elif kind is Join:
                raise ProtocolError("a second Join")
            else:
                assert kind is HelperBeat
        except ProtocolError as exc:
            self._put_aside(helper, "gone", f"protocol error: {exc}")

    def _join(self, identity: bytes, msg: Join, now: float) -> None:
        if msg.version != CLUSTER_VERSION:
            return  # it hears nothing and gives up on its own
        if not 1 <= msg.workers <= MAX_STREAMS or len(msg.host) > MAX_NAME:
            return
        if len(self.helpers) >= 4 * MAX_STREAMS:
            return
        host = "".join(c if c.isprintable() else "?" for c in msg.host) or "?"
        helper = Helper(identity, host, msg.workers, msg.data_listen[:MAX_NAME], now)
        self.helpers[identity] = helper
        self._send(helper, Welcome(self.role))
        self._event("helper_joined", host=host, workers=msg.workers)
        if self.recv_phase is not None and helper.usable:
            self.recv_phase.adopt(helper)
        if self.phase is not None and helper.usable:
            self.phase.adopt(helper)

    def _up(self, helper: Helper, msg: Up, now: float) -> None:
        request = decode(msg.body, expect=SENDER_REQUESTS)
        slot: int = request.slot  # type: ignore[attr-defined]
        if slot not in helper.slots or self.phase is None:
            # not one of its workers of this session: nothing (no Setup, no secret) for it
            self._send(helper, Down(msg.ident, encode(Done())))
            return
        self.phase.remote_request((helper.identity, msg.ident), request, now)

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        """Release every helper and stop listening."""
        if not self.router.closed:
            # (Not unbound first: libzmq's unbind drops the connections it accepted, and the
            # Releases with them.)
            for h in self.helpers.values():
                if h.state != "gone":
                    with contextlib.suppress(zmq.ZMQError):
                        self.router.send_multipart([h.identity, encode(Release())], zmq.NOBLOCK)
        self.auth.stop()
        if not self.router.closed:
            self.router.close(linger=500)  # the Releases go out
        self.ctx.term()


@dataclass
class Tally:
    """Who sent: worker processes that took a stream, per host (a run's sessions summed)."""

    hosts: dict[str, int] = field(default_factory=dict)
    remote: int = 0
    helpers: set[bytes] = field(default_factory=set)

    def count(self, host: str, *, helper: bytes | None = None) -> None:
        self.hosts[host] = self.hosts.get(host, 0) + 1
        if helper is not None:
            self.remote += 1
            self.helpers.add(helper)


def local_host() -> str:
    """This host's name, as the results show it."""
    return socket.gethostname() or "localhost"
