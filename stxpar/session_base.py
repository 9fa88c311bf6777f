"""What the two session cores (``send_session``, ``recv_session``) share: inputs, outputs, and
the table-driven machine.

Theory of operation
-------------------
A session core is the protocol after the handshake, for one side, with no I/O: the driver
(the sender coordinator, the receiver's control handler) feeds it *inputs* (decoded frames
from the control connection, reports from the workers, results of effects it asked for, the
clock as ``Tick``) and carries out the *outputs* it returns (frames to send, effects such as
"open the partial file" or "cancel the streams"). Its states and the inputs each one accepts
are one table, ``(state, input type) -> handler``, like the handshake's: an input that is
not in the table is a protocol error and the session moves to its failed state; nothing
outside the table can happen. ``handle`` never raises for what the peer or the workers did:
a failure is an output (``Failed``), after whatever clean-up effects the core asks for.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ProtocolError, StxError
from .wire import FrameType


class Input:
    """Base of every input of a session core."""


class Output:
    """Base of every output of a session core."""


@dataclass(frozen=True)
class FrameIn(Input):
    """A frame read from the control connection (its payload still sealed)."""

    ftype: FrameType
    payload: bytes


@dataclass(frozen=True)
class Tick(Input):
    """The clock (``time.monotonic()``), at least a few times a second while waiting."""

    now: float


@dataclass(frozen=True)
class ConnectionLost(Input):
    """The control connection failed or was closed (``error`` says how)."""

    error: StxError


@dataclass(frozen=True)
class SendFrame(Output):
    """Send these bytes (one whole frame) on the control connection."""

    data: bytes


@dataclass(frozen=True)
class Failed(Output):
    """The session ended with ``error``; it takes no more input."""

    error: StxError


@dataclass(frozen=True)
class Succeeded(Output):
    """The session ended well; it takes no more input."""


Handler = Callable[[Any, Any], list[Output]]


class Machine:
    """A table-driven state machine; subclasses set ``TABLE``, ``FAILED`` and ``_fail``."""

    #: (state, input type) -> handler(self, input) -> outputs
    TABLE: ClassVar[Mapping[tuple[enum.Enum, type[Input]], Handler]] = {}
    #: The state a failure moves to.
    FAILED: ClassVar[enum.Enum]

    state: enum.Enum

    def handle(self, event: Input) -> list[Output]:
        """Feed one input; return what to do. After ``Failed`` or ``Succeeded`` the session
        is over, and any further input is answered with nothing."""
        if self.terminal:
            return []
        handler = self.TABLE.get((self.state, type(event)))
        if handler is None:
            return self._fail(
                ProtocolError(f"unexpected {_name(event)} in state {self.state.value}")
            )
        try:
            return handler(self, event)
        except StxError as exc:
            return self._fail(exc)

    @property
    def terminal(self) -> bool:
        return self.state in self.TERMINAL

    #: States that take no more input.
    TERMINAL: ClassVar[frozenset[enum.Enum]] = frozenset()

    def _fail(self, error: StxError) -> list[Output]:
        """Move to ``FAILED``; the clean-up outputs and ``Failed(error)`` last."""
        self.state = self.FAILED
        return [Failed(error)]


def _name(event: Input) -> str:
    if isinstance(event, FrameIn):
        return event.ftype.name
    return type(event).__name__
