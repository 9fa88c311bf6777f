"""stxpar: secure, parallel, resumable transfers of very large files (the STX protocol).

Programs use :func:`send` and :class:`Receiver`; the ``stx`` command wraps both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AuthError,
    ConnectError,
    IntegrityError,
    ProtocolError,
    RejectedError,
    StxError,
    UsageError,
)

if TYPE_CHECKING:
    from .config import SendOptions, TransferResult
    from .helper import serve_helper
    from .psk import generate as generate_key
    from .psk import load_key_file
    from .receiver import ReceivedFile, Receiver
    from .sender import send

# The API is imported on first use, so that worker processes (``stxpar.workers.*``) start
# without loading the coordinators and the handshake: start-up is on every transfer's
# critical path.
_LAZY = {
    "SendOptions": ("config", "SendOptions"),
    "TransferResult": ("config", "TransferResult"),
    "generate_key": ("psk", "generate"),
    "load_key_file": ("psk", "load_key_file"),
    "ReceivedFile": ("receiver", "ReceivedFile"),
    "Receiver": ("receiver", "Receiver"),
    "send": ("sender", "send"),
    "serve_helper": ("helper", "serve_helper"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'stxpar' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


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
    "serve_helper",
]
