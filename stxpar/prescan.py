"""The sender's walk of a tree, in a process forked as ``stx send`` starts, while the CLI goes on
importing the rest of stxpar.

Theory of operation
-------------------
``stx send`` spends its first tenth of a second importing (ZeroMQ, the cryptography bindings,
the protocol's messages) and then walks what it was asked to send; a tree of ten thousand
files takes about half as long again to walk, and the receiver waits for both, one after the
other. ``start`` forks this process before those imports: the child walks (``scan.scan``, its
warnings printed as they come), writes the result to a pipe (``marshal``: a column per field) and
exits; the parent imports meanwhile, and ``Prescan.result`` reads the walk back when the
sender needs it (``sources.open_sources``). The two run on two cores.

Only where it helps and is safe: what ``scan`` walks (a directory, several PATHs; one regular
file is pinned by a descriptor of the sender's own, ``source.SourceFile``), and only where the
process may fork (Linux, one thread: ``forking.can_fork``). The child holds nothing secret (the
key is read later, by the parent) and nothing else: it only walks. A UsageError in the child
(a PATH that cannot be sent, a file that cannot be read) is raised by ``result`` with the same
message; any other failure, or a child that dies, is a RuntimeError there. ``close`` kills
and reaps a child whose result was not read (the parent failed first, or was interrupted).
"""

from __future__ import annotations

import fcntl
import gc
import marshal
import os
import signal
import stat
import sys
from collections.abc import Sequence
from typing import Any

from .errors import UsageError
from .fileref import FileRef
from .forking import can_fork
from .gcpause import no_collection
from .manifest import KIND_OF, Entry
from .scan import Scan, Warn, scan

#: The pipe's buffer (Linux's default limit for a process without privileges).
_PIPE_SIZE = 1 << 20


class Prescan:
    """A walk going on in a child process (``start``)."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd

    def result(self) -> Scan:
        """The child's ``Scan`` (waits for it); UsageError as the walk raised it; RuntimeError
        if the child failed otherwise or died."""
        chunks = []
        try:
            while True:
                data = os.read(self._fd, 1 << 20)
                if not data:
                    break
                chunks.append(data)
        finally:
            self.close()
        with no_collection():  # tens of thousands of new objects, none of them garbage
            try:
                kind, body = marshal.loads(b"".join(chunks))
            except (EOFError, ValueError, TypeError):
                raise RuntimeError("the walk of the PATHs ended without a result") from None
            if kind == "usage":
                raise UsageError(body)
            if kind != "scan":
                raise RuntimeError(f"the walk of the PATHs failed: {body}")
            return _unflatten(body)

    def close(self) -> None:
        """Stop and reap the child (if still there) and close the pipe."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.pid:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = 0


def start(paths: Sequence[str | os.PathLike[str]], warn: Warn | None) -> Prescan | None:
    """Fork a child that walks ``paths`` (see the module docstring); None where that does not
    apply (one regular file, a process that may not fork) or the fork failed: the sender then
    walks itself."""
    if not _walked(paths) or not can_fork():
        return None
    r, w = os.pipe()
    try:  # the whole walk of a big tree in one go, not 64 KiB a switch
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # the child: never returns
        os.close(r)
        _child(w, paths, warn)
    os.close(w)
    return Prescan(pid, r)


def _walked(paths: Sequence[str | os.PathLike[str]]) -> bool:
    """Whether ``sources.open_sources`` walks ``paths`` (anything but one regular file)."""
    if len(paths) != 1:
        return bool(paths)
    try:
        return not stat.S_ISREG(os.stat(paths[0]).st_mode)
    except OSError:
        return False  # the sender says what is wrong with it, as it would have


def _child(fd: int, paths: Sequence[str | os.PathLike[str]], warn: Warn | None) -> None:
    gc.disable()  # a short life that makes objects and drops none
    code = 1
    try:
        try:
            payload: tuple[str, Any] = ("scan", _flatten(scan(paths, warn=warn)))
        except UsageError as exc:
            payload = ("usage", str(exc))
        except BaseException as exc:  # a bug, a signal: the parent says so
            payload = ("failed", f"{type(exc).__name__}: {exc}")
        view = memoryview(marshal.dumps(payload, 2))  # (2: no object references, faster)
        while view:
            view = view[os.write(fd, view) :]
        code = 0
    except BaseException:
        pass  # the parent is gone, or interrupted us: nothing to tell
    finally:
        try:
            sys.stderr.flush()  # the warnings
        finally:
            os._exit(code)


def _flatten(s: Scan) -> tuple[Any, ...]:
    """``s`` as what ``marshal`` takes quickly: a column per field (a list of ints or strings
    each), not a tuple per entry."""
    kinds, *fields = zip(*s.entries, strict=True) if s.entries else [()] * 8
    refs = s.sources
    return (
        list(map(int, kinds)),  # a Kind is not marshal's
        fields,
        list(refs),
        list(zip(*refs.values(), strict=True)) if refs else [()] * 6,
        s.skipped,
        (s.files, s.dirs, s.symlinks, s.bytes, s.data_bytes, s.bytes_sparse),
    )


def _unflatten(body: Any) -> Scan:
    """What ``_flatten`` made, back (from our own child: trusted as such)."""
    kinds, fields, index, refs, skipped, counts = body
    entries = list(map(Entry, map(KIND_OF.__getitem__, kinds), *fields))
    sources = dict(zip(index, map(FileRef, *refs), strict=True))
    files, dirs, symlinks, apparent, data, sparse = counts
    return Scan(
        entries=entries,
        sources=sources,
        skipped=skipped,
        files=files,
        dirs=dirs,
        symlinks=symlinks,
        bytes=apparent,
        data_bytes=data,
        bytes_sparse=sparse,
    )
