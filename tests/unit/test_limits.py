"""The gatekeeper's pure parts: handshake rates and the book of pending connections."""

from __future__ import annotations

from dataclasses import dataclass, field

from stxpar.limits import HandshakeRates, Pending


def test_handshake_rates_per_address_and_global() -> None:
    rates = HandshakeRates(per_s=2.0, per_key_per_s=1.0, now=0.0)
    # an address gets its burst of 2, then waits
    assert rates.take("a", 0.0) and rates.take("a", 0.0)
    assert not rates.take("a", 0.0)
    # the global burst (4) is shared: two more for another address, then nobody
    assert rates.take("b", 0.0) and rates.take("b", 0.0)
    assert not rates.take("c", 0.0)
    # a refusal for lack of the global token cost "c" nothing: it has its burst later
    assert rates.take("c", 1.0)
    assert rates.take("c", 1.0)


def test_handshake_rates_forget_quiet_addresses() -> None:
    rates = HandshakeRates(per_s=100.0, per_key_per_s=1.0, max_keys=3, now=0.0)
    for key in "abcd":
        rates.take(key, 0.0)
    assert len(rates) == 3  # the least recent went
    rates.prune(0.5)
    assert len(rates) == 3  # not refilled yet
    rates.prune(10.0)
    assert len(rates) == 0


@dataclass(eq=False)
class Conn:
    name: str
    spoke: bool = False
    tags: list[str] = field(default_factory=list)


def test_pending_eviction_prefers_the_oldest_idle() -> None:
    book: Pending[Conn] = Pending()
    a1, a2, b1 = Conn("a1", spoke=True), Conn("a2"), Conn("b1")
    book.add(a1, "a")
    book.add(a2, "a")
    book.add(b1, "b")
    assert len(book) == 3 and book.count("a") == 2 and book.count("b") == 1
    assert book.oldest() is a1
    assert book.victim(lambda c: c.spoke) is a2  # a1 spoke: the idle one goes first
    assert book.victim(lambda c: c.spoke, "b") is b1
    a2.spoke = True
    assert book.victim(lambda c: c.spoke, "a") is a1  # all spoke: the oldest
    assert book.remove(a1) and not book.remove(a1)
    assert book.count("a") == 1 and list(book) == [a2, b1]
    assert book.remove(b1) and book.count("b") == 0
    assert book.victim(lambda c: c.spoke, "b") is None
    assert book.remove(a2) and book.oldest() is None and book.victim(lambda c: c.spoke) is None
