"""Routes that change while a session runs (issue 14): a receiving helper that joins takes
its weighted share (``routing.grow``), a dead one's stream ids are dealt over the places
left (``routing.redeal``), and the sender picks the id of a moved stream where the routes
send it (``routing.pick_stream``). Pure functions, no I/O."""

from __future__ import annotations

from collections import Counter

from stxpar.routing import grow, pick_stream, redeal, round_robin, share, spread
from stxpar.wire import Routes


def test_spread_and_share() -> None:
    assert spread([1, 2, 3, 4, 5, 6], 2) == [2, 5]
    assert spread([7], 1) == [7]
    assert spread([1, 2, 3], 0) == [] and spread([], 3) == []
    assert spread([1, 2], 5) == [1, 2]  # never more than there are
    assert share(2, 1, 3) == 1  # 2/3 rounds up
    assert share(4, 1, 3) == 1 and share(5, 1, 3) == 2
    assert share(3, 1, 0) == 0


def test_a_joining_helper_takes_its_share_of_open_streams_and_free_ids() -> None:
    # The receiver (place 0) and helper A (place 1), one worker each; helper B (place 2) joins
    # with one worker. The sender has streams 0-3 open: 0, 2 here, 1, 3 at A.
    table = bytes(round_robin([1, 1], 64))
    open_at = {0: {0, 2}, 1: {1, 3}, 2: set()}
    taken = {0, 1, 2, 3} | {s for s in range(64) if table[s] == 1}  # A holds its ids' secrets
    delta, fresh = grow(table, [1, 1, 1], 2, open_at, taken, floor=7)
    moved = {s for s in delta if s not in fresh}
    # A third of the open streams of each place moves to B (the sender moves them) ...
    assert len(moved & {0, 2}) == 1 and len(moved & {1, 3}) == 1, delta
    assert all(delta[s] == (table[s], 2) for s in delta)
    # ... and B's own ids for new streams come from the receiver's free ids only, above the
    # floor (ids just above the highest one taken may be on their way here).
    assert fresh and all(table[s] == 0 and s > 7 and s not in taken for s in fresh)
    free = [s for s in range(64) if table[s] == 0 and s > 7]
    assert len(fresh) == share(len(free), 1, 3)
    # No id a helper holds and did not report open moves (A keeps its unused ids).
    assert not {s for s in delta if table[s] == 1} - open_at[1]


def test_grow_weighted_and_nothing_without_weight() -> None:
    table = bytes(round_robin([2, 2], 40))
    open_at = {0: {0, 2, 4, 6}, 1: set()}
    # B has 4 workers of 8 in all: half of what is open here moves.
    delta, fresh = grow(table, [2, 2, 4], 2, open_at, set(range(8)))
    assert len([s for s in delta if s in open_at[0]]) == 2
    assert len(fresh) == share(len([s for s in range(40) if table[s] == 0 and s >= 8]), 4, 8)
    assert grow(table, [2, 2, 0], 2, open_at, set()) == ({}, set())


def test_a_dead_helpers_ids_go_to_every_survivor_weighted() -> None:
    # The receiver (1 worker), A (1, dies), B (2): A's ids are dealt 1:2 over the receiver
    # and B, in id order, so that A's open streams (its lowest ids) go to both.
    table = bytes(round_robin([1, 1, 2], 60))
    delta = redeal(table, 1, [1, 0, 2])
    mine = [s for s in range(60) if table[s] == 1]
    assert sorted(delta) == mine
    assert all(delta[s][0] == 1 for s in mine)
    got = Counter(now for _, now in delta.values())
    assert got[0] == 5 and got[2] == 10, got
    first_three = [delta[s][1] for s in mine[:3]]
    assert sorted(first_three) == [0, 2, 2]  # the open ones too, not only the receiver
    # Nobody left but the receiver: all of them come here (as before).
    assert {now for _, now in redeal(table, 1, [1, 0, 0]).values()} == {0}
    # (a receiver without workers of its own still takes them when nobody else is left)
    assert {now for _, now in redeal(table, 1, [0, 0, 0]).values()} == {0}


def test_pick_stream_for_a_moved_stream() -> None:
    routes = Routes(("h1:1", "h2:2"), bytes([0, 1, 2, 0, 1, 2, 0, 2, 2]))
    used = {0, 1, 2, 3}
    # A stream moved to h2 takes the lowest unused id routed there ...
    assert pick_stream(routes, used, 4, "h2:2") == 5
    assert pick_stream(routes, used | {5}, 4, "h2:2") == 7
    # ... to the receiver: the lowest unused id routed here (beyond the table is here too).
    assert pick_stream(routes, used, 4, None) == 6
    # Any other new stream: the lowest unused id, wherever it goes.
    assert pick_stream(routes, used, 4, False) == 4
    assert pick_stream(routes, used | {4, 5}, 4, False) == 6
    # Nothing left routed there: the lowest unused id.
    assert pick_stream(routes, set(range(9)), 9, "h1:1") == 9
    assert pick_stream(None, {0}, 0, "h1:1") == 1
