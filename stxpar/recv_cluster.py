"""The receiver coordinator's cluster port: helpers on other hosts that take data streams.

Theory of operation
-------------------
With ``RecvOptions.cluster`` a ``Receiver`` binds a ``cluster.ClusterPort`` in the role
``"recv"`` (the same CurveZMQ channel, ZAP check, message caps and helper bookkeeping as a
sender's) and drives it from one thread of its own (``_run``): every ZeroMQ call on the port
happens there; the control threads hand it what to send through ``_outbox`` and wait on
``_cond`` for answers.

A receiving helper (``stx worker --join ... --data-listen HOST:PORT``) says in its ``Join``
the address its data port is bound to; a helper without a usable one is put aside. For each
admitted session (``plan``, from the session's control thread, after admission and before
METADATA_ACK) the stream ids the session may use (``4 x streams + 64``, as the registry
caps them) are routed round-robin over this host and the live helpers, each weighted by its
worker processes. Every helper that got streams is sent the session's layout
(``SessionLayout``) and one ``StreamOffer``: the stream secrets of its streams only, and the
``StreamJob`` fields (the partial or staging directory by absolute path and inode). It
answers ``Offered`` once it checked that the path is the same inode on its host; a helper
that refuses or does not answer within ``OFFER_WAIT_S`` gets no streams (they come back
here). The routes then go to the sender as a ROUTES frame, just before METADATA_ACK.

A helper's workers report to the helper, which relays each report whole (``Report``); a
report is taken only for a stream whose secret that helper was given (also after the stream
moved on: its worker may still land blocks), and goes to the session as a local worker's would
(``deliver``).

The routes change while a session runs (``routing``: ``grow``, ``redeal``), each change a
new ROUTES (``ControlHandler.reroute``). On them the sender moves every open stream whose id
is now routed elsewhere: it ends it (its unacknowledged blocks are queued again) and opens a
new stream, with an id routed to the new place, in its stead. Two rules keep every id served
in one place at most: the sender opens an id once per session, and a later offer gives a
place the secrets only of ids not known to be used or held elsewhere (``_Plan.taken``: JOINs
the receiver took, ids a helper reported on or holds; of a dropped helper's ids, the ones it
never reported on count as unused); an entry for any other id only says where that stream
moves.

- A helper that joins during a session (``adopt`` -> ``_grow``) is sent the layout and an
  offer of its share of this host's ids nobody used; once it answers ``Offered``, the routes
  give it those ids and its share of the streams open at every place. A helper that refuses
  or does not answer within ``OFFER_WAIT_S`` takes no part in the session.
- A helper that dies (silent for ``cluster.HELPER_TIMEOUT``, or for ``DISCONNECT_SILENCE_S``
  after a connection on the port dropped, or ``Bye``), or that refuses a later offer, is
  dropped from every session (``_drop``): its ids are dealt over this host and the session's
  other helpers, weighted by their workers. Those for this host change at once; those for a
  helper once it accepted the secrets of the ones nobody used (if it does not, they come here).

When a session ends (``cancel``/``cancel_later``) its helpers are told ``RecvCancel`` and
forget its secrets.

Acknowledgements: a helper's worker reports ``Landed`` to the helper before it ACKs a block
to the sender, and the helper forwards it at once, but the worker does not wait for this
coordinator to record it. A block acknowledged whose report is lost (the helper died in
between) is not in the state log: END then finds it missing, the session fails with a
retryable "K blocks are missing at END" and the sender, reconnecting, is shown the true bitmap
and sends it again (docs/protocol.md §8). A local worker that dies between its ACK and its
report is the same case.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import zmq

from .cluster import HELPER_TIMEOUT, ClusterPort, EventFn, Helper
from .errors import ProtocolError
from .keyschedule import SessionKeys
from .messages import (
    LAYOUT_PART,
    MAX_CLUSTER,
    RECEIVER_REPORTS,
    Landed,
    Message,
    Offered,
    RecvCancel,
    Report,
    SessionLayout,
    StreamClosed,
    StreamFailed,
    StreamOffer,
    decode,
)
from .netio import parse_hostport
from .placement import FINISHED_GRACE_S
from .routing import Delta, grow, redeal, round_robin
from .transfer import Transfer
from .wire import MAX_ROUTE_PLACES, MAX_STREAMS, Routes

#: Seconds a session's control thread waits for its helpers' ``Offered``.
OFFER_WAIT_S = 5.0
#: Seconds the port's thread waits on the port per turn (also how soon the outbox is sent).
TURN_S = 0.02
#: After a connection on the port drops, a helper silent this long is taken for the one that
#: went (it beats every ``cluster.BEAT_S``): noticed in about two seconds, not ``HELPER_TIMEOUT``.
DISCONNECT_SILENCE_S = 2.0
#: Stream ids per ``StreamOffer`` at most (its secrets stay well under ``MAX_CLUSTER``).
OFFER_STREAMS = MAX_STREAMS
assert OFFER_STREAMS * 64 < MAX_CLUSTER


class Session(Protocol):
    """What the cluster needs of an admitted session (``control.ControlHandler``)."""

    def reroute(self, routes: Routes) -> None: ...

    def streams_here(self) -> set[int]:
        """The stream ids whose JOIN the receiver's own port took."""


@dataclass
class _Plan:
    """One session's routes: ``table[s]`` is 0 (here) or an index + 1 into ``places``."""

    session: Session
    places: list[Helper]
    table: bytearray
    #: what a later offer to a helper needs: the session's keys, its ``StreamOffer`` without
    #: streams, the layout file
    keys: SessionKeys | None = None
    template: StreamOffer | None = None
    layout: str = ""
    #: the initial offers are answered (``plan`` returned): changes go through ``pending``
    ready: bool = False
    #: helper identity -> stream ids whose secrets it was given (its reports on them count,
    #: also after the stream was moved elsewhere: its worker may still land blocks there)
    granted: dict[bytes, set[int]] = field(default_factory=dict)
    #: helper identity -> stream ids it reported on (the per-host count)
    seen: dict[bytes, set[int]] = field(default_factory=dict)
    #: stream ids a helper reported closed or failed
    closed: set[int] = field(default_factory=set)
    #: helper identity -> Offered answer (True/False), absent while awaited
    answers: dict[bytes, tuple[bool, str]] = field(default_factory=dict)
    #: helper identity -> later offers awaiting its ``Offered``, in order, with their deadline
    pending: dict[bytes, deque[tuple[Delta, float]]] = field(default_factory=dict)

    def routes(self) -> Routes:
        return Routes(tuple(h.data_listen for h in self.places), bytes(self.table))

    def index(self, helper: Helper) -> int:
        """``helper``'s place in the table (0: not one of this session's places)."""
        return self.places.index(helper) + 1 if helper in self.places else 0

    def streams_of(self, helper: Helper) -> set[int]:
        k = self.index(helper)
        if not k:
            return set()
        return {s for s, v in enumerate(self.table) if v == k}

    def open_at(self, helper: Helper) -> set[int]:
        """The streams ``helper`` reported on and not closed: open there, as far as known."""
        return self.seen.get(helper.identity, set()) - self.closed

    def taken(self, but: Helper | None = None) -> set[int]:
        """Stream ids that may have been used, or whose secret a helper holds (but ``but``):
        JOINs the receiver took, ids a helper reported on or was given. A later offer gives
        no other place these ids' secrets."""
        out = self.session.streams_here()
        for ids in self.seen.values():
            out |= ids
        for identity, ids in self.granted.items():
            if but is None or identity != but.identity:
                out |= ids
        return out


def usable_address(text: str) -> bool:
    """Whether a helper's data address can be given to a sender (a host, not a wildcard;
    a port)."""
    try:
        host, port = parse_hostport(text)
    except Exception:
        return False
    return 0 < port and host not in ("", "0.0.0.0", "::", "*")


class RecvCluster:
    """A receiver's helpers: routes, offers, relayed reports (see the module's docstring)."""

    def __init__(
        self,
        address: str,
        *,
        psk: bytes,
        local_workers: int,
        deliver: Callable[[Landed | StreamFailed], None],
        on_event: EventFn | None = None,
    ) -> None:
        self.port = ClusterPort(address, psk=psk, on_event=on_event, role="recv")
        self.port.recv_phase = self
        self.address = self.port.address
        self.local_workers = local_workers
        self.deliver = deliver
        self._cond = threading.Condition()
        self._outbox: deque[Callable[[], None]] = deque()
        self._live: dict[bytes, Helper] = {}
        self._plans: dict[bytes, _Plan] = {}
        self._cancels: list[tuple[float, bytes]] = []
        self._stopping = threading.Event()
        self._monitor = self.port.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._suspect_until = 0.0
        self._thread = threading.Thread(target=self._run, name="stx-recv-cluster", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the port's thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.port.pump(TURN_S)
                self._turn()
            except Exception as exc:  # the thread must outlive a fault of one message
                self.port._event("warning", message=f"cluster port: {type(exc).__name__}")
                time.sleep(TURN_S)

    def _disconnects(self, now: float) -> None:
        """A connection dropped: whoever has gone silent since is the helper that left."""
        while self._monitor.poll(0):
            self._monitor.recv_multipart()
            self._suspect_until = now + HELPER_TIMEOUT
        if now < self._suspect_until:
            for h in list(self.port.helpers.values()):
                if h.usable and now - h.last_heard > DISCONNECT_SILENCE_S:
                    self.port._put_aside(h, "gone", "its connection dropped")

    def _turn(self) -> None:
        self._disconnects(time.monotonic())
        with self._cond:
            todo = list(self._outbox)
            self._outbox.clear()
            now = time.monotonic()
            due = [sid for t, sid in self._cancels if t <= now]
            self._cancels = [(t, sid) for t, sid in self._cancels if t > now]
        for fn in todo:
            fn()
        for sid in due:
            self._cancel_now(sid)
        self._expire(now)

    def _later(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._outbox.append(fn)

    # -- cluster.RecvPhase (called in the port's thread)

    def adopt(self, helper: Helper) -> None:
        if not usable_address(helper.data_listen):
            self.port._put_aside(
                helper, "refused", "no usable --data-listen address (stx worker --data-listen)"
            )
            return
        with self._cond:
            self._live[helper.identity] = helper
            self._cond.notify_all()
            plans = [p for p in self._plans.values() if p.ready]
        for plan in plans:  # sessions under way take it at once
            self._grow(plan, helper)

    def helper_left(self, helper: Helper) -> None:
        changed: list[tuple[Session, Routes]] = []
        with self._cond:
            self._live.pop(helper.identity, None)
            plans = list(self._plans.values())
            for plan in plans:
                plan.answers.setdefault(helper.identity, (False, "it left"))
                k = plan.index(helper)
                if not plan.ready and k and k in plan.table:
                    plan.table = bytearray(0 if v == k else v for v in plan.table)
                    changed.append((plan.session, plan.routes()))
            self._cond.notify_all()
        for session, routes in changed:
            session.reroute(routes)
        for plan in plans:
            if plan.ready and plan.index(helper):
                self._drop(plan, helper, "it left")

    def helper_message(self, helper: Helper, msg: Message, now: float) -> None:
        if isinstance(msg, Offered):
            self._offered(helper, msg)
            return
        assert isinstance(msg, Report)
        try:
            report = decode(msg.body, expect=RECEIVER_REPORTS)
        except ProtocolError as exc:
            self.port._put_aside(helper, "gone", f"protocol error: {exc}")
            return
        assert isinstance(report, Landed | StreamFailed | StreamClosed)
        sid, stream = report.session_id, report.stream
        with self._cond:
            plan = self._plans.get(sid)
            if plan is None or stream not in plan.granted.get(helper.identity, ()):
                return  # not one of its streams (or a session already over): ignored
            plan.seen.setdefault(helper.identity, set()).add(stream)
            if not isinstance(report, Landed):
                plan.closed.add(stream)
        if isinstance(report, Landed | StreamFailed):
            self.deliver(report)

    def _offered(self, helper: Helper, msg: Offered) -> None:
        reroute: Routes | None = None
        with self._cond:
            plan = self._plans.get(msg.session_id)
            if plan is None or not plan.index(helper):
                return
            queue = plan.pending.get(helper.identity)
            if not plan.ready:
                plan.answers[helper.identity] = (msg.ok, msg.reason[:500])
                self._cond.notify_all()
                return
            if not queue:
                return  # nothing was asked of it
            if msg.ok:
                delta, _ = queue.popleft()
                reroute = self._apply(plan, delta, helper)
        if msg.ok:
            if reroute is not None:
                plan.session.reroute(reroute)
        else:  # it ended the session on its side: what it served goes elsewhere
            why = f"for this session: {msg.reason[:500]}"
            self.port._event("helper_left", host=helper.host, reason=why)
            self._drop(plan, helper, why)

    # -- changes of routes while a session runs (the port's thread)

    def _weights(self, plan: _Plan, but: Helper | None = None) -> list[int]:
        """Each place's worker processes: 0 for a helper that is gone, not taking part in this
        session (it refused, or has not accepted yet) or ``but``."""
        out = [self.local_workers]
        for h in plan.places:
            member = plan.answers.get(h.identity, (False, ""))[0]
            live = h.identity in self._live and h.usable and h is not but
            out.append(h.workers if member and live else 0)
        return out

    def _apply(self, plan: _Plan, delta: Delta, member: Helper | None = None) -> Routes | None:
        """Make ``delta`` the routes (each entry only where it still is what it was); the new
        routes, or None when nothing changed. Under ``_cond``."""
        if member is not None:
            plan.answers[member.identity] = (True, "")
        changed = 0
        for stream, (was, now) in delta.items():
            if plan.table[stream] == was:
                plan.table[stream] = now
                changed += 1
        if not changed:
            return None
        return plan.routes()

    def _tell(self, plan: _Plan, reason: str, host: str, delta: Delta) -> None:
        where: dict[str, int] = {}
        for _, now in delta.values():
            name = plan.places[now - 1].data_listen if now else "receiver"
            where[name] = where.get(name, 0) + 1
        self.port._event("rerouted", reason=reason, host=host, streams=where)

    def _offer(
        self, plan: _Plan, helper: Helper, delta: Delta, fresh: set[int], *, layout: bool
    ) -> None:
        """Send ``helper`` the secrets of ``fresh`` (and first the layout) and keep ``delta``
        until it answers. Under ``_cond``; sends on the port (the port's thread)."""
        assert plan.keys is not None and plan.template is not None
        sid = plan.keys.session_id
        streams = tuple(sorted(fresh))
        offer = replace(
            plan.template,
            streams=streams,
            secrets=tuple(plan.keys.stream_secret(s) for s in streams),
        )
        if layout:
            with open(plan.layout, "rb") as f:
                data = f.read()
            parts = max(1, -(-len(data) // LAYOUT_PART))
            for i in range(parts):
                chunk = data[i * LAYOUT_PART : (i + 1) * LAYOUT_PART]
                self.port.send(helper, SessionLayout(sid, i, i == parts - 1, chunk))
        # (kept before it is sent: a helper that cannot be reached is dropped in ``send``)
        plan.granted.setdefault(helper.identity, set()).update(streams)
        plan.pending.setdefault(helper.identity, deque()).append(
            (delta, time.monotonic() + OFFER_WAIT_S)
        )
        self.port.send(helper, offer)

    def _grow(self, plan: _Plan, helper: Helper) -> None:
        """A helper joined while ``plan``'s session runs: offer it its share (``grow``); the
        routes change when it accepts."""
        with self._cond:
            if (
                plan.index(helper)
                or len(plan.places) >= MAX_ROUTE_PLACES
                or plan.keys is None
                or self._plans.get(plan.keys.session_id) is not plan
            ):
                return
            plan.places.append(helper)
            new = len(plan.places)
            weights = self._weights(plan)
            weights[new] = helper.workers
            here = plan.session.streams_here()
            open_at = {0: here}
            for k, h in enumerate(plan.places, start=1):
                open_at[k] = plan.open_at(h)
            used = here.union(*plan.seen.values())
            # Ids just above the highest one used may be on their way here (set up by the
            # sender, JOIN not yet in): the new helper's start above them.
            assert plan.template is not None
            floor = max(used, default=-1) + plan.template.nstreams
            taken = plan.taken()
            delta, fresh = grow(bytes(plan.table), weights, new, open_at, taken, floor)
            if not fresh:
                return  # nothing it could serve (no free stream id left here)
            try:
                self._offer(plan, helper, delta, fresh, layout=True)
            except OSError:  # the session is over (its layout gone)
                return
        self._tell(plan, "helper joined", helper.host, delta)

    def _drop(self, plan: _Plan, helper: Helper, why: str) -> None:
        """``helper`` serves ``plan``'s session no more: its stream ids are dealt over the
        places left (``redeal``). Those going to the receiver change at once, those going
        to a helper once it accepted their secrets (ids that may have been used, or that
        another place holds, are routed there without them: ``_Plan.taken``)."""
        with self._cond:
            k = plan.index(helper)
            if not k or plan.keys is None or self._plans.get(plan.keys.session_id) is not plan:
                return
            plan.answers[helper.identity] = (False, why)
            weights = self._weights(plan, but=helper)
            # What it was offered and had not accepted: ids that were going to it from a
            # place no longer served come here instead (a join's moves simply stay).
            back: Delta = {}
            for part, _ in plan.pending.pop(helper.identity, ()):
                back.update({s: (was, 0) for s, (was, _) in part.items() if not weights[was]})
            routes = self._apply(plan, back)
            delta = redeal(bytes(plan.table), k, weights)
            # Ids that may have been used, or that another place holds, go without their
            # secrets (the sender only moves streams onto them); the others are the new
            # place's own.
            used = plan.taken(but=helper)
            here = {s: d for s, d in delta.items() if d[1] == 0}
            later: dict[int, Delta] = {}
            for s, d in delta.items():
                if d[1]:
                    later.setdefault(d[1], {})[s] = d
            routes = self._apply(plan, here) or routes
            for j, part in later.items():
                fresh = {s for s in part if s not in used}
                if fresh:
                    self._offer(plan, plan.places[j - 1], part, fresh, layout=False)
                else:
                    routes = self._apply(plan, part) or routes
        if delta:
            self._tell(plan, "helper left", helper.host, delta)
        if routes is not None:
            with self._cond:  # (a helper dropped meanwhile, in ``send``, changed them too)
                routes = plan.routes()
            plan.session.reroute(routes)

    def _expire(self, now: float) -> None:
        """Later offers not answered in ``OFFER_WAIT_S``: that helper is dropped from the
        session (and told to forget it)."""
        late: list[tuple[_Plan, Helper]] = []
        with self._cond:
            for plan in self._plans.values():
                for h in plan.places:
                    queue = plan.pending.get(h.identity)
                    if queue and queue[0][1] <= now:
                        late.append((plan, h))
        for plan, h in late:
            why = "for this session: no answer in time"
            self.port._event("helper_left", host=h.host, reason=why)
            self._drop(plan, h, why)
            if plan.keys is not None:
                self._tell_cancel(plan.keys.session_id, [h])

    # ------------------------------------------------------------ the control threads

    def remote_workers(self) -> int:
        with self._cond:
            return sum(h.workers for h in self._live.values() if h.usable)

    def wait_workers(self, want: int, wait_s: float) -> int:
        """Until the live helpers offer ``want`` worker processes or ``wait_s`` passed: how
        many they offer then."""
        end = time.monotonic() + wait_s
        with self._cond:
            while True:
                have = sum(h.workers for h in self._live.values() if h.usable)
                left = end - time.monotonic()
                if have >= want or left <= 0:
                    return have
                self._cond.wait(min(left, 0.5))

    def plan(
        self,
        session: Session,
        keys: SessionKeys,
        md: Transfer,
        *,
        path: str,
        tree: bool,
        layout: str,
        inode: tuple[int, int] | None,
        sync_bytes: int,
    ) -> Routes | None:
        """Route the session's streams (see the module's docstring); None when no helper
        takes any (every stream comes here, as without a cluster, until one joins)."""
        with self._cond:
            helpers = [h for h in self._live.values() if h.usable][:MAX_ROUTE_PLACES]
        if not layout:
            return None
        n = min(MAX_STREAMS, 4 * md.streams + 64)
        table = round_robin([self.local_workers] + [h.workers for h in helpers], n)
        sid = keys.session_id
        template = StreamOffer(
            session_id=sid,
            streams=(),
            secrets=(),
            path=os.path.abspath(path),
            tree=tree,
            manifest_id=md.file_id,
            rekey_records=md.rekey_records,
            rekey_bytes=md.rekey_bytes,
            sync_bytes=sync_bytes,
            nstreams=md.streams,
            inode=inode,
        )
        plan = _Plan(session, helpers, table, keys=keys, template=template, layout=layout)
        data = b""
        if helpers:
            with open(layout, "rb") as f:
                data = f.read()
        offers: list[tuple[Helper, StreamOffer]] = []
        for k, helper in enumerate(helpers, start=1):
            streams = tuple(s for s, v in enumerate(table) if v == k)
            if not streams:
                plan.answers[helper.identity] = (False, "no stream for it")
                continue
            secrets = tuple(keys.stream_secret(s) for s in streams)
            offers.append((helper, replace(template, streams=streams, secrets=secrets)))
            plan.granted[helper.identity] = set(streams)
        with self._cond:
            self._plans[sid] = plan

        def send() -> None:
            parts = max(1, -(-len(data) // LAYOUT_PART))
            for helper, offer in offers:
                for i in range(parts):
                    chunk = data[i * LAYOUT_PART : (i + 1) * LAYOUT_PART]
                    self.port.send(helper, SessionLayout(sid, i, i == parts - 1, chunk))
                self.port.send(helper, offer)

        if offers:
            self._later(send)
        end = time.monotonic() + OFFER_WAIT_S
        with self._cond:
            while any(h.identity not in plan.answers for h, _ in offers):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            refused = [h for h in helpers if not plan.answers.get(h.identity, (False, ""))[0]]
            for h in refused:
                k = helpers.index(h) + 1
                plan.table = bytearray(0 if v == k else v for v in plan.table)
                why = plan.answers.get(h.identity, (False, "no answer in time"))[1]
                plan.answers[h.identity] = (False, why)
                if why != "no stream for it":
                    self.port._event("helper_left", host=h.host, reason=f"for this session: {why}")
            routes = plan.routes() if any(plan.table) else None
            plan.ready = True
        offered = {h.identity for h, _ in offers}
        stale = [h for h in refused if h.identity in offered]
        if stale:  # offered, but not routed to: they forget the session's secrets
            self._later(lambda: self._tell_cancel(sid, stale))
        # Helpers that joined while this was decided take their share now.
        self._later(lambda: self._catch_up(plan))
        return routes

    def _catch_up(self, plan: _Plan) -> None:
        with self._cond:
            late = [h for h in self._live.values() if h.usable and not plan.index(h)]
        for h in late:
            self._grow(plan, h)

    def hosts(self, session_id: bytes) -> dict[str, int]:
        """Streams the session's helpers served, per helper host."""
        out: dict[str, int] = {}
        with self._cond:
            plan = self._plans.get(session_id)
            if plan is None:
                return out
            for h in plan.places:
                n = len(plan.seen.get(h.identity, ()))
                if n:
                    out[h.host] = out.get(h.host, 0) + n
        return out

    def cancel(self, session_id: bytes) -> None:
        """The session is over: its helpers end its streams and forget its secrets."""
        self._later(lambda: self._cancel_now(session_id))

    def cancel_later(self, session_id: bytes, delay: float = FINISHED_GRACE_S) -> None:
        with self._cond:
            self._cancels.append((time.monotonic() + delay, session_id))

    def _cancel_now(self, session_id: bytes) -> None:
        with self._cond:
            plan = self._plans.pop(session_id, None)
        if plan is not None:
            self._tell_cancel(session_id, plan.places)

    def _tell_cancel(self, session_id: bytes, helpers: list[Helper]) -> None:
        for h in helpers:
            self.port.send(h, RecvCancel(session_id))

    def summary(self) -> dict[str, Any]:
        with self._cond:
            live = list(self._live.values())
        return {"helpers": len(live), "remote_workers": sum(h.workers for h in live)}

    def close(self) -> None:
        """Release the helpers (each ends its sessions' streams) and stop listening."""
        self._stopping.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._turn()
        with contextlib.suppress(zmq.ZMQError):
            self.port.router.disable_monitor()
        self._monitor.close(linger=0)
        self.port.close()
