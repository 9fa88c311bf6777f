"""What one ``send()`` call keeps across its sessions, and when it tries again. Pure.

Theory of operation
-------------------
A run is every session (connection) one ``send()`` makes until the receiver's receipt. Across
them it keeps the ``Run``: the run id (a reconnect of the same run supersedes its old session
at the receiver), the run's ``BlockLedger`` (blocks known complete and their digests; each
session's METADATA_ACK reconciles it with the receiver's bitmap) and the counters the result
reports. ``Retry`` decides, after a session failed with a ConnectError, whether and when to
try again: exponential backoff with jitter (``SendOptions.backoff``), ``max_retries``
consecutive failed attempts (a session that completed blocks starts the count again), and
the run's ``--deadline``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .blocks import BlockLedger
from .errors import ConnectError
from .manifest import Manifest, chunks
from .send_session import DeadlineReached
from .sources import Sources

if TYPE_CHECKING:
    from .config import SendOptions


@dataclass
class Run:
    """What one ``send()`` call accumulates across sessions (reconnects)."""

    sources: Sources
    manifest: Manifest
    run_id: bytes
    ledger: BlockLedger
    blocks_sent: int = 0
    blocks_resumed: int = -1  # -1 until the first METADATA_ACK
    bytes_resumed: int = 0
    retransmits: int = 0
    reconnects: int = 0
    streams_replaced: int = 0
    #: data streams moved elsewhere by the receiver's ROUTES (a receiving helper joined/left)
    streams_moved: int = 0
    width: int = 0
    #: files with no data at all (empty, or only holes): done as soon as the run is
    empty_files: int = 0
    #: the whole-transfer digest the receipt confirmed (END's)
    digest: bytes = b""

    @classmethod
    def new(cls, sources: Sources, block_size: int) -> Run:
        manifest = sources.manifest(block_size)
        space = manifest.space
        empty = sum(1 for e in manifest.entries if e.kind == 0 and not e.extents)
        run = cls(sources, manifest, run_id=os.urandom(16), ledger=BlockLedger(space))
        run.empty_files = empty
        return run

    @functools.cached_property
    def chunks(self) -> list[bytes]:
        """The manifest's MANIFEST chunks, encoded once for every session of the run."""
        return chunks(self.manifest.entries, self.manifest.encodings)

    def files_done(self) -> int:
        """Files whose every block the receiver holds durably (files without data count)."""
        return self.ledger.entries_complete + self.empty_files

    @property
    def size(self) -> int:
        """Bytes of data the run moves (holes of sparse files are not sent)."""
        return self.manifest.data_bytes

    @property
    def total(self) -> int:
        return self.ledger.total

    @property
    def complete(self) -> int:
        return self.ledger.count

    @property
    def done_bytes(self) -> int:
        return self.ledger.bytes

    def resumed(self, held: int, held_bytes: int) -> bool:
        """The first session's METADATA_ACK: what the receiver held when the run began. True
        if this is that first one and the receiver held something (a resume)."""
        if self.blocks_resumed >= 0:
            return False
        self.blocks_resumed, self.bytes_resumed = held, held_bytes
        return held > 0

    def whole_digest(self) -> bytes:
        return self.digest or self.manifest.tree_digest(self.ledger)


@dataclass
class Retry:
    """After a failed session: the delay before the next attempt, or the run's final error.

    ``deadline``: ``time.monotonic()`` value of ``opts.deadline`` from the run's start, or
    None."""

    opts: SendOptions
    deadline: float | None
    failures: int = 0

    def after(self, exc: ConnectError, *, now: float, progressed: bool) -> float:
        """Seconds to wait before trying again after ``exc`` (``progressed``: the failed session
        completed blocks); raises the run's final ConnectError when it is over."""
        opts, deadline = self.opts, self.deadline
        if deadline is not None and now >= deadline:
            raise DeadlineReached(f"{exc} (deadline of {opts.deadline:g} s reached)") from None
        self.failures = 1 if progressed else self.failures + 1
        delay = opts.backoff.delay(self.failures - 1)
        if self.failures > opts.max_retries:
            raise ConnectError(f"{exc} (gave up after {self.failures} attempts)") from None
        if deadline is not None and now + delay > deadline:
            raise ConnectError(f"{exc} (deadline of {opts.deadline:g} s reached)") from None
        return delay
