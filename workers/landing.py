"""How a receiver worker puts verified plaintext blocks into the partial file.

Theory of operation
-------------------
Every stream of a transfer writes into one partial file, at the offsets of its blocks.
``use_mapped_landing`` picks the way by the transfer's stream count (``STX_LANDING`` may force
one); ``Lander`` is one stream's writer: ``pwrite`` under a short-waited ``flock`` (few
streams: the CPU a contended inode lock would burn goes to the other streams), or copies into
shared mappings of the block's range (many streams: page faults take no inode lock). Either
way nothing but plaintext whose tag verified is written, and the worker's ``fdatasync`` makes
it durable before anything is acknowledged. Only ``os``, ``mmap`` and ``fcntl``: no threads,
no sockets.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import time

from stxpar.destination import disk_error
from stxpar.errors import StxError

#: Transfers with at least this many streams land blocks through shared mappings (Lander).
MAPPED_LANDING_STREAMS = 4
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: Longest wait for the landing ``flock`` before a stream writes without it (``Lander``).
LOCK_WAIT_S = 2.0
#: Longest sleep between two tries of a busy landing lock.
LOCK_POLL_MAX_S = 250e-6
#: After a lock wait ran out, the stream writes unlocked this long before it tries again.
LOCK_RETRY_S = 10.0
_PAGE = mmap.PAGESIZE


def use_mapped_landing(streams: int, override: str | None = None) -> bool:
    """How a transfer's blocks land: through shared mappings when it has
    ``MAPPED_LANDING_STREAMS`` streams or more, else with ``pwrite`` under ``flock``.
    ``override`` (the ``STX_LANDING`` environment variable of the receiver): ``mmap`` or
    ``pwrite`` forces one way; anything else, or nothing, chooses by the stream count."""
    if override == "mmap":
        return True
    if override == "pwrite":
        return False
    return streams >= MAPPED_LANDING_STREAMS


class Lander:
    """Puts verified plaintext blocks into the partial file, in one of two ways.

    Every stream of a transfer writes into the same file, and buffered writes into one file
    serialise on the inode's lock in the kernel: one ``pwrite`` at a time, whatever the number
    of streams.

    - ``pwrite`` under an exclusive ``flock`` on this stream's own descriptor (the default for
      up to 3 streams). A writer that finds the inode lock taken spins on its CPU while the
      holder copies; waiting on the ``flock`` sleeps instead, so that CPU goes to a stream that
      is receiving or decrypting. On the 2-core test machine, 2 receiver workers landing a
      2 GiB transfer this way used 0.87 s of CPU per GB against 1.2 through mappings, and the
      transfer ran 20% faster (docs/tuning.md). A file system without ``flock`` writes unlocked.
    - ``mapped`` (4 streams or more): the block is copied into a shared mapping of its byte
      range, faulted in first with one ``MADV_POPULATE_WRITE`` call. Page faults take no inode
      lock, so streams land in parallel; each new page is zeroed before the copy, which costs
      more CPU per GB. On a 16-core machine 8 streams landed at 4.3 GB/s this way against 2.5
      for ``pwrite`` (``perf/landing.py``), and an 8-worker loopback transfer ran at 2251 MB/s
      against 1493 (docs/tuning.md). Only plaintext whose tag verified is ever copied in;
      ``fdatasync`` makes mapped writes durable like written ones. Where a range cannot be
      mapped or backed (a file system that cannot map, a full disk: the populate call fails
      cleanly, no SIGBUS) the block goes through ``pwrite``, which reports the error.
    """

    def __init__(self, fd: int, *, mapped: bool = False, lock_wait: float = LOCK_WAIT_S) -> None:
        self.fd = fd
        self.locking = True
        self.mapped = mapped
        self.mapped_blocks = 0  # blocks that went in through a mapping
        self.lock_wait = lock_wait
        #: Until then this stream writes without the lock (its holder did not let go in time).
        self.unlocked_until = 0.0
        self.lock_timeouts = 0

    def write(self, plain: memoryview, offset: int) -> None:
        if self.mapped and plain and self._write_mapped(plain, offset):
            return
        locked = self._acquire()
        try:
            written = os.pwrite(self.fd, plain, offset)
        except OSError as exc:
            raise write_error(exc) from None
        finally:
            if locked:
                self._lock(fcntl.LOCK_UN)
        if written != len(plain):
            raise write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def _write_mapped(self, plain: memoryview, offset: int) -> bool:
        """Copy into a shared mapping of the block's range, populated first (no inode lock).
        False when mapping is not possible here; ``pwrite`` then lands it (and reports a full
        disk, which makes the populate call fail)."""
        start = offset - offset % _PAGE
        skip = offset - start
        n = len(plain)
        try:
            m = mmap.mmap(self.fd, skip + n, flags=mmap.MAP_SHARED, offset=start)
        except (OSError, ValueError):
            self.mapped = False
            return False
        try:
            try:
                m.madvise(MADV_POPULATE_WRITE, 0, skip + n)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self.mapped = False  # a kernel without MADV_POPULATE_WRITE
                return False
            m[skip : skip + n] = plain
            self.mapped_blocks += 1
            return True
        finally:
            m.close()

    def _acquire(self) -> bool:
        """Take the exclusive ``flock`` within ``lock_wait`` seconds; False to write unlocked.

        The lock only saves CPU (``pwrite`` of disjoint ranges is correct without it), so it is
        never worth waiting for long: a holder that does not let go (a worker stopped with
        SIGSTOP, a paused VM, a same-user process that locked the partial file) must not
        stall every stream of the file. A blocking ``flock`` cannot time out, so a busy lock is
        polled, with sleeps that grow from 20 µs to ``LOCK_POLL_MAX_S`` (a holder writes one
        block, a few ms at most). Past the wait this stream writes unlocked for
        ``LOCK_RETRY_S`` before it tries the lock again."""
        if not self.locking or time.monotonic() < self.unlocked_until:
            return False
        pause = 20e-6
        deadline = 0.0
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError:
                self.locking = False  # no flock here (some network file systems): write unlocked
                return False
            now = time.monotonic()
            if not deadline:
                deadline = now + self.lock_wait
            elif now >= deadline:
                self.lock_timeouts += 1
                self.unlocked_until = now + LOCK_RETRY_S
                return False
            time.sleep(pause)
            pause = min(2 * pause, LOCK_POLL_MAX_S)

    def _lock(self, op: int) -> bool:
        try:
            fcntl.flock(self.fd, op)
            return True
        except OSError:
            self.locking = False  # no flock here (some network file systems): write unlocked
            return False


def write_error(exc: OSError) -> StxError:
    return disk_error(exc, "receiver write failed")
