"""Pre-shared keys: generation and loading from a private file (never from argv)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from .errors import UsageError
from .fsutil import fsync_dir

KEY_BYTES = 32
MIN_KEY_BYTES = 32
HEADER = "stx1-psk "


def generate() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def format_key(key: bytes) -> str:
    return HEADER + key.hex() + "\n"


def write_key_file(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a new random key with mode 0600; refuse to overwrite unless ``force``.

    The key never goes through whatever is at ``path``: it is written to a new file made with
    O_CREAT|O_EXCL|O_NOFOLLOW in the same directory, fsynced, and then renamed over ``path``
    (``force``) or linked to it (without ``force``: link() fails on any existing entry,
    a dangling symlink included). rename() replaces a symlink planted at ``path`` itself,
    never the file it points to, so ``--force`` cannot be turned into a write into another
    user's file; and no one sees a half-written key.
    """
    p = Path(path)
    if not force and os.path.lexists(p):
        raise UsageError(f"{p} already exists (use --force to overwrite it)")
    directory = p.parent
    tmp = directory / f".{p.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise UsageError(f"cannot create key file {p}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            data = format_key(generate()).encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.rename(tmp, p)
        else:
            try:
                os.link(tmp, p, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # no hard links on this file system: the check above, then rename
                if os.path.lexists(p):
                    raise FileExistsError from None
                os.rename(tmp, p)
        with contextlib.suppress(OSError):  # durability is best effort here
            fsync_dir(directory)
    except FileExistsError:
        raise UsageError(f"{p} already exists (use --force to overwrite it)") from None
    except OSError as exc:
        raise UsageError(f"cannot create key file {p}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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
    """Read a key file, refusing one that group or others can read or that another user owns
    (as ssh does for private keys).

    A symlink is followed, as ssh does (keys kept in a vault or a config tree are often
    linked), and every check is made with fstat on what was opened, so the file read is the
    file checked: a link to a file the user does not own is refused like the file itself.
    The owner check matters because anyone can make a 0600 file: a key file another user owns
    (planted in a shared or writable directory) would let that user choose the key, or read
    what it protects. Root's files are accepted, as ssh does.
    """
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
        if st.st_uid not in (os.geteuid(), 0):
            raise UsageError(
                f"key file {p} is owned by another user (uid {st.st_uid}); a key file must be yours"
            )
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
