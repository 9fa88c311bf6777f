"""The receiver's session registry: who is receiving what, and what was received.

Theory of operation
-------------------
Every admitted session is a *link* (``control.ControlHandler``) registered here by its session
id (so that a JOIN finds its keys and its partial, and a worker's report reaches it) and by
its final path (so that one name is received by one session at a time). Admission reserves
the name first: a second session of the same name is refused while the first is admitted or
being admitted, unless it is the same source (``file_id``): then the old session is
*superseded* and the new one takes over its name and the destination's lock on it
(``destination.NameLock``, held here from admission until the name is released).

Completed transfers are remembered in memory (``RECENT_KEEP`` of them, each at most
``RECENT_MAX_BLOCKS`` blocks) with their block ledgers, so that a sender whose receipt was lost
is answered "complete" instead of sending the file again; ``completed`` lists the most
recent ``ReceivedFile`` records. One lock guards the maps; it is never held across file I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .blocks import BlockLedger
from .errors import AuthError, RejectedError
from .keyschedule import SessionKeys
from .messages import Landed, StreamFailed
from .records import verify_join
from .state import Identity
from .transfer import Transfer
from .wire import Join

if TYPE_CHECKING:
    from .partials import Opened
    from .treefiles import TreeOpened

#: Completed transfers remembered (in memory only) so that a sender that missed the receipt
#: gets it again instead of sending the whole file once more.
RECENT_KEEP = 16
RECENT_MAX_BLOCKS = 1 << 18
#: How many ``ReceivedFile`` records ``Receiver.completed`` keeps (the most recent ones).
COMPLETED_KEEP = 1000


class Releasable(Protocol):
    """A name lock (``destination.NameLock``) or a tree's locks (``control.RootLocks``)."""

    def release(self) -> None: ...


@dataclass
class ReceivedFile:
    """One completed transfer, as the receiver saw it."""

    path: str
    name: str
    size: int
    digest: str
    seconds: float
    blocks_total: int
    streams: int
    bytes_resumed: int = 0
    files: int = 1
    dirs: int = 0
    symlinks: int = 0
    #: The sender's address.
    peer: str = ""
    #: With helpers (``stx recv --cluster``): data streams served per host.
    hosts: dict[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        extra = {} if self.hosts is None else {"hosts": dict(self.hosts)}
        return {
            **extra,
            "peer": self.peer,
            "bytes_resumed": self.bytes_resumed,
            "file": self.path,
            "bytes": self.size,
            "seconds": round(self.seconds, 3),
            "blocks_total": self.blocks_total,
            "streams": self.streams,
            "digest": self.digest,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
        }


class CompletedList(list[ReceivedFile]):
    """``Receiver.completed``: the most recent ``keep`` transfers (a long-running receiver must
    not grow without bound), plus ``total``, how many there were in all."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep
        self.total = 0

    def append(self, item: ReceivedFile) -> None:
        super().append(item)
        self.total += 1
        if len(self) > self.keep:
            del self[: len(self) - self.keep]


class Link(Protocol):
    """An admitted session, as the registry uses it (``control.ControlHandler``)."""

    keys: SessionKeys
    lock: threading.Lock
    streams: set[int]

    @property
    def md(self) -> Transfer: ...

    @property
    def opened(self) -> Opened | TreeOpened: ...

    def data_target(self) -> tuple[str, bool, str, tuple[int, int] | None]: ...

    def routed_away(self, stream: int) -> bool: ...

    def deliver(self, report: Landed | StreamFailed) -> None: ...

    def supersede(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class StreamTarget:
    """Where a verified data stream goes: what its worker needs."""

    session_id: bytes
    stream: int
    secret: bytes
    path: str
    md: Transfer
    inode: tuple[int, int] | None
    tree: bool = False
    layout: str = ""


@dataclass(frozen=True)
class _Recent:
    identity: Identity | bytes
    ledger: BlockLedger


_RESERVED: Any = object()


class SessionRegistry:
    """Active sessions by id and by final path, the name locks, recent completions."""

    def __init__(self, *, completed_keep: int = COMPLETED_KEEP) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[bytes, Link] = {}
        self._active: dict[Path, Link] = {}  # final path -> link (or _RESERVED)
        self._locks: dict[Path, Releasable] = {}
        self._recent: OrderedDict[Path, _Recent] = OrderedDict()
        self.completed = CompletedList(completed_keep)

    # ------------------------------------------------------------ names

    def reserve(self, final: Path, file_id: bytes, name: str) -> Link | None:
        """Reserve ``final`` for a new session; the session it supersedes (same ``file_id``),
        already unregistered, or None. RejectedError while another one has the name."""
        with self._lock:
            old = self._active.get(final)
            if old is _RESERVED or (old is not None and old.md.file_id != file_id):
                raise RejectedError(f"a transfer of {name} is already in progress")
            self._active[final] = _RESERVED
            if old is not None:
                self._sessions.pop(old.keys.session_id, None)
        return old

    def has_lock(self, final: Path) -> bool:
        with self._lock:
            return final in self._locks

    def set_lock(self, final: Path, lock: Releasable) -> None:
        with self._lock:
            self._locks[final] = lock

    def activate(self, final: Path, link: Link) -> None:
        with self._lock:
            self._active[final] = link
            self._sessions[link.keys.session_id] = link

    def unreserve(self, final: Path) -> None:
        """Admission failed: free the name (and its lock)."""
        with self._lock:
            self._active.pop(final, None)
            lock = self._locks.pop(final, None)
        if lock is not None:
            lock.release()

    def drop(self, link: Link) -> None:
        """No more streams or reports for this session."""
        with self._lock:
            if self._sessions.get(link.keys.session_id) is link:
                del self._sessions[link.keys.session_id]

    def forget(self, link: Link, final: Path) -> None:
        """Drop the session and free its name (the lock file removed) unless a newer session
        took it over."""
        lock = None
        with self._lock:
            if self._sessions.get(link.keys.session_id) is link:
                del self._sessions[link.keys.session_id]
            if self._active.get(final) is link:
                del self._active[final]
                lock = self._locks.pop(final, None)
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------ completions

    def remember(self, final: Path, identity: Identity | bytes, ledger: BlockLedger) -> None:
        if ledger.total > RECENT_MAX_BLOCKS:
            return
        with self._lock:
            self._recent[final] = _Recent(identity, ledger)
            self._recent.move_to_end(final)
            while len(self._recent) > RECENT_KEEP:
                self._recent.popitem(last=False)

    def remembered(self, final: Path, identity: Identity | bytes) -> BlockLedger | None:
        with self._lock:
            recent = self._recent.get(final)
        return recent.ledger if recent is not None and recent.identity == identity else None

    # ------------------------------------------------------------ streams and reports

    def accept_stream(self, join: Join) -> StreamTarget:
        """The session a JOIN belongs to, its key proven; AuthError otherwise."""
        with self._lock:
            link = self._sessions.get(join.session_id)
        if link is None:
            raise AuthError("data stream for an unknown session")
        secret = link.keys.stream_secret(join.stream)
        verify_join(
            stream_secret=secret, session_id=join.session_id, stream=join.stream, tag=join.mac
        )
        if link.routed_away(join.stream):
            raise AuthError(f"stream {join.stream} refused (routed to a helper)")
        md = link.md
        with link.lock:
            if join.stream in link.streams or len(link.streams) >= 4 * md.streams + 64:
                raise AuthError(f"stream {join.stream} refused (repeated or too many)")
            link.streams.add(join.stream)
            path, tree, layout, inode = link.data_target()
        return StreamTarget(
            session_id=join.session_id,
            stream=join.stream,
            secret=secret,
            path=path,
            md=md,
            inode=inode,
            tree=tree,
            layout=layout,
        )

    def deliver(self, report: Landed | StreamFailed) -> None:
        """A worker's report, to its session (none: ignored)."""
        with self._lock:
            link = self._sessions.get(report.session_id)
        if link is not None:
            link.deliver(report)

    # ------------------------------------------------------------ the whole receiver

    def session_ids(self) -> list[bytes]:
        with self._lock:
            return list(self._sessions)

    def stop_all(self) -> None:
        """Tell every session that the receiver stops (each ends as a lost connection)."""
        with self._lock:
            links = list(self._sessions.values())
        for link in links:
            link.stop()

    def snapshot(self) -> dict[str, Any]:
        """For tests and status: ``sessions`` (how many), ``names`` (final names held, being
        admitted included), ``streams`` (session id -> data streams accepted)."""
        with self._lock:
            links = list(self._sessions.items())
            names = [p.name for p in self._active]
        return {
            "sessions": len(links),
            "names": names,
            "streams": {sid: len(link.streams) for sid, link in links},
        }
