"""Where data streams go when a receiver has helpers (ROUTES, docs/protocol.md §6). Pure.

Theory of operation
-------------------
A session's stream ids (``4 x streams + 64`` of them) are dealt over the places that serve
them: place 0 is the receiver, place ``k`` its ``k``-th helper. ``round_robin`` makes the
first table, each place weighted by its worker processes. While the session runs the table
changes in two ways, each a ``Delta`` (stream id -> its place before and after):

- ``grow``: a helper joins. It takes its weighted share of the streams open at every other
  place (the sender moves them) and of the receiver's ids nobody used (its own, for new
  streams).
- ``redeal``: a helper dies or drops out. Its ids are dealt over the places left, weighted:
  the streams the sender had open there go to the survivors and the receiver alike.

The sender's side (``pick_stream``): ids are used once per session; a stream that replaces
one moved by ROUTES takes the lowest unused id routed where it moved.
"""

from __future__ import annotations

from collections.abc import Sequence

from .wire import Routes

#: A change of routes: stream id -> (its place before, after).
Delta = dict[int, tuple[int, int]]


def spread(items: Sequence[int], k: int) -> list[int]:
    """``k`` of ``items`` (in order), evenly spaced."""
    n = len(items)
    k = max(0, min(k, n))
    return [items[(2 * j + 1) * n // (2 * k)] for j in range(k)]


def share(count: int, weight: int, total: int) -> int:
    """``count`` x ``weight`` / ``total``, rounded half up."""
    return (2 * count * weight + total) // (2 * total) if total > 0 else 0


def grow(
    table: bytes,
    weights: Sequence[int],
    new: int,
    open_at: dict[int, set[int]],
    taken: set[int],
    floor: int = -1,
) -> tuple[Delta, set[int]]:
    """Place ``new`` (a helper that joined during the session, ``weights[new]`` worker
    processes; ``weights[k]`` 0 for a place no longer served) takes its weighted share.

    From every other place ``k`` it takes that share of the streams open there
    (``open_at[k]``; at place 0, the receiver, the streams its port took), evenly spaced:
    the sender moves those. From the receiver it also takes that share of the ids above
    ``floor`` that nobody took yet (not in ``taken``): the new helper's own, for new streams. Returns the changes,
    and the ids among them nobody took (the only ones whose secrets the new helper is
    given)."""
    total = sum(weights)
    delta: Delta = {}
    fresh: set[int] = set()
    if total <= 0 or weights[new] <= 0:
        return delta, fresh
    ids: dict[int, list[int]] = {}
    for s, k in enumerate(table):
        ids.setdefault(k, []).append(s)
    for k, mine in sorted(ids.items()):
        if k == new or weights[k] <= 0:
            continue
        open_k = [s for s in mine if s in open_at.get(k, set())]
        for s in spread(open_k, share(len(open_k), weights[new], total)):
            delta[s] = (k, new)
        if k == 0:
            free = [s for s in mine if s > floor and s not in taken]
            for s in spread(free, share(len(free), weights[new], total)):
                delta[s] = (0, new)
                fresh.add(s)
    return delta, fresh


def redeal(table: bytes, gone: int, weights: Sequence[int]) -> Delta:
    """The ids of place ``gone`` (a helper that died) dealt round-robin over the places that
    are left, each weighted by ``weights[k]`` (0: not a place any more; the receiver,
    place 0, always takes a share when it has workers), in id order: the streams the
    sender has open there go to all of them, not only to the receiver."""
    mine = [s for s, k in enumerate(table) if k == gone]
    w = [0 if k == gone else max(0, x) for k, x in enumerate(weights)]
    if not any(w):
        w = [1] + [0] * (len(w) - 1)
    cycle = round_robin(w, len(mine))
    return {s: (gone, cycle[i]) for i, s in enumerate(mine)}


def round_robin(weights: Sequence[int], n: int) -> bytearray:
    """Stream ids ``0..n-1`` dealt over places ``0..len(weights)-1`` (place 0 is this host),
    each ``weights[k]`` times per round, interleaved."""
    cycle: list[int] = []
    for r in range(max(weights, default=0)):
        cycle.extend(k for k, w in enumerate(weights) if w > r)
    if not cycle:
        return bytearray(n)
    return bytearray(cycle[s % len(cycle)] for s in range(n))


def pick_stream(routes: Routes | None, used: set[int], start: int, place: str | None | bool) -> int:
    """The id of a new data stream: ids are used once per session, from ``start`` (the lowest
    not used) up. A stream that replaces one moved by ROUTES (``place``: where it moved, a
    helper's ``host:port`` or None for the receiver; False for any other new stream) takes
    the lowest id not used that the routes send there (the receiver gave that place those
    ids' secrets); any other stream, or when there is none, the lowest id not used."""
    if place is not False and routes is not None:
        for s in range(start, len(routes.table)):
            if s not in used and routes.place(s) == place:
                return s
    while start in used:
        start += 1
    return start
