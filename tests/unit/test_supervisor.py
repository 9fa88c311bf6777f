"""The sender's supervisor, in memory, with fake worker handles: exits, silence, budget."""

from __future__ import annotations

import pytest

from stxpar.errors import ConnectError
from stxpar.supervisor import SILENCE_TIMEOUT, Supervisor


class FakeWorker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.status: int | None = None
        self.terminated = False

    def exit_status(self) -> int | None:
        return self.status

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.status = -9

    def wait(self, timeout: float | None = None) -> int:
        if self.status is None:
            self.status = 0
        return self.status


def _sup(n: int) -> tuple[Supervisor, dict[int, FakeWorker]]:
    made: dict[int, FakeWorker] = {}

    def start(slot: int) -> FakeWorker:
        made[slot] = FakeWorker(slot)
        return made[slot]

    sup = Supervisor(start)
    for _ in range(n):
        sup.spawn()
    return sup, made


def test_an_exit_is_lost_a_clean_exit_is_not() -> None:
    sup, made = _sup(3)
    made[0].status = 0
    made[1].status = 1
    assert sup.exited(lambda s: False)
    assert sup.lost(0.0, lambda s: False) == [(1, "sender worker 1 exited with status 1")]
    assert sup.lost(0.0, lambda s: s == 1) == []


def test_a_silent_worker_is_lost_once_it_was_heard() -> None:
    sup, made = _sup(2)
    assert sup.lost(1e6, lambda s: False) == []  # never heard: its start-up is not judged
    sup.heard(0, 100.0)
    sup.heard(1, 100.0)
    sup.heard(1, 100.0 + SILENCE_TIMEOUT)
    lost = sup.lost(100.0 + SILENCE_TIMEOUT + 1, lambda s: False)
    assert [slot for slot, _ in lost] == [0] and "silent" in lost[0][1]
    sup.replacements_left = 1
    sup.replace(0, "silent")
    assert made[0].status == -9  # killed: a stopped process would not act on SIGTERM


def test_replacement_budget() -> None:
    sup, made = _sup(1)
    sup.replacements_left = 1
    new = sup.replace(0, "lost")
    assert made[0].terminated and new.slot == 1 and sup.replaced == 1
    with pytest.raises(ConnectError, match=r"data streams keep failing \(again\)"):
        sup.replace(1, "again")


def test_stop_all_reaps_everyone() -> None:
    sup, made = _sup(2)
    sup.stop_all()
    assert all(w.terminated for w in made.values()) and sup.all_exited()
