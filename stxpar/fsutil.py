"""Small file-system helpers shared by the key files, the state logs and the destination."""

from __future__ import annotations

import os


def read_at_most(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from ``fd`` (fewer at its end): a bounded read of a file that
    may be larger than anything valid."""
    chunks = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries durable (a create, rename or unlink in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process's umask, read without changing it (``Umask:`` in ``/proc/self/status``);
    where that is missing, set and restored at once (a race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
