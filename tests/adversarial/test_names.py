"""File names from the peer, against a live receiver: each one is refused with a
``RejectedError``-coded ERROR (wire code 6) or stored strictly inside the destination.

Who can do this: the name travels only inside the sealed METADATA, so choosing it takes the
key (a buggy or hostile sender); a network attacker without the key cannot name a file at all.
The symlink tests add a **local** attacker who can write into the destination directory (for
instance a shared one): planted links must not make the receiver write, chmod or rename
anything outside it.

Every test lists the whole scratch parent of the destination afterwards (``Arena``): nothing
may appear beside the destination, and the victim file there must be intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from attacker import (
    BLOCK,
    Arena,
    Peer,
    Session,
    client_handshake,
    expect_refused,
    handshake_session,
    make_metadata,
    raw_transfer,
)
from itest_support import wait_for

import stxpar
from stxpar.manifest import chunks
from stxpar.state import Identity, encode_header
from stxpar.transfer import Transfer
from stxpar.wire import ErrorMsg, FrameType, Receipt

T = FrameType
DATA = b"stx adversarial name test\n" * 200
TOKEN = "stx-adv-" + os.urandom(6).hex()

#: refused by the manifest's checks (a path, not a name, that breaks a rule): wire code 1
BAD_PATHS = [
    "",
    ".",
    "..",
    "../",
    "/",
    "x/..",
    "dir/.hidden",
    "../.hidden",
    "a\0b",
    "a\nb",
    "a\rb",
    "a\tb",
    "\x1b[31mred",
    "del\x7f",
    "x" * 256,
    "é" * 128,  # 256 bytes of UTF-8
    "c1\x85control",
    # a path instead of a name: before stx3 reduced to its base name, now a manifest whose
    # entry has no parent directory (or an empty, "." or ".." component)
    f"../{TOKEN}",
    f"../../{TOKEN}",
    f"/tmp/{TOKEN}",
    f"/etc/{TOKEN}",
    f"sub/dir/{TOKEN}",
    f"./{TOKEN}",
]

#: a valid manifest path, but not a name the receiver stores: wire code 6
UNSAFE_NAMES = [
    ".hidden",
    "evil\u202etxt.exe",  # a bidi override would disguise the name in logs
]

REFUSED = [(n, 1, "bad manifest: ") for n in BAD_PATHS] + [
    (n, 6, "refusing unsafe file name ") for n in UNSAFE_NAMES
]

STORED = {
    # name sent: name stored in the destination
    f"..\\..\\{TOKEN}": TOKEN,
    f"C:\\Windows\\{TOKEN}": TOKEN,
    "ünïcödé.bin": "ünïcödé.bin",
    "x" * 200: "x" * 200,
}


def _metadata_frames(
    peer: Peer, md: Transfer, *, manifest: list[bytes] | None = None
) -> list[bytes]:
    """METADATA and the MANIFEST chunks (``manifest``: other chunk payloads), sealed."""
    assert peer.channel is not None
    payloads = chunks(md.manifest.entries) if manifest is None else manifest
    return [peer.channel.seal(T.METADATA, md.header.encode())] + [
        peer.channel.seal(T.MANIFEST, c) for c in payloads
    ]


def _no_escape() -> None:
    """The names with a path in them never landed where the path pointed."""
    for where in ("/tmp", "/etc", "/"):
        assert not os.path.lexists(os.path.join(where, TOKEN)), f"{where}/{TOKEN} was written"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "code", "prefix"), REFUSED, ids=[repr(n)[:24] for n, _, _ in REFUSED]
)
def test_unsafe_name_is_refused(arena: Arena, name: str, code: int, prefix: str) -> None:
    md = make_metadata(name, len(DATA))
    with Peer(arena.addr) as peer:
        assert client_handshake(peer, arena.psk).established
        peer.send_frames(_metadata_frames(peer, md))
        expect_refused(peer, code)
        assert peer.errors[0].message.startswith(prefix), peer.errors
        assert peer.sealed_errors == 1
    assert wait_for(lambda: any(f["error"].startswith(prefix) for f in arena.kinds("rejected")))
    _no_escape()
    arena.unharmed()


@pytest.mark.timeout(60)
def test_name_that_is_not_utf8_is_refused(arena: Arena) -> None:
    """msgpack ``str`` whose bytes are not UTF-8: malformed MANIFEST (wire code 1)."""
    md = make_metadata("ZZZ", len(DATA))
    (chunk,) = chunks(md.manifest.entries)
    body = chunk.replace(b"\xa3ZZZ", b"\xa3\xff/.", 1)
    assert body != chunk
    with Peer(arena.addr) as peer:
        assert client_handshake(peer, arena.psk).established
        peer.send_frames(_metadata_frames(peer, md, manifest=[body]))
        expect_refused(peer, 1, "malformed MANIFEST message")
    arena.unharmed()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(STORED), ids=[repr(n)[:24] for n in STORED])
def test_path_in_a_name_is_reduced_to_a_base_name_inside_the_destination(
    arena: Arena, name: str
) -> None:
    stored = STORED[name]
    md = make_metadata(name, len(DATA))
    session, receipt = raw_transfer(arena.addr, arena.psk, md, DATA)
    session.close()
    assert receipt is not None and receipt.size == len(DATA)
    arena.settle()
    assert arena.leftovers() == {stored}
    assert (arena.dest / stored).read_bytes() == DATA
    arena.assert_outside_untouched()
    _no_escape()
    (arena.dest / stored).unlink()
    arena.unharmed()


@pytest.mark.timeout(60)
def test_longest_names_are_refused_or_stored_inside(arena: Arena) -> None:
    """Near the 255-byte limit the partial file's own name (``.NAME.stxpart``) no longer fits:
    such a name is refused (wire code 6), never truncated onto another file."""
    outcomes = {}
    for n in (240, 246, 247, 255):
        name = "n" * n
        md = make_metadata(name, len(DATA))
        with Peer(arena.addr) as peer:
            assert client_handshake(peer, arena.psk).established
            peer.send_frames(_metadata_frames(peer, md))
            got = peer.recv_frame()
            assert got is not None
            if got[0] is T.ERROR:
                assert peer.errors[0].code == 6, peer.errors
                outcomes[n] = "refused"
            else:
                outcomes[n] = "admitted"
        arena.settle()
        assert not (arena.dest / name).exists()
        arena.clean()
        arena.assert_outside_untouched()
    assert outcomes[255] == "refused"
    arena.unharmed()


# ---------------------------------------------------------------- planted symlinks

LINKS = ["final", "partial", "state", "all"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("planted", LINKS)
def test_planted_symlinks_are_not_followed(arena: Arena, planted: str) -> None:
    """A local attacker links the names the receiver is about to use to a file outside the
    destination; a real sender then sends that name. The victim is never written, and the
    final name ends up a regular file with the sender's data."""
    victim = arena.outside / "victim"
    name = "target.bin"
    links = {
        "final": arena.dest / name,
        "partial": arena.dest / f".{name}.stxpart",
        "state": arena.dest / f".{name}.stxstate",
    }
    for which, path in links.items():
        if planted in (which, "all"):
            path.symlink_to(victim)
    src = arena.src / name
    src.write_bytes(DATA)
    stxpar.send(src, *arena.addr, psk=arena.psk, workers=1, block_size=BLOCK)
    src.unlink()
    arena.settle()
    final = arena.dest / name
    assert not final.is_symlink() and final.read_bytes() == DATA
    assert arena.leftovers() == {name}
    arena.assert_outside_untouched()
    arena.clean()
    arena.unharmed()


def _transfer_tolerant(arena: Arena, md: Transfer, data: bytes) -> tuple[Session, Receipt | None]:
    """Like ``raw_transfer``, but the receiver may refuse at any step (then no receipt)."""
    s = handshake_session(arena.addr, arena.psk)
    s.send_metadata(md)
    if not s.admitted():
        return s, None
    need = {i for i in range(md.total_blocks) if i not in s.held}
    if need:
        st_ = s.stream(0)
        for i in sorted(need):
            st_.send_block(i, data)
        while need:
            got = st_.read()
            if got is None or isinstance(got, ErrorMsg):
                st_.close()
                return s, None
            need -= set(got.durable)
        st_.finish()
    s.send_end(data)
    return s, s.receipt()


@pytest.mark.timeout(60)
def test_planted_partial_symlink_with_a_matching_state_log(arena: Arena) -> None:
    """The strongest plant: a state log that matches the coming transfer (so the receiver
    resumes) and a partial-file symlink whose own size equals the file size (so it looks
    like the partial). Takes the key and write access to the destination. The receiver must
    still never write through the link."""
    victim = arena.outside / "victim"
    before = victim.read_bytes()
    target = os.fspath(victim)
    size = 200
    padded = target.replace("/outside/", "/" * (size - len(target) + 1) + "outside/")
    assert len(padded) == size and Path(padded).resolve() == victim.resolve()
    name = "resumed.bin"
    md = make_metadata(name, size, block_size=BLOCK)
    entry = md.manifest.single()
    assert entry is not None
    ident = Identity(name, entry.size, entry.mtime_ns, md.block_size, entry.file_id)
    (arena.dest / f".{name}.stxstate").write_bytes(encode_header(ident))
    (arena.dest / f".{name}.stxpart").symlink_to(padded)
    data = os.urandom(size)
    session, receipt = _transfer_tolerant(arena, md, data)
    session.close()
    arena.settle()
    assert victim.read_bytes() == before, "the receiver wrote through a planted symlink"
    final = arena.dest / name
    if receipt is not None:  # completed: into a regular file of its own
        assert not final.is_symlink() and final.read_bytes() == data
    else:
        assert not os.path.lexists(final)
    arena.assert_outside_untouched()
    arena.clean()
    arena.unharmed()
