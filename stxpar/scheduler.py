"""The sender's data-phase scheduler: which worker sends which block next. Pure.

Theory of operation
-------------------
Work is one shared pull queue of the block ids still needed (ids of ``blocks.BlockSpace``:
one file's blocks today, any block of any file of a tree later). A worker asks for work
(``take``) and gets a small batch from the front of the queue, so that a slow stream never
holds the tail: ``max(1, min(16, queued // (2 * live workers)))`` blocks. A worker that asks
while the queue is empty but blocks are still outstanding elsewhere is *parked*; it is woken
(``wake``) when blocks come back to the queue. A block is *assigned* to the worker it was
handed to until the receiver acknowledged it as durable and its digest is known
(``acked``: it is then recorded in the run's ``BlockLedger``, the one record of what is
complete). A worker that is lost (``retire``) has its unfinished blocks put back at the
front of the queue, in block order, before anything else is sent. When the ledger is
complete every asking worker is told it is done.

The scheduler knows nothing of processes, sockets or time: the supervisor decides that a
worker is lost, the driver carries the answers to the workers.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

from .blocks import BlockLedger
from .digest import BLOCK_DIGEST_LEN
from .messages import Blocks, Done

#: The largest batch handed out at once, in full blocks' worth of bytes: a batch of a tree's
#: small files holds as many blocks as fit in that many bytes (up to ``MAX_BATCH_BLOCKS``), so
#: small files do not cost a request each.
MAX_BATCH = 16
MAX_BATCH_BLOCKS = 1024
#: Under a rate limit, a batch holds at most this many seconds of a worker's share (at least
#: one block), so that a change of the share (a worker done, one joining) reaches every
#: worker within about that long.
PACED_BATCH_S = 1.0


@dataclass
class _Slot:
    """What the scheduler knows of one worker."""

    assigned: set[int] = field(default_factory=set)
    done: bool = False  # told that there is no more work
    sent: int = 0  # blocks it sent, as of its latest report
    said_last: bool = False  # its final count has arrived


class Scheduler:
    """The queue of needed blocks, batches, parked and assigned sets, and completion.

    ``needed``: the block ids to send, in order; ``ledger``: the run's ledger (blocks held by
    the receiver already recorded in it). Workers are named by their slot (an int)."""

    def __init__(self, needed: Iterable[int], ledger: BlockLedger) -> None:
        self.queue: collections.deque[int] = collections.deque(needed)
        self.ledger = ledger
        self.slots: dict[int, _Slot] = {}
        self.live: set[int] = set()
        self.parked: list[int] = []
        #: blocks sent by every worker of the run (the workers' running counts, summed)
        self.blocks_sent = 0
        #: ``--limit-rate``: bytes a second for the whole transfer, shared evenly by the
        #: workers that have work (0: no limit); each batch carries its worker's share
        self.rate = 0

    # -- workers
    def add_worker(self, slot: int) -> None:
        """A worker that may be given work from now on."""
        self.slots[slot] = _Slot()
        self.live.add(slot)

    def is_live(self, slot: int) -> bool:
        return slot in self.live

    def retire(self, slot: int) -> list[int]:
        """No more work for ``slot`` (lost, or sent home): its unfinished blocks go back to the
        front of the queue, in block order; returns them."""
        self.live.discard(slot)
        st = self.slots.get(slot)
        if slot in self.parked:
            self.parked.remove(slot)
        if st is None:
            return []
        has = self.ledger.has
        back = sorted(b for b in st.assigned if not has(b))
        self.queue.extendleft(reversed(back))
        st.assigned.clear()
        return back

    # -- work
    @property
    def complete(self) -> bool:
        return self.ledger.complete

    def take(self, slot: int) -> Blocks | Done | None:
        """The answer to ``slot``'s request for work: a batch, ``Done`` (nothing left at all,
        or a worker that is not live), or None (parked until blocks come back)."""
        st = self.slots.get(slot)
        if st is None or slot not in self.live:
            return Done()
        queue = self.queue
        if queue:
            space = self.ledger.space
            k = max(1, min(MAX_BATCH, len(queue) // (2 * max(1, len(self.live)))))
            budget = k * space.block_size
            pace = self.pace()
            if pace:
                budget = min(budget, max(space.block_size, int(pace * PACED_BATCH_S)))
            taken: list[int] = []
            while queue and budget > 0 and len(taken) < MAX_BATCH_BLOCKS:
                block = queue.popleft()
                taken.append(block)
                budget -= space.length(block)
            batch = tuple(taken)
            st.assigned.update(batch)
            if slot in self.parked:
                self.parked.remove(slot)
            return Blocks(batch, pace)
        if self.ledger.complete:
            st.done = True
            return Done()
        if slot not in self.parked:
            self.parked.append(slot)
        return None

    def pace(self) -> int:
        """One worker's share of ``rate`` now: the workers that are live, not done and not
        parked (waiting for blocks to come back) share it evenly; 0 without a limit."""
        if not self.rate:
            return 0
        busy = sum(1 for s in self.live if s not in self.parked and not self.slots[s].done)
        return max(1, self.rate // max(1, busy))

    def wake(self) -> list[int]:
        """The parked workers to ask again now that blocks are queued (none otherwise)."""
        if not (self.parked and self.queue):
            return []
        waiting, self.parked = self.parked, []
        return waiting

    def release_parked(self) -> list[int]:
        """The parked workers, unparked and marked done (the run is complete: tell them)."""
        waiting, self.parked = self.parked, []
        for slot in waiting:
            self.slots[slot].done = True
        return waiting

    def is_done(self, slot: int) -> bool:
        st = self.slots.get(slot)
        return st is not None and st.done

    # -- reports
    def acked(self, slot: int, blocks: Iterable[tuple[int, bytes]]) -> int:
        """The receiver acknowledged ``blocks`` (id, digest) on ``slot``'s stream as durable:
        a block with its digest is complete (recorded in the ledger); one without a digest
        (``b""``: the worker never sent it) is not. Returns how many blocks became complete."""
        st = self.slots.get(slot)
        ledger = self.ledger
        total = ledger.total
        new = 0
        for block, digest in blocks:
            if not 0 <= block < total or ledger.has(block):
                continue
            if len(digest) == BLOCK_DIGEST_LEN:
                ledger.record(block, digest)
                new += 1
            if st is not None:
                st.assigned.discard(block)
        return new

    def count_sent(self, slot: int, count: int, *, last: bool = False) -> None:
        """A worker's running count of blocks sent (``last``: its final count)."""
        st = self.slots.get(slot)
        if st is None:
            return
        if last:
            st.said_last = True
        if count > st.sent:
            self.blocks_sent += count - st.sent
            st.sent = count

    def said_last(self, slot: int) -> bool:
        st = self.slots.get(slot)
        return st is not None and st.said_last
