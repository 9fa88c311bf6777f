"""The coordinator/worker channel: typed messages over ZeroMQ, one place for its sockets' options.

Theory of operation
-------------------
A sender coordinator and its workers talk over two ZeroMQ socket pairs: the workers' requests
(``Hello``, ``Get``) go to the coordinator's ROUTER from each worker's DEALER and are answered
there (``Setup``, ``Blocks``, ``Done``); their reports (``Acked``, ``Sent``, ``Retransmit``,
``WorkerError``, ``Alive``) go to the coordinator's PULL from each worker's PUSH. Messages are
``stxpar.messages`` dataclasses; every receive decodes with the kinds that socket may carry
(``expect``), so anything else is a ProtocolError at this boundary.

Today the endpoints are ``ipc://`` sockets in a private 0700 directory (``Endpoints``): the
stream secrets in ``Setup`` never touch the network. Liveness both ways: workers send
``Alive`` every ``BEAT_INTERVAL`` seconds on their report socket, and ZeroMQ's own heartbeats
on the request connection (``ZMQ_HEARTBEAT_*``) let a worker notice a coordinator that is gone
or hung (``WorkerLink.coordinator_gone``, through a socket monitor). To carry the channel across
a network later (CurveZMQ, a ZAP check), only ``_configure`` and ``Endpoints`` change; the
messages do not. The receiver's workers report over the same kind of channel
(``report_pull`` / ``report_push``: ``Landed``, ``StreamFailed``, ``StreamClosed``); their
streams arrive with the socket itself (SCM_RIGHTS), which only a local channel can carry.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeVar

import zmq

from . import ipc
from .messages import (
    MAX_MESSAGE,
    SENDER_REPLIES,
    SENDER_REPORTS,
    SENDER_REQUESTS,
    Message,
    decode,
    encode,
)

M = TypeVar("M", bound=Message)

#: Seconds between a worker's ``Alive`` messages.
BEAT_INTERVAL = 0.5
#: ZeroMQ heartbeats on the request connection (ms): a PING this often, and the connection is
#: dropped when nothing came back for the timeout (a coordinator that is gone or hung).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 10_000


def _configure(sock: zmq.Socket, *, linger_ms: int = 0) -> zmq.Socket:
    """Every channel socket's options: size cap, linger, reconnect, heartbeats."""
    ipc.configure(sock, linger_ms=linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
    if sock.type in (zmq.DEALER, zmq.ROUTER):
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    return sock


@dataclass(frozen=True)
class Endpoints:
    """Where a coordinator's workers find it: a private directory and two endpoints in it."""

    workdir: str
    requests: str
    reports: str

    @classmethod
    def private(cls, prefix: str) -> Endpoints:
        workdir = ipc.private_dir(prefix)
        return cls(workdir, f"ipc://{workdir}/ctl", f"ipc://{workdir}/report")

    def remove(self) -> None:
        ipc.remove_dir(self.workdir)


class CoordinatorLink:
    """The coordinator's side: a ROUTER for requests, a PULL for reports (both bound)."""

    def __init__(self, ctx: zmq.Context, endpoints: Endpoints) -> None:
        self.router = _configure(ctx.socket(zmq.ROUTER))
        self.pull = _configure(ctx.socket(zmq.PULL))
        self.router.bind(endpoints.requests)
        self.pull.bind(endpoints.reports)

    def request(self) -> tuple[bytes, Message]:
        """The next request (``Hello``, ``Get``) and who sent it; ProtocolError if malformed."""
        identity, body = self.router.recv_multipart()
        return identity, decode(body, expect=SENDER_REQUESTS)

    def reply(self, identity: bytes, msg: Message, *, block: bool = True) -> None:
        """Answer the worker ``identity``; with ``block=False`` a worker that is gone is
        skipped (ZMQError)."""
        self.router.send_multipart([identity, encode(msg)], 0 if block else zmq.NOBLOCK)

    def report(self) -> Message:
        """The next report; ProtocolError if malformed."""
        return decode(self.pull.recv(), expect=SENDER_REPORTS)


class WorkerLink:
    """A worker's side: a DEALER for requests, a PUSH for reports (both connected)."""

    def __init__(self, ctx: zmq.Context, requests: str, reports: str) -> None:
        self.ctx = ctx
        self.reports_endpoint = reports
        self.dealer = _configure(ctx.socket(zmq.DEALER))
        self.monitor = self.dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.dealer.connect(requests)
        self.push = self.report_socket()

    def report_socket(self) -> zmq.Socket:
        """A new PUSH to the coordinator (one per thread: a ZeroMQ socket is not shared)."""
        sock = _configure(self.ctx.socket(zmq.PUSH), linger_ms=2000)
        sock.connect(self.reports_endpoint)
        return sock

    def ask(self, msg: Message) -> None:
        self.dealer.send(encode(msg))

    def answer(self, timeout_ms: int) -> Message | None:
        """The coordinator's next answer, or None after ``timeout_ms``."""
        if not self.dealer.poll(timeout_ms):
            return None
        return decode(self.dealer.recv(), expect=SENDER_REPLIES)

    def coordinator_gone(self) -> bool:
        """Whether the request connection dropped: the coordinator exited, or stopped
        answering ZeroMQ's heartbeats for ``HEARTBEAT_TIMEOUT_MS`` (called from one thread)."""
        while self.monitor.poll(0):
            # [event (u16) + value (u32), endpoint] (zmq_socket_monitor); parsed here, since
            # zmq.utils.monitor would import asyncio into every worker.
            frames = self.monitor.recv_multipart()
            if struct.unpack_from("=H", frames[0])[0] == zmq.EVENT_DISCONNECTED:
                return True
        return False


def report_pull(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A coordinator's PULL for its workers' reports, bound at ``endpoint`` (the receiver's
    report channel; the sender's is ``CoordinatorLink.pull``)."""
    sock = _configure(ctx.socket(zmq.PULL))
    sock.bind(endpoint)
    return sock


def report_push(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A worker's PUSH to its coordinator's reports, connected to ``endpoint``."""
    sock = _configure(ctx.socket(zmq.PUSH), linger_ms=2000)
    sock.connect(endpoint)
    return sock


def send(sock: zmq.Socket, msg: Message, *, block: bool = True) -> None:
    """Send ``msg`` on a report socket."""
    sock.send(encode(msg), 0 if block else zmq.NOBLOCK)
