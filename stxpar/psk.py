"""Pre-shared keys: generation and loading from a private file (never from argv)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .errors import UsageError

KEY_BYTES = 32
MIN_KEY_BYTES = 32
HEADER = "stx1-psk "


def generate() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def format_key(key: bytes) -> str:
    return HEADER + key.hex() + "\n"


def write_key_file(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a new random key with mode 0600; refuse to overwrite unless ``force``."""
    p = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(p, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{p} already exists (use --force to overwrite it)") from None
    except OSError as exc:
        raise UsageError(f"cannot create key file {p}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(format_key(generate()))
    return p


def parse_key(text: str, *, source: str) -> bytes:
    body = text.strip()
    if body.startswith(HEADER.strip()):
        body = body[len(HEADER.strip()) :].strip()
    try:
        key = bytes.fromhex(body)
    except ValueError:
        raise UsageError(
            f"{source} does not hold an stx key (make one with 'stx keygen')"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(
            f"{source} holds a {len(key) * 8}-bit key; at least {MIN_KEY_BYTES * 8} bits are required"
        )
    return key


def load_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file, refusing one that group or others can read (as ssh does)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # never block on a FIFO
    except FileNotFoundError:
        raise UsageError(f"key file {p} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read key file {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"key file {p} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(
                f"key file {p} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
                f" run: chmod 600 {p}"
            )
        text = os.read(fd, 4096).decode(errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read key file {p}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return parse_key(text, source=f"key file {p}")
