"""The source changes under a running ``stx send`` (issue 11).

* Swapped: after the coordinator checked the source, someone who can rename entries in its
  directory puts a symlink to another file (a private key, say) under its name. The workers
  open the file again: they must find the coordinator's file or fail (exit 5), never send the
  other one.
* Changed during one connection: the file grows, is rewritten in place with its old mtime put
  back, or is replaced by a rename while its blocks are read. The sender must fail with exit 5
  before END (the receiver never renames a torn copy into place), and a later run starts over.

Real ``stx send`` processes, a real ``stxpar.Receiver`` (real worker processes), a real TCP
relay in front of it to hold the transfer at a chosen point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fault_relay import GateRelay, ProcGroup, send_args, start_receiver
from itest_support import (
    assert_no_secrets,
    assert_one_line_error,
    run_stx,
    sha256_file,
    wait_for,
    write_random,
)
from tcp_relay import Direction, RelayConnection, TcpRelay

import stxpar

BLOCK = "64K"
SIZE = 4 << 20


class HoldFirstChunk(TcpRelay):
    """Holds the first bytes of the first connection (the control connection's handshake) until
    ``release``: by then the sender's coordinator has opened and checked the source, and its
    workers have not opened it yet."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.arrived = threading.Event()
        self.released = threading.Event()

    def transform(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        if conn.id == 0 and direction == "up" and not self.released.is_set():
            self.arrived.set()
            self.released.wait(20)
        return data


@pytest.fixture
def hold(receiver: stxpar.Receiver) -> Iterator[HoldFirstChunk]:
    relay = HoldFirstChunk(receiver.address).start()
    try:
        yield relay
    finally:
        relay.released.set()
        relay.stop()


@pytest.fixture
def gate(receiver: stxpar.Receiver) -> Iterator[GateRelay]:
    relay = GateRelay(receiver.address, after=4).start()
    try:
        yield relay
    finally:
        relay.open()
        relay.stop()


def _files_with(dest: Path, sha: str) -> list[str]:
    return [p.name for p in dest.iterdir() if p.is_file() and sha256_file(p) == sha]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_symlink_swapped_in_after_the_checks_is_not_sent(
    scratch: Path,
    dest: Path,
    stx_key: tuple[Path, bytes],
    hold: HoldFirstChunk,
    group: ProcGroup,
    workers: int,
) -> None:
    """Reproduces the report: a same-sized private file behind a symlink renamed over the
    source between the coordinator's checks and the workers' opens was delivered, exit 0."""
    src = scratch / "payload.bin"
    write_random(src, SIZE)
    secret = scratch / "private" / "id_secret"
    secret.parent.mkdir()
    secret_sha = write_random(secret, SIZE)
    proc = group.start(
        *send_args(src, f"127.0.0.1:{hold.port}", stx_key[0], workers=workers, block_size=BLOCK)
    )
    assert hold.arrived.wait(30), "the sender never connected"
    link = scratch / "swap.tmp"
    link.symlink_to(secret)
    os.replace(link, src)  # the name now leads to the secret
    hold.released.set()
    rc = proc.wait(timeout=40)
    out, err = group.output(proc)
    assert rc == 5, (rc, err)
    assert "replaced" in err, err
    assert "Traceback" not in err, err
    assert not out.strip()
    assert not _files_with(dest, secret_sha), "the swapped-in file reached the destination"
    blocks = {secret.read_bytes()[i : i + 65536] for i in range(0, SIZE, 65536)}
    for p in dest.iterdir():  # the partial too: not one block of the secret went out
        data = p.read_bytes()
        leaked = [i for i in range(0, len(data), 65536) if data[i : i + 65536] in blocks]
        assert not leaked, f"{p.name} holds blocks of the swapped-in file at {leaked[:5]}"


@pytest.mark.timeout(60)
def test_a_symlink_named_by_the_user_is_followed_once(
    scratch: Path, dest: Path, stx_key: tuple[Path, bytes], receiver: stxpar.Receiver
) -> None:
    """Naming a symlink on the command line stays legitimate: it is resolved once, and the
    receiver gets the name as given."""
    real = scratch / "store" / "data.bin"
    real.parent.mkdir()
    sha = write_random(real, 300_000)
    link = scratch / "latest.bin"
    link.symlink_to(real)
    host, port = receiver.address
    run = run_stx(*send_args(link, f"{host}:{port}", stx_key[0], workers=2, block_size=BLOCK))
    assert run.rc == 0, run.stderr
    assert wait_for(lambda: (dest / "latest.bin").exists(), timeout=10)
    assert sha256_file(dest / "latest.bin") == sha


def _grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(os.urandom(100_000))


def _rewrite_keeping_mtime(path: Path) -> None:
    """New bytes in place, same size, the old mtime put back: only ctime tells."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(os.urandom(st.st_size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _replace_by_rename(path: Path) -> None:
    new = path.with_name(path.name + ".new")
    new.write_bytes(os.urandom(path.stat().st_size))
    os.replace(new, path)


def _changed_while_sent(
    group: ProcGroup, gate: GateRelay, key: Path, src: Path, change: Callable[[], None]
) -> str:
    """``stx send src`` (one worker) through the gate; ``change()`` once the gate has held the
    first blocks, then the rest let through: the run must end with exit 5 and one clear error.
    Its stderr."""
    proc = group.start(*send_args(src, f"127.0.0.1:{gate.port}", key, workers=1, block_size=BLOCK))
    assert wait_for(lambda: gate.closed_at is not None, timeout=30), "no block reached the gate"
    change()
    gate.open()
    rc = proc.wait(timeout=60)
    _, err = group.output(proc)
    assert rc == 5, (rc, err)
    assert "Traceback" not in err, err
    return str(err)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "change",
    [_grow, _rewrite_keeping_mtime, _replace_by_rename],
    ids=["grown", "rewritten-old-mtime", "replaced-by-rename"],
)
def test_a_source_that_changes_during_the_connection_fails_before_end(
    scratch: Path,
    dest: Path,
    stx_key: tuple[Path, bytes],
    receiver: stxpar.Receiver,
    gate: GateRelay,
    group: ProcGroup,
    change: Callable[[Path], None],
) -> None:
    """Four blocks pass, the source changes, the rest pass: exit 5, no file at the final name
    (a torn copy stamped with the old mtime was reported as success before). Sending again
    then starts over and delivers the file as it is now."""
    src = scratch / "payload.bin"
    write_random(src, SIZE)
    err = _changed_while_sent(group, gate, stx_key[0], src, lambda: change(src))
    assert "changed during the transfer" in err or "replaced" in err, err
    assert not (dest / src.name).exists(), "a torn copy was renamed into place"

    host, port = receiver.address
    again = run_stx(*send_args(src, f"{host}:{port}", stx_key[0], workers=2, block_size=BLOCK))
    assert again.rc == 0, again.stderr
    assert again.json()["blocks_resumed"] == 0, "a resume mixed blocks of two versions"
    assert wait_for(lambda: (dest / src.name).exists(), timeout=10)
    assert sha256_file(dest / src.name) == sha256_file(src)


@pytest.mark.timeout(30)
def test_a_missing_source_is_still_a_usage_error(
    scratch: Path, stx_key: tuple[Path, bytes]
) -> None:
    run = run_stx(
        *send_args(scratch / "nope.bin", "127.0.0.1:9", stx_key[0], extra=["--max-retries", "0"])
    )
    assert run.rc == 2, run.stderr
    assert_one_line_error(run)


_PRESTART_THEN_SWAP = """
import os, sys
import stxpar
from stxpar.sender import prestart_workers, send
src, secret, port, keyfile = sys.argv[1:5]
pool = prestart_workers(src, "127.0.0.1", workers=2, block_size=65536)
assert pool is not None, "could not fork the workers"
os.symlink(secret, src + ".swap")
os.replace(src + ".swap", src)  # between the CLI's two looks at the source
try:
    send(src, "127.0.0.1", int(port), psk=stxpar.load_key_file(keyfile), workers=2,
         block_size=65536, pool=pool)
except stxpar.StxError as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


@pytest.mark.timeout(60)
def test_a_swap_between_prestart_and_send_is_caught(
    scratch: Path, dest: Path, stx_key: tuple[Path, bytes], group: ProcGroup
) -> None:
    """``stx send`` looks at the source when it forks its workers (before it reads the key) and
    used to open it again by name in ``send``: a symlink swapped in between was followed then.
    The source pinned at prestart is the one ``send`` uses, so the swap is caught (exit 5)."""
    _, port = start_receiver(group, stx_key[0], dest)
    src = scratch / "payload.bin"
    write_random(src, SIZE)
    secret = scratch / "private" / "id_secret"
    secret.parent.mkdir()
    secret_sha = write_random(secret, SIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("STX_PSK_FILE", "STX_DEBUG")}
    run = subprocess.run(
        [sys.executable, "-c", _PRESTART_THEN_SWAP, str(src), str(secret), str(port)]
        + [str(stx_key[0])],
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
    )
    assert_no_secrets(run.stdout, run.stderr)
    assert run.returncode == 5, (run.returncode, run.stderr)
    assert "replaced" in run.stderr, run.stderr
    assert not _files_with(dest, secret_sha), "the swapped-in file reached the destination"


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "change", [_grow, _rewrite_keeping_mtime], ids=["grown", "rewritten-old-mtime"]
)
def test_a_tree_file_that_changes_while_it_is_read_fails_the_transfer(
    scratch: Path,
    dest: Path,
    stx_key: tuple[Path, bytes],
    receiver: stxpar.Receiver,
    gate: GateRelay,
    group: ProcGroup,
    change: Callable[[Path], None],
) -> None:
    """A tree: its largest file's first blocks pass, the file changes, the rest pass. The
    worker reading it finds the change after its next read (no second walk of the tree before
    END does it): exit 5, and the file is not in place. Sending again delivers the tree as it
    is now."""
    tree = scratch / "D"
    (tree / "sub").mkdir(parents=True)
    big = tree / "payload.bin"
    write_random(big, 6 * SIZE)  # more than the socket buffers hold: read after the change
    for i in range(20):
        write_random(tree / "sub" / f"s{i:02d}", 1000)
    err = _changed_while_sent(group, gate, stx_key[0], tree, lambda: change(big))
    assert "changed during the transfer" in err, err
    assert not (dest / "D" / "payload.bin").exists(), "a torn copy was renamed into place"

    host, port = receiver.address
    again = run_stx(*send_args(tree, f"{host}:{port}", stx_key[0], workers=2, block_size=BLOCK))
    assert again.rc == 0, again.stderr
    assert wait_for(lambda: (dest / "D" / "payload.bin").exists(), timeout=10)
    assert sha256_file(dest / "D" / "payload.bin") == sha256_file(big)
    assert sorted(p.name for p in (dest / "D" / "sub").iterdir()) == [
        f"s{i:02d}" for i in range(20)
    ]
