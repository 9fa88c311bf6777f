"""stxpar: secure, parallel, resumable transfers of very large files (the STX protocol).

Programs use :func:`send` and :class:`Receiver`; the ``stx`` command wraps both.
"""

from __future__ import annotations

from .config import SendOptions, TransferResult
from .errors import (
    AuthError,
    ConnectError,
    IntegrityError,
    ProtocolError,
    RejectedError,
    StxError,
    UsageError,
)
from .psk import generate as generate_key
from .psk import load_key_file
from .receiver import ReceivedFile, Receiver
from .sender import send

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "ConnectError",
    "IntegrityError",
    "ProtocolError",
    "ReceivedFile",
    "Receiver",
    "RejectedError",
    "SendOptions",
    "StxError",
    "TransferResult",
    "UsageError",
    "generate_key",
    "load_key_file",
    "send",
]
