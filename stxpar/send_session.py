"""The sender's session core after the handshake: METADATA to RECEIPT. Pure (sans-IO).

Theory of operation
-------------------
One ``SenderSession`` per connection, built once the handshake gave the session keys. The
driver (``stxpar.sender``) feeds it inputs and carries out its outputs::

    outputs = session.start(now)         # [SendFrame(METADATA)]
    outputs = session.handle(FrameIn(ftype, payload))   # a frame read from the connection
    outputs = session.handle(Tick(now))  # the clock, a few times a second while it waits
    ...

States and what moves them (the whole table is ``SenderSession.TABLE``)::

    START --start()--> WAIT_ACK --METADATA_ACK--> DATA --DataComplete--> VERIFY
                                             \\--(nothing needed)------> VERIFY
    VERIFY --SourceChecked--> WAIT_RECEIPT --RECEIPT--> DONE
    WAIT_ACK, DATA, VERIFY, WAIT_RECEIPT --ROUTES--> the same state (``routes`` replaced)
    any state --ERROR frame, ConnectionLost, a timeout, anything not in the table--> FAILED

Outputs, in the order given: ``SendFrame(data)`` (write it on the control connection);
``Reconciled(held, held_bytes)`` (the receiver's METADATA_ACK was applied to the run's
ledger: it now holds exactly the receiver's blocks, with the receiver's digests);
``StartData(needed)`` (start the data phase for these block ids; feed ``Progressed(now)``
whenever blocks complete and ``DataComplete()`` when the ledger is complete, or ``DataFailed(error)``);
``CheckSource()`` (check that the source is unchanged, then feed ``SourceChecked(error)``);
``StopWorkers()`` (the data phase is abandoned: stop the workers now); ``Failed(error)`` and
``Succeeded()`` end the session.

A ROUTES frame (the receiver has helpers on other hosts, docs/cluster.md) replaces
``routes``: the driver's ``setup(stream)`` sends each new data stream where it names (a
stream it does not name goes to the receiver's own address); in the data phase the driver
also moves every open stream that the new routes send elsewhere (``sender._DataPhase``).

The receiver's bitmap is the truth: a block acknowledged in an earlier session but not held
now (the receiver died before recording it) is sent again. A sealed ERROR frame is the error
it names; one that does not open was injected by someone without the key and is a
ConnectError (a reconnect). Timeouts come from ``Tick``: ``stall_timeout`` bounds the waits
for METADATA_ACK and RECEIPT and, in the data phase, the time without a completed block;
``deadline`` (the run's ``--deadline``, on the same clock) ends the session with
``DeadlineReached``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .blocks import BlockLedger
from .digest import BLOCK_DIGEST_LEN
from .errors import ConnectError, IntegrityError, ProtocolError, StxError, error_from_wire
from .manifest import chunks
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
from .wire import End, ErrorMsg, FrameType, MetadataAck, Receipt, Routes


class DeadlineReached(ConnectError):
    """``--deadline`` passed: give up now, no more retries."""


class State(enum.Enum):
    START = "start"
    WAIT_ACK = "wait-metadata-ack"
    DATA = "data"
    VERIFY = "verify-source"
    WAIT_RECEIPT = "wait-receipt"
    DONE = "done"
    FAILED = "failed"


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class DataComplete(Input):
    """The data phase ended: every block is complete in the ledger."""


@dataclass(frozen=True)
class Progressed(Input):
    """Blocks completed in the data phase (at ``now``): the stall timer starts again."""

    now: float


@dataclass(frozen=True)
class DataFailed(Input):
    """The data phase failed with ``error`` (a worker's fatal error, streams that keep
    failing)."""

    error: StxError


@dataclass(frozen=True)
class SourceChecked(Input):
    """The answer to ``CheckSource``: ``error`` if the source changed, else None."""

    error: StxError | None = None


# ------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class Reconciled(Output):
    """METADATA_ACK applied: the receiver holds ``held`` blocks, ``held_bytes`` bytes."""

    held: int
    held_bytes: int


@dataclass(frozen=True)
class StartData(Output):
    """Start the data phase for these block ids (in order)."""

    needed: tuple[int, ...]


@dataclass(frozen=True)
class CheckSource(Output):
    """Check the source is unchanged; answer with ``SourceChecked``."""


@dataclass(frozen=True)
class StopWorkers(Output):
    """The data phase is abandoned: stop its workers now."""


def sealed_error(channel: ControlChannel, payload: bytes) -> StxError:
    """The error a sealed ERROR frame stands for. After the handshake the receiver seals its
    errors (they may name the file); an ERROR that does not open was injected by someone
    without the key: it can only cost a reconnect."""
    try:
        err = ErrorMsg.decode(channel.open(FrameType.ERROR, payload))
    except StxError:
        return ConnectError("the control connection carried an unauthenticated ERROR")
    return error_from_wire(err.code, err.message)


class SenderSession(Machine):
    """The sender's side of one session after the handshake (see the module docstring).

    ``channel``: the sealed control channel (client side); ``metadata``: the transfer (what
    METADATA and the MANIFEST chunks say; ``manifest_chunks``: those chunks, encoded once);
    ``ledger``: the run's ledger (kept across sessions; reconciled here with the receiver's
    bitmap); ``stall_timeout``: seconds; ``deadline``: ``time.monotonic()`` value or None,
    ``deadline_s`` the option it came from (for the message); ``peer``: ``host:port`` for
    messages."""

    TERMINAL: ClassVar[frozenset[enum.Enum]] = frozenset({State.DONE, State.FAILED})
    FAILED: ClassVar[enum.Enum] = State.FAILED

    def __init__(
        self,
        *,
        channel: ControlChannel,
        metadata: Transfer,
        manifest_chunks: Sequence[bytes] | None = None,
        ledger: BlockLedger,
        stall_timeout: float,
        deadline: float | None = None,
        deadline_s: float = 0.0,
        peer: str = "receiver",
    ) -> None:
        self.channel = channel
        self.metadata = metadata
        self.manifest_chunks = manifest_chunks
        self.ledger = ledger
        self.stall_timeout = stall_timeout
        self.deadline = deadline
        self.deadline_s = deadline_s
        self.peer = peer
        self.state: enum.Enum = State.START
        self.now = 0.0
        #: when the current wait began (or the data phase last made progress)
        self.since = 0.0
        #: the whole-file digest sent in END
        self.digest = b""
        #: the receiver's latest ROUTES (None: every stream to its own address)
        self.routes: Routes | None = None

    def start(self, now: float) -> list[Output]:
        """Send METADATA; wait for METADATA_ACK."""
        if self.state is not State.START:
            return self._fail(ProtocolError("the session was started twice"))
        self.now = self.since = now
        self.state = State.WAIT_ACK
        seal, md = self.channel.seal, self.metadata
        out: list[Output] = [SendFrame(seal(FrameType.METADATA, md.header.encode()))]
        encoded = self.manifest_chunks
        if encoded is None:
            encoded = chunks(md.manifest.entries)
        out.extend(SendFrame(seal(FrameType.MANIFEST, c)) for c in encoded)
        return out

    # -- helpers
    def _open(self, event: FrameIn, want: FrameType) -> bytes:
        if event.ftype is FrameType.ERROR:
            raise sealed_error(self.channel, event.payload)
        if event.ftype is not want:
            raise ProtocolError(f"expected {want.name}, got {event.ftype.name}")
        return self.channel.open(event.ftype, event.payload)

    def _timed_out(self, now: float, *, data: bool) -> None:
        self.now = max(self.now, now)
        if self.deadline is not None and now > self.deadline:
            raise DeadlineReached(f"deadline of {self.deadline_s:g} s reached")
        if now - self.since > self.stall_timeout:
            if data:
                raise ConnectError(
                    f"transfer stalled: nothing acknowledged for {self.stall_timeout:.0f} s"
                )
            raise ConnectError(f"connection to {self.peer} lost: timed out")

    def _check_source(self) -> list[Output]:
        self.state = State.VERIFY
        return [CheckSource()]

    def _took_routes(self, event: FrameIn) -> bool:
        """A ROUTES frame: opened (an unauthenticated one fails the session) and kept."""
        if event.ftype is not FrameType.ROUTES:
            return False
        self.routes = Routes.decode(self.channel.open(event.ftype, event.payload))
        return True

    # -- handlers
    def _on_ack(self, event: FrameIn) -> list[Output]:
        if self._took_routes(event):
            return []
        ack = MetadataAck.decode(self._open(event, FrameType.METADATA_ACK))
        ledger = self.ledger
        held = ack.held(ledger.total)
        ledger.clear()
        for k, block in enumerate(held):
            ledger.record(block, ack.digests[k * BLOCK_DIGEST_LEN : (k + 1) * BLOCK_DIGEST_LEN])
        out: list[Output] = [Reconciled(held=len(held), held_bytes=ledger.bytes)]
        if ledger.complete:
            return [*out, *self._check_source()]
        self.state = State.DATA
        self.since = self.now
        return [*out, StartData(self._needed())]

    def _needed(self) -> tuple[int, ...]:
        """The blocks still to send, the largest files' first: the tail of the transfer is
        then small files spread over every stream, not one big file on one stream."""
        order = self.metadata.manifest.send_order
        if not self.ledger.count:
            return order
        has = self.ledger.has
        return tuple(b for b in order if not has(b))

    def _on_tick_wait(self, event: Tick) -> list[Output]:
        self._timed_out(event.now, data=False)
        return []

    def _on_tick_data(self, event: Tick) -> list[Output]:
        self._timed_out(event.now, data=True)
        return []

    def _on_tick_idle(self, event: Tick) -> list[Output]:
        self.now = max(self.now, event.now)
        return []

    def _on_progress(self, event: Progressed) -> list[Output]:
        self.now = self.since = max(self.now, event.now)
        return []

    def _on_data_frame(self, event: FrameIn) -> list[Output]:
        if self._took_routes(event):
            return []
        if event.ftype is FrameType.ERROR:
            raise sealed_error(self.channel, event.payload)
        raise ProtocolError(f"unexpected {event.ftype.name} on the control connection")

    def _on_data_complete(self, event: DataComplete) -> list[Output]:
        if not self.ledger.complete:
            raise ProtocolError(
                f"the data phase ended with {self.ledger.total - self.ledger.count} blocks missing"
            )
        return self._check_source()

    def _on_source_checked(self, event: SourceChecked) -> list[Output]:
        if event.error is not None:
            raise event.error
        self.digest = self.metadata.manifest.tree_digest(self.ledger)
        end = End(total_blocks=self.ledger.total, digest=self.digest)
        self.state = State.WAIT_RECEIPT
        self.since = self.now
        return [SendFrame(self.channel.seal(FrameType.END, end.encode()))]

    def _on_verify_frame(self, event: FrameIn) -> list[Output]:
        if self._took_routes(event):
            return []
        self._open(event, FrameType.RECEIPT)  # an ERROR is its error; anything else is wrong
        raise ProtocolError(f"unexpected {event.ftype.name} before END")

    def _on_receipt(self, event: FrameIn) -> list[Output]:
        if self._took_routes(event):
            return []
        receipt = Receipt.decode(self._open(event, FrameType.RECEIPT))
        if receipt.digest != self.digest or receipt.size != self.metadata.size:
            raise IntegrityError("the receiver's receipt does not match the file sent")
        self.state = State.DONE
        return [Succeeded()]

    def _on_lost(self, event: ConnectionLost | DataFailed) -> list[Output]:
        raise event.error

    def _fail(self, error: StxError) -> list[Output]:
        in_data = self.state is State.DATA
        self.state = State.FAILED
        return [StopWorkers(), Failed(error)] if in_data else [Failed(error)]

    TABLE: ClassVar[dict[tuple[enum.Enum, type[Input]], Handler]] = {
        (State.WAIT_ACK, FrameIn): _on_ack,
        (State.WAIT_ACK, Tick): _on_tick_wait,
        (State.WAIT_ACK, ConnectionLost): _on_lost,
        (State.DATA, FrameIn): _on_data_frame,
        (State.DATA, Tick): _on_tick_data,
        (State.DATA, Progressed): _on_progress,
        (State.DATA, DataComplete): _on_data_complete,
        (State.DATA, ConnectionLost): _on_lost,
        (State.DATA, DataFailed): _on_lost,
        (State.VERIFY, SourceChecked): _on_source_checked,
        (State.VERIFY, Tick): _on_tick_idle,
        (State.VERIFY, FrameIn): _on_verify_frame,
        (State.VERIFY, ConnectionLost): _on_lost,
        (State.WAIT_RECEIPT, FrameIn): _on_receipt,
        (State.WAIT_RECEIPT, Tick): _on_tick_wait,
        (State.WAIT_RECEIPT, ConnectionLost): _on_lost,
    }
