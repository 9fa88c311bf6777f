"""How sender workers start: ``stx send`` forks its first ones before it reads the key; the
library API (and every replacement) starts new interpreters; ``ipc.fork_worker`` behaves like
the ``subprocess.Popen`` it stands in for.

Real processes throughout. The ordering test instruments the ``stx send`` process with a
``sitecustomize`` (it only observes: it notes when ``load_key_file`` has run, and an at-fork
hook in each forked child writes down whether the key had been loaded by then).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
from itest_support import (
    STX,
    CliReceiver,
    is_worker,
    make_keyfile,
    sha256_file,
    write_random,
)

import stxpar
from stxpar import ipc

pytestmark = pytest.mark.timeout(90)

PROBE = """\
import os

_log = os.environ.get("STX_FORK_PROBE")
if _log:
    import stxpar.psk as _psk

    _seen = {"key": 0}
    _load = _psk.load_key_file

    def _observed(*args, **kwargs):
        _seen["key"] = 1
        return _load(*args, **kwargs)

    _psk.load_key_file = _observed

    def _in_child():
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {_seen['key']}\\n")

    os.register_at_fork(after_in_child=_in_child)
"""


def _transfer_setup(scratch: Path, size: int) -> tuple[Path, Path, Path, str]:
    """A key file, a destination directory, and a random source file with its sha256."""
    key = scratch / "k.key"
    make_keyfile(key)
    dest = scratch / "dst"
    dest.mkdir()
    src = scratch / "f.bin"
    return key, dest, src, write_random(src, size)


def test_cli_forks_its_workers_before_it_reads_the_key(scratch: Path) -> None:
    key, dest, src, want = _transfer_setup(scratch, 3 << 20)
    probe = scratch / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    log = scratch / "forks.log"
    rx = CliReceiver(key, dest, scratch, once=True).start()
    try:
        env = dict(os.environ, STX_FORK_PROBE=str(log))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe), env.get("PYTHONPATH")]))
        run = subprocess.run(
            [str(STX), "send", "--psk-file", str(key), "--workers", "3", "--block-size", "64K",
             "-q", str(src), rx.address],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert rx.wait(timeout=20) == 0
    finally:
        rx.stop()
    assert sha256_file(dest / src.name) == want
    forks = log.read_text().split()
    # one line per forked worker: three workers, none forked after the key was loaded
    assert forks[1::2] == ["0", "0", "0"], forks


def test_a_program_can_prestart_forked_workers(scratch: Path) -> None:
    """What the README shows: ``prestart_workers`` before the key, then ``send(pool=...)``."""
    key, dest, src, want = _transfer_setup(scratch, 2 << 20)
    want2 = write_random(scratch / "f.bin.2", 2 << 20)
    script = textwrap.dedent(
        """
        import sys
        import stxpar
        from stxpar.sender import prestart_workers

        src, host, port, keyfile = sys.argv[1:]
        pool = prestart_workers(src, host, workers=2, block_size=64 << 10)
        print("forked", None if pool is None else [type(s.proc).__name__ for s in pool.streams.values()])
        key = stxpar.load_key_file(keyfile)
        result = stxpar.send(src, host, int(port), psk=key, workers=2, block_size=64 << 10, pool=pool)
        print("sent", result.bytes, result.workers)
        # Started for other arguments (one 4 MiB block: one worker), the pool is topped up.
        other = src + ".2"
        pool = prestart_workers(other, host, workers=2)
        print("forked", [type(s.proc).__name__ for s in pool.streams.values()])
        result = stxpar.send(other, host, int(port), psk=key, workers=2, block_size=64 << 10, pool=pool)
        print("sent", result.bytes, result.workers, len(pool.streams))
        """
    )
    rx = CliReceiver(key, dest, scratch, once=False).start()
    try:
        host, port = rx.address.rsplit(":", 1)
        run = subprocess.run([sys.executable, "-c", script, str(src), host, port, str(key)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert run.returncode == 0, run.stderr
    finally:
        rx.stop()
    assert run.stdout.splitlines() == [
        "forked ['ForkedWorker', 'ForkedWorker']",
        f"sent {2 << 20} 2",
        "forked ['ForkedWorker']",
        f"sent {2 << 20} 2 2",
    ]
    assert sha256_file(dest / src.name) == want
    assert sha256_file(dest / "f.bin.2") == want2


def test_api_starts_new_interpreters(scratch: Path) -> None:
    """A program calling ``stxpar.send`` is never forked: its workers are new interpreters."""
    psk = os.urandom(32)
    dest = scratch / "dst"
    dest.mkdir()
    src = scratch / "f.bin"
    want = write_random(src, 8 << 20)
    seen: list[list[str]] = []

    def progress(done: int, total: int) -> None:
        me = psutil.Process()
        for c in me.children():
            if is_worker(c, "stxpar.workers.sender"):
                try:
                    seen.append(c.cmdline())
                except psutil.Error:
                    pass

    with stxpar.Receiver(dest, psk=psk, host="127.0.0.1", port=0, workers=2) as r:
        stxpar.send(src, *r.address, psk=psk, workers=2, block_size=64 << 10, progress=progress)
    assert sha256_file(dest / src.name) == want
    assert seen, "no sender worker was alive while progress was reported"
    assert all("stxpar.workers.sender" in cmd for cmd in seen), seen


def test_can_fork_only_while_single_threaded() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not ipc.can_fork()
    finally:
        stop.set()
        t.join()
    script = textwrap.dedent(
        """
        import zmq
        from stxpar import ipc
        print(ipc.can_fork())
        ctx = zmq.Context()  # its I/O thread
        ctx.socket(zmq.PUSH).close()
        print(ipc.can_fork())
        ctx.term()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()  # fmt: skip
    assert out == ["True", "False"]


def test_forked_worker_behaves_like_popen() -> None:
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        from stxpar import ipc

        def sleeper(args):
            time.sleep(30)
            return 0

        def boom(args):
            raise RuntimeError("x")

        def leave(args):
            raise SystemExit(7)

        w = ipc.fork_worker(lambda args: int(args[0]) + 1, "2")
        print("exit", w.wait(10), w.returncode)
        w = ipc.fork_worker(sleeper)
        try:
            w.wait(timeout=0.05)
            print("no timeout")
        except subprocess.TimeoutExpired:
            print("timeout", w.poll())
        w.terminate()
        print("terminated", w.wait(10))
        w = ipc.fork_worker(sleeper)
        w.kill()
        print("killed", w.wait(10))
        print("raised", ipc.fork_worker(boom).wait(10))
        print("left", ipc.fork_worker(leave).wait(10))
        print("parent-only")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "exit 3 3",
        "timeout None",
        "terminated -15",
        "killed -9",
        "raised 1",
        "left 7",
        "parent-only",  # once: a child never returns into its parent's code
    ]
    assert "Traceback" not in run.stderr


def test_cli_without_a_key_leaves_no_workers_or_ipc_directory(scratch: Path) -> None:
    """The workers are forked before the key is read: a missing key must still stop them and
    remove their directory."""
    src = scratch / "f.bin"
    write_random(src, 1 << 20)
    tmp = scratch / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    env.pop("STX_PSK_FILE", None)
    run = subprocess.run(
        [str(STX), "send", "--psk-file", str(scratch / "missing.key"), str(src),
         "127.0.0.1:9"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode != 0
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert list(tmp.iterdir()) == []
    # no sender worker of that run is left anywhere
    for p in psutil.process_iter():
        if is_worker(p, "stxpar.workers.sender"):
            try:
                assert p.environ().get("TMPDIR") != str(tmp), p
            except psutil.Error:
                pass


_STOP_AT_ONCE = """
import os, signal, sys, time
from stxpar import ipc

def on_term(signum, frame):  # as the CLI's: a stop signal unwinds the program
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, on_term)

def main(args):
    time.sleep(30)
    return 0

for _ in range(int(sys.argv[1])):
    w = ipc.fork_worker(main)
    os.kill(w.pid, signal.SIGTERM)  # at once, as pool.close() after a key that will not load
    w.wait()
"""


@pytest.mark.timeout(60)
def test_forked_worker_stopped_at_once_ends_quietly(tmp_path: Path) -> None:
    """A worker SIGTERMed right after the fork ends at once and prints nothing. The CLI's
    SIGTERM handler used to run in the child during the interpreter's after-fork clean-up:
    "Exception ignored in _after_fork" on the user's terminal, and a child that went on."""
    script = tmp_path / "stop_at_once.py"
    script.write_text(_STOP_AT_ONCE)
    run = subprocess.run(
        [sys.executable, str(script), "200"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
