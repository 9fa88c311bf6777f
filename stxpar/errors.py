"""One root exception, split by whose fault it is; each carries a wire code and an exit code.

Exit codes (documented in ``stx --help`` and the README):

== =====================================================================
0  success
1  anything else (internal error, remote protocol violation)
2  usage error or bad local input (files, addresses, keys, options)
3  authentication failure (wrong key, forged or altered data)
4  connection failed after the retries
5  integrity or verification failure (digest mismatch, repeated CRC errors)
== =====================================================================

Foreign exceptions (``OSError``, ``zmq.ZMQError``, ``InvalidTag``, msgpack errors) are
translated into these at the boundary where they occur; the CLI prints ``str(exc)`` as one
line. Messages never contain key material.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_CONNECT = 4
EXIT_INTEGRITY = 5


class StxError(Exception):
    """Root of every error stxpar raises on purpose."""

    exit_code: int = EXIT_OTHER
    #: Code carried in an ERROR frame so the peer can map it back to a class.
    wire_code: int = 1


class LocalError(StxError):
    """The local side misbehaved or was misused (the caller's fault)."""


class UsageError(LocalError):
    """Bad options or bad local input: missing file, bad address, bad key file..."""

    exit_code = EXIT_USAGE
    wire_code = 2


class SourceChangedError(LocalError):
    """The local source file changed, or was replaced, while it was being sent (exit 5: what
    was sent would not be one version of the file)."""

    exit_code = EXIT_INTEGRITY
    #: Only between a sender's workers and their coordinator: never in an ERROR frame.
    wire_code = 7


class StateFileError(LocalError):
    """A local state file (the receiver's resume log) is damaged or not ours: the transfer
    starts over rather than trusting it."""


class RemoteError(StxError):
    """The peer misbehaved, or reported a failure."""


class ProtocolError(RemoteError):
    """The peer sent something the protocol does not allow (malformed, out of order, too big)."""

    exit_code = EXIT_OTHER
    wire_code = 1


class VersionError(ProtocolError):
    """The peer speaks another version of the protocol. Told to the peer even before it
    authenticated (a version string reveals nothing of the key)."""


class AuthError(RemoteError):
    """Authentication failed: wrong key, unknown key, forged or altered data. Fatal, no retry."""

    exit_code = EXIT_AUTH
    wire_code = 3


class ConnectError(RemoteError):
    """Could not reach the peer, or lost it, after all retries."""

    exit_code = EXIT_CONNECT
    wire_code = 4


class IntegrityError(RemoteError):
    """Data did not verify: digest mismatch or a block damaged too many times."""

    exit_code = EXIT_INTEGRITY
    wire_code = 5


class RejectedError(RemoteError):
    """The receiver refused the transfer (no space, busy, bad name...)."""

    exit_code = EXIT_OTHER
    wire_code = 6


_BY_WIRE_CODE: dict[int, type[StxError]] = {
    cls.wire_code: cls
    for cls in (ProtocolError, UsageError, AuthError, ConnectError, IntegrityError, RejectedError)
}


def error_from_code(code: int, message: str) -> StxError:
    """The exception class a code from one of our own workers stands for, ``message`` as it is."""
    if code == SourceChangedError.wire_code:
        return SourceChangedError(message)
    return _BY_WIRE_CODE.get(code, StxError)(message)


def error_from_wire(code: int, message: str, *, peer: str = "receiver") -> StxError:
    """Build the exception a peer's ERROR frame stands for (a local usage error becomes a rejection)."""
    cls = _BY_WIRE_CODE.get(code, ProtocolError)
    if cls is UsageError:
        cls = RejectedError
    return cls(f"{peer}: {message}" if message else f"{peer} reported an error")
