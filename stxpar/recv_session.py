"""The receiver's session core: one transfer from METADATA to RECEIPT, with no I/O.

Theory of operation
-------------------
The control handler (``control.py``) owns one ``ReceiverSession`` per authenticated control
connection and feeds it, in one thread, everything that happens: frames read from the control
connection (``FrameIn``), the result of each effect it asked for, the workers' reports for the
session (``BlocksLanded``, ``StreamBroke``), the clock (``Tick``), a lost connection, a newer
session of the same file taking over (``Superseded``), the receiver stopping. It carries out
what the core returns, in order: frames to send, effects (``Admit``, ``AppendLog``,
``Finalize``, ``CheckPartial``, ``CancelStreams``, ``EndFiles``, ``Completed``) and events
(``Event``). An effect with a result is answered at once with the matching input.

::

    WAIT_METADATA --METADATA--> WAIT_MANIFEST --last MANIFEST chunk--> ADMITTING
    ADMITTING --Admitted--> RECEIVING --END--> COMPLETING
                                    |                     |   ^              | every block held,
                                    Refused    lost conn. |   | (no)         | digest checked
                                                          v   |              v
                                                         GRACE (0.1 s)    FINISHING --Finalized--> DONE
    a failure once admitted --> CLOSING --PartialChecked--> FAILED   (superseded: quietly FAILED)

With helpers on other hosts (``stx recv --cluster``), ``Admitted.routes`` is sent as a ROUTES
frame just before METADATA_ACK (so the sender's first streams already go where they should),
and ``Reroute`` (a helper died) sends a new ROUTES while the session receives; in FINISHING
and CLOSING it is ignored.

The manifest is checked chunk by chunk as it arrives (``manifest.Builder``: every path, kind
and limit) before anything is admitted or created. The one block ledger
(``blocks.BlockLedger``) holds the blocks recorded in the state log and their digests; the
whole-transfer digest (``Manifest.tree_digest``) is computed from it before anything is
renamed.
Failure rules (docs/protocol.md §8.3): a superseded session ends quietly; an ``AuthError``
(a forged block) reverts the state log to the blocks held at admission (or discards the
partial if there were none); a ``DigestMismatch`` discards it; a partial that is no longer
the file written ("gone") has only its state log removed; anything else keeps both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .blocks import BlockLedger
from .digest import BLOCK_DIGEST_LEN
from .errors import AuthError, ConnectError, IntegrityError, ProtocolError, StxError
from .keyschedule import SessionKeys
from .manifest import MAX_CHUNK_BYTES, MAX_PATH_BYTES, Builder, Header, Limits
from .records import ControlChannel
from .session_base import (
    ConnectionLost,
    Failed,
    FrameIn,
    Handler,
    Input,
    Machine,
    Output,
    SendFrame,
    Succeeded,
    Tick,
)
from .transfer import Transfer
from .wire import (
    MAX_HANDSHAKE_PAYLOAD,
    TAG_LEN,
    End,
    ErrorMsg,
    FrameType,
    MetadataAck,
    Receipt,
    Routes,
)

#: After END, how long the receiver waits for workers' last reports before it asks the sender
#: to reconnect and send what is still missing.
COMPLETE_TIMEOUT = 10.0
#: How long a lost control connection waits for a worker's failure report (a forged block is
#: judged as forgery, not as a lost connection).
LOST_GRACE_S = 0.1


class DigestMismatch(IntegrityError):
    """The whole-file digest did not match: no block of the partial can be trusted."""


#: METADATA's cap: the fixed fields, and room for a --to SUBDIR of MAX_PATH_BYTES.
MAX_METADATA_PAYLOAD = MAX_HANDSHAKE_PAYLOAD + MAX_PATH_BYTES


def metadata_cap(ftype: FrameType) -> int:
    return MAX_METADATA_PAYLOAD if ftype is FrameType.METADATA else -1


def manifest_cap(ftype: FrameType) -> int:
    if ftype is FrameType.MANIFEST:
        return MAX_CHUNK_BYTES + TAG_LEN
    return MAX_HANDSHAKE_PAYLOAD if ftype is FrameType.ERROR else -1


def end_cap(ftype: FrameType) -> int:
    return MAX_HANDSHAKE_PAYLOAD if ftype in (FrameType.END, FrameType.ERROR) else -1


class State(enum.Enum):
    WAIT_METADATA = "wait-metadata"
    WAIT_MANIFEST = "wait-manifest"
    ADMITTING = "admitting"
    RECEIVING = "receiving"
    GRACE = "grace"
    COMPLETING = "completing"
    FINISHING = "finishing"
    CLOSING = "closing"
    DONE = "done"
    FAILED = "failed"


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True, eq=False)
class Admitted(Input):
    """Admission succeeded: the blocks already held (``ledger``) and whether the file is a
    remembered completion."""

    name: str
    ledger: BlockLedger
    complete: bool = False
    #: where the sender's data streams go (helpers); None: all to this receiver
    routes: Routes | None = None


@dataclass(frozen=True)
class Refused(Input):
    """Admission failed (nothing was kept)."""

    error: StxError


@dataclass(frozen=True)
class BlocksLanded(Input):
    """A worker's report: these blocks are durable in the partial (index, digest)."""

    blocks: Sequence[tuple[Any, Any]]


@dataclass(frozen=True)
class StreamBroke(Input):
    """A worker's report: a stream of the session failed with this error."""

    error: StxError


@dataclass(frozen=True)
class Reroute(Input):
    """Where data streams go changed (a helper joined or died): tell the sender."""

    routes: Routes


@dataclass(frozen=True)
class Appended(Input):
    """The state log now records these blocks (durably)."""

    blocks: Sequence[tuple[int, bytes]]


@dataclass(frozen=True)
class AppendFailed(Input):
    error: StxError


@dataclass(frozen=True)
class Finalized(Input):
    """The partial has its final name (or was a remembered completion)."""


@dataclass(frozen=True)
class FinalizeFailed(Input):
    error: StxError


@dataclass(frozen=True)
class PartialChecked(Input):
    """Whether the partial file is gone (deleted or replaced since admission)."""

    gone: bool


@dataclass(frozen=True)
class Superseded(Input):
    """A newer session of the same file took over (its files, its name, its streams)."""


@dataclass(frozen=True)
class Stopping(Input):
    """The receiver is shutting down."""


# ---------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Admit(Output):
    """Reserve the name and open (resume, remember or create) the partial: answer
    ``Admitted`` or ``Refused``."""

    md: Transfer


@dataclass(frozen=True)
class AppendLog(Output):
    """Append these records to the state log: answer ``Appended`` or ``AppendFailed``."""

    blocks: list[tuple[int, bytes]]


@dataclass(frozen=True)
class Finalize(Output):
    """Give the partial its final name (nothing to do for a remembered completion):
    answer ``Finalized`` or ``FinalizeFailed``."""

    complete: bool


@dataclass(frozen=True)
class CheckPartial(Output):
    """Tell whether the partial is still the file written: answer ``PartialChecked``."""


@dataclass(frozen=True)
class CancelStreams(Output):
    """End the session's data streams, now or after a grace (a completed session)."""

    later: bool = False


EndHow = Literal["keep", "discard", "revert", "gone"]


@dataclass(frozen=True)
class EndFiles(Output):
    """Close the session's files and release its name. ``keep``: partial and state stay;
    ``discard``: both go; ``revert``: the state log holds exactly ``initial``; ``gone``: the
    state log goes, the partial path (someone else's now) is left alone."""

    how: EndHow
    initial: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True)
class Completed(Output):
    """The file is complete and final: record and report it, remember it, free its name."""

    digest: bytes


@dataclass(frozen=True)
class Event(Output):
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the core


class ReceiverSession(Machine):
    """One transfer on the receiving side, after the handshake."""

    FAILED: ClassVar[enum.Enum] = State.FAILED
    TERMINAL: ClassVar[frozenset[enum.Enum]] = frozenset({State.DONE, State.FAILED})

    def __init__(
        self,
        session: SessionKeys,
        *,
        peer: str,
        stall_timeout: float,
        now: float,
        limits: Limits | None = None,
    ) -> None:
        self.state: State = State.WAIT_METADATA
        self.session_id = session.session_id
        self.peer = peer
        self.stall_timeout = stall_timeout
        self.channel = ControlChannel(session=session, client=False)
        self.now = now
        self.started = now
        self.md: Transfer | None = None
        self.limits = limits or Limits()
        self._header: Header | None = None
        self._builder: Builder | None = None
        self.name = ""
        self.ledger: BlockLedger | None = None
        self.complete = False
        self.initial: tuple[tuple[int, bytes], ...] = ()
        self.resumed_bytes = 0
        self.active_at = now
        self.error: StxError | None = None
        self._end: End | None = None
        self._digest = b""
        #: the whole-transfer digest, worked out as soon as the last block is recorded (while
        #: END is on its way); None once anything is recorded after it
        self._early: bytes | None = None
        self._grace_until = 0.0
        self._complete_by = 0.0

    # ------------------------------------------------------------ what the driver asks

    @property
    def admitted(self) -> bool:
        return self.ledger is not None

    @property
    def reads_frames(self) -> bool:
        """Whether the control connection is read now (not while END's blocks are awaited)."""
        return self.state in (State.WAIT_METADATA, State.WAIT_MANIFEST, State.RECEIVING)

    def frame_cap(self, ftype: FrameType) -> int:
        if self.state is State.WAIT_METADATA:
            return metadata_cap(ftype)
        if self.state is State.WAIT_MANIFEST:
            return manifest_cap(ftype)
        return end_cap(ftype)

    def deadline(self) -> float | None:
        """When the next ``Tick`` matters (None: no timer runs)."""
        if self.state in (State.RECEIVING, State.WAIT_MANIFEST):
            return self.active_at + self.stall_timeout
        if self.state is State.GRACE:
            return self._grace_until
        if self.state is State.COMPLETING:
            return self._complete_by
        return None

    # ------------------------------------------------------------ handlers

    def _on_metadata(self, ev: FrameIn) -> list[Output]:
        if ev.ftype is not FrameType.METADATA:
            raise ProtocolError(f"expected METADATA, got {ev.ftype.name}")
        self._header = Header.decode(self.channel.open(ev.ftype, ev.payload))
        self._builder = Builder(self._header, self.limits)  # RejectedError: too many entries
        self.active_at = self.now
        self.state = State.WAIT_MANIFEST
        return []

    def _on_manifest(self, ev: FrameIn) -> list[Output]:
        if ev.ftype is FrameType.ERROR:
            raise ConnectError("sender aborted the transfer")
        if ev.ftype is not FrameType.MANIFEST:
            raise ProtocolError(f"expected MANIFEST, got {ev.ftype.name}")
        builder = self._builder
        assert builder is not None and self._header is not None
        builder.feed(self.channel.open(ev.ftype, ev.payload))
        self.active_at = self.now
        if not builder.done:
            return []
        self.md = Transfer(self._header, builder.manifest())
        self._builder = None
        self.state = State.ADMITTING
        return [Admit(self.md)]

    def _on_admitted(self, ev: Admitted) -> list[Output]:
        md = self._md()
        self.name, self.ledger, self.complete = ev.name, ev.ledger, ev.complete
        self.initial = tuple(ev.ledger.held_pairs())
        self.resumed_bytes = ev.ledger.bytes
        self.started = self.active_at = self.now
        self.state = State.RECEIVING
        out: list[Output] = [
            Event(
                "accepted",
                {
                    "peer": self.peer,
                    "file": ev.name,
                    "bytes": md.size,
                    "streams": md.streams,
                    "resumed_blocks": ev.ledger.count,
                    "files": md.manifest.files,
                    "dirs": md.manifest.dirs,
                    "symlinks": md.manifest.symlinks,
                },
            )
        ]
        if ev.routes is not None:
            out.append(SendFrame(self.channel.seal(FrameType.ROUTES, ev.routes.encode())))
        ack = MetadataAck(have=ev.ledger.bitmap(), digests=ev.ledger.held_digests())
        out.append(SendFrame(self.channel.seal(FrameType.METADATA_ACK, ack.encode())))
        return out

    def _on_reroute(self, ev: Reroute) -> list[Output]:
        return [SendFrame(self.channel.seal(FrameType.ROUTES, ev.routes.encode()))]

    def _on_refused(self, ev: Refused) -> list[Output]:
        return self._fail(ev.error)

    def _on_tick(self, ev: Tick) -> list[Output]:
        self.now = ev.now
        if self.state is State.WAIT_MANIFEST and ev.now - self.active_at > self.stall_timeout:
            raise ConnectError(f"the sender's manifest stalled for {self.stall_timeout:g} s")
        if self.state is State.RECEIVING:
            idle = ev.now - self.active_at
            if idle > self.stall_timeout:
                # Retryable: a sender that was only paused reconnects and resumes.
                raise ConnectError(
                    f"stalled: no block and no control frame from the sender for {idle:.0f} s"
                    f" (stall timeout {self.stall_timeout:g} s)"
                )
        elif self.state is State.GRACE:
            if ev.now >= self._grace_until:
                assert self.error is not None
                raise self.error
        elif self.state is State.COMPLETING and ev.now >= self._complete_by:
            # Acknowledged but never recorded (a worker died between its ACK and its
            # report): a reconnect shows the sender the true bitmap.
            missing = self._ledger().total - self._ledger().count
            raise ConnectError(f"{missing} blocks are missing at END; resend them")
        return []

    def _on_end(self, ev: FrameIn) -> list[Output]:
        self.active_at = self.now
        if ev.ftype is FrameType.ERROR:
            raise ConnectError("sender aborted the transfer")
        if ev.ftype is not FrameType.END:
            raise ProtocolError(f"expected END, got {ev.ftype.name}")
        end = End.decode(self.channel.open(ev.ftype, ev.payload))
        if end.total_blocks != self._md().total_blocks:
            raise ProtocolError("END names a different number of blocks")
        self._end = end
        self._complete_by = self.now + COMPLETE_TIMEOUT
        self.state = State.COMPLETING
        return self._maybe_finalize()

    def _maybe_finalize(self) -> list[Output]:
        ledger = self._ledger()
        if not ledger.complete:
            return []
        assert self._end is not None
        early, self._early = self._early, None
        self._digest = early if early is not None else self._md().manifest.tree_digest(ledger)
        if self._digest != self._end.digest:
            raise DigestMismatch(f"whole-transfer digest mismatch for {self.name}")
        self.state = State.FINISHING
        return [Finalize(self.complete)]

    def _on_lost(self, ev: ConnectionLost) -> list[Output]:
        if self.state in (State.WAIT_METADATA, State.WAIT_MANIFEST) or not isinstance(
            ev.error, ConnectError
        ):
            raise ev.error
        self.error = ev.error
        self._grace_until = self.now + LOST_GRACE_S
        self.state = State.GRACE
        return []

    def _on_landed(self, ev: BlocksLanded) -> list[Output]:
        total = self._ledger().total
        fresh = [
            (item[0], bytes(item[1]))
            for item in ev.blocks
            if isinstance(item, tuple | list)
            and len(item) == 2
            and isinstance(item[0], int)
            and 0 <= item[0] < total
            and isinstance(item[1], bytes)
            and len(item[1]) == BLOCK_DIGEST_LEN
        ]
        return [AppendLog(fresh)]

    def _on_appended(self, ev: Appended) -> list[Output]:
        self.active_at = self.now
        ledger = self._ledger()
        self._early = None  # a block recorded again may change it
        for seq, digest in ev.blocks:
            ledger.record(seq, digest)
        if self.state is State.COMPLETING:
            return self._maybe_finalize()
        if ev.blocks and ledger.complete and self.state is State.RECEIVING:
            self._early = self._md().manifest.tree_digest(ledger)
        return []

    def _on_append_failed(self, ev: AppendFailed) -> list[Output]:
        raise ev.error

    def _on_stream_broke(self, ev: StreamBroke) -> list[Output]:
        # A stream that merely lost its connection is replaced by the sender; anything else
        # (forgery, repeated damage, disk errors) ends the whole transfer.
        if isinstance(ev.error, ConnectError):
            return []
        raise ev.error

    def _on_finalized(self, ev: Finalized) -> list[Output]:
        md, digest = self._md(), self._digest
        self.state = State.DONE
        receipt = Receipt(digest=digest, size=md.size).encode()
        return [
            CancelStreams(later=True),
            Completed(digest),
            SendFrame(self.channel.seal(FrameType.RECEIPT, receipt)),
            Succeeded(),
        ]

    def _on_finalize_failed(self, ev: FinalizeFailed) -> list[Output]:
        raise ev.error

    def _on_superseded(self, ev: Superseded) -> list[Output]:
        self.state = State.FAILED
        return [
            Event("superseded", {"file": self.name}),
            Failed(ConnectError(f"the transfer of {self.name} was taken over")),
        ]

    def _on_stopping(self, ev: Stopping) -> list[Output]:
        if self.state is State.RECEIVING:
            raise ConnectError("receiver shutting down")
        return []

    def _on_checked(self, ev: PartialChecked) -> list[Output]:
        return self._close(gone=ev.gone)

    def _ignore(self, ev: Input) -> list[Output]:
        return []

    # ------------------------------------------------------------ failure

    def _fail(self, error: StxError) -> list[Output]:
        if self.state is State.CLOSING:
            return self._close(gone=False)  # a second fault while closing: finish the first
        self.error = error
        body = ErrorMsg(error.wire_code, str(error)).encode()
        out: list[Output] = [SendFrame(self.channel.seal(FrameType.ERROR, body))]
        if not self.admitted:
            self.state = State.FAILED
            return [*out, Failed(error)]
        self.state = State.CLOSING
        if self.complete:
            return [*out, *self._close(gone=False)]
        return [*out, CheckPartial()]

    def _close(self, *, gone: bool) -> list[Output]:
        error, md, ledger = self.error, self._md(), self._ledger()
        assert error is not None
        # A wrong whole-file digest: no block of the partial can be trusted. A forged block:
        # nothing this session recorded is trusted (the state goes back to its admission).
        forged = isinstance(error, AuthError)
        discard = isinstance(error, DigestMismatch) or (forged and not self.initial)
        have = self.resumed_bytes if forged else ledger.bytes
        partial = "gone" if gone else "discarded" if discard else "kept"
        how: EndHow = "gone" if gone else "discard" if discard else "revert" if forged else "keep"
        self.state = State.FAILED
        return [
            Event(
                "failed",
                {
                    "peer": self.peer,
                    "file": self.name,
                    "error": str(error),
                    "error_code": error.exit_code,
                    "kept": partial == "kept",
                    "partial": partial,
                    "have_bytes": have if partial == "kept" else 0,
                    "bytes": md.size,
                    "received_bytes": max(0, ledger.bytes - self.resumed_bytes),
                    "seconds": round(max(0.0, self.now - self.started), 3),
                },
            ),
            CancelStreams(),
            EndFiles(how, self.initial if how == "revert" else ()),
            Failed(error),
        ]

    def _md(self) -> Transfer:
        assert self.md is not None
        return self.md

    def _ledger(self) -> BlockLedger:
        assert self.ledger is not None
        return self.ledger


def _table() -> dict[tuple[enum.Enum, type[Input]], Handler]:
    c = ReceiverSession
    table: dict[tuple[enum.Enum, type[Input]], Handler] = {
        (State.WAIT_METADATA, FrameIn): c._on_metadata,
        (State.WAIT_METADATA, ConnectionLost): c._on_lost,
        (State.WAIT_METADATA, Tick): c._on_tick,
        (State.WAIT_MANIFEST, FrameIn): c._on_manifest,
        (State.WAIT_MANIFEST, ConnectionLost): c._on_lost,
        (State.WAIT_MANIFEST, Tick): c._on_tick,
        (State.ADMITTING, Admitted): c._on_admitted,
        (State.ADMITTING, Refused): c._on_refused,
        (State.ADMITTING, Tick): c._on_tick,
        (State.RECEIVING, FrameIn): c._on_end,
        (State.RECEIVING, ConnectionLost): c._on_lost,
        (State.FINISHING, Finalized): c._on_finalized,
        (State.FINISHING, FinalizeFailed): c._on_finalize_failed,
        (State.FINISHING, Superseded): c._on_superseded,
        (State.FINISHING, Tick): c._ignore,
        (State.FINISHING, Stopping): c._ignore,
        (State.CLOSING, PartialChecked): c._on_checked,
        (State.FINISHING, Reroute): c._ignore,
        (State.CLOSING, Reroute): c._ignore,
    }
    for st in (State.RECEIVING, State.GRACE, State.COMPLETING):
        table[(st, Tick)] = c._on_tick
        table[(st, BlocksLanded)] = c._on_landed
        table[(st, Appended)] = c._on_appended
        table[(st, AppendFailed)] = c._on_append_failed
        table[(st, StreamBroke)] = c._on_stream_broke
        table[(st, Superseded)] = c._on_superseded
        table[(st, Stopping)] = c._on_stopping
        table[(st, Reroute)] = c._on_reroute
    return table


ReceiverSession.TABLE = _table()

#: Every input type the core knows (for the driver's checks and the table sweep).
INPUTS: tuple[type[Input], ...] = (
    FrameIn,
    Tick,
    ConnectionLost,
    Admitted,
    Refused,
    BlocksLanded,
    StreamBroke,
    Appended,
    AppendFailed,
    Finalized,
    FinalizeFailed,
    PartialChecked,
    Superseded,
    Stopping,
    Reroute,
)
