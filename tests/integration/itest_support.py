"""Helpers for the integration tests: real processes, real loopback sockets.

Every CLI run goes through :func:`run_stx` (a timeout, output captured, no key material in argv
or output); every CLI receiver is a :class:`CliReceiver` that fixtures always stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import psutil
from xxhash import xxh3_128_digest

from stxpar import ipc

#: the installed ``stx`` script of the interpreter running the tests
STX = Path(sys.executable).parent / "stx"
#: a small block size so that multi-block files stay small
BLOCK = 64 << 10
#: seconds any one CLI command may take
CLI_TIMEOUT = 60.0
#: what ``stx send --json`` must report
SEND_JSON_FIELDS = (
    "file",
    "bytes",
    "seconds",
    "workers",
    "block_size",
    "blocks_total",
    "blocks_sent",
    "blocks_resumed",
    "retransmits",
    "reconnects",
    "digest",
)
PART_SUFFIX = ".stxpart"

#: hex of every key a test made: none may show up in an argv or in any output
KNOWN_KEYS: set[str] = set()


def stx_env() -> dict[str, str]:
    """This process's environment for an ``stx`` child, without a key file of the user's
    (``STX_PSK_FILE``) or ``STX_DEBUG``: only the test's own ``--psk-file`` counts."""
    env = dict(os.environ)
    env.pop("STX_PSK_FILE", None)
    env.pop("STX_DEBUG", None)
    return env


def register_key(key: bytes) -> bytes:
    KNOWN_KEYS.add(key.hex())
    return key


def assert_no_secrets(*texts: str | Sequence[str]) -> None:
    for text in texts:
        blob = text if isinstance(text, str) else "\0".join(text)
        low = blob.lower()
        for key in KNOWN_KEYS:
            assert key not in low, "a pre-shared key (hex) leaked into argv or output"
            assert key[:32] not in low, "half of a pre-shared key (hex) leaked"


# ---------------------------------------------------------------- CLI runs


def last_json(stdout: str, stderr: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of ``stdout`` (``stderr`` goes into the
    failure message when there is none)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, f"no JSON on stdout; stderr: {stderr!r}"
    obj = json.loads(lines[-1])
    assert isinstance(obj, dict)
    return obj


@dataclass
class CliRun:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def json(self) -> dict[str, Any]:
        """The JSON object on the last non-empty line of stdout."""
        return last_json(self.stdout, self.stderr)

    def stderr_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def run_stx(
    *args: str | os.PathLike[str],
    timeout: float = CLI_TIMEOUT,
    env: dict[str, str] | None = None,
    program: Path = STX,
) -> CliRun:
    """Run ``program *args`` (default ``stx``) with a timeout; no key may show in argv or
    output."""
    argv = [str(program), *(os.fspath(a) for a in args)]
    assert_no_secrets(argv)
    full_env = dict(os.environ)
    full_env.pop("STX_PSK_FILE", None)
    full_env.pop("STX_DEBUG", None)
    if env:
        full_env.update(env)
    started = time.monotonic()
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    run = CliRun(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
    assert_no_secrets(run.stdout, run.stderr)
    return run


def assert_one_line_error(run: CliRun) -> None:
    """No traceback, and something to read on stderr."""
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr_lines(), "no error message on stderr"
    assert "internal error" not in run.stderr, run.stderr


def make_keyfile(path: Path) -> bytes:
    """``stx keygen -o path``; the key it wrote (registered as a secret)."""
    run = run_stx("keygen", "-o", path)
    assert run.rc == 0, run.stderr
    assert (path.stat().st_mode & 0o777) == 0o600
    return register_key(read_keyfile(path))


def read_keyfile(path: Path) -> bytes:
    text = path.read_text().strip()
    body = text.split()[-1]
    key = bytes.fromhex(body)
    assert len(key) == 32
    return key


# ---------------------------------------------------------------- CLI receiver

_LISTENING = re.compile(r"listening on (\S+):(\d+)\b")


class CliReceiver:
    """``stx recv`` in a subprocess; stdout and stderr go to files (no pipe to fill up)."""

    def __init__(
        self,
        keyfile: Path,
        dest: Path,
        logdir: Path,
        *,
        workers: int = 2,
        once: bool = True,
        listen: str = "127.0.0.1:0",
        extra: Sequence[str] = (),
        program: Path | None = None,
    ) -> None:
        """``program`` replaces ``stx recv`` (e.g. the ``stx-recv`` alias)."""
        self.args = [
            *([str(STX), "recv"] if program is None else [str(program)]),
            "--listen",
            listen,
            "--psk-file",
            str(keyfile),
            "--dest",
            str(dest),
            "--workers",
            str(workers),
            "--json",
            *(["--once"] if once else []),
            *extra,
        ]
        assert_no_secrets(self.args)
        self.dest = dest
        fd, out = tempfile.mkstemp(prefix="recv-out-", dir=logdir)
        os.close(fd)
        fd, err = tempfile.mkstemp(prefix="recv-err-", dir=logdir)
        os.close(fd)
        self.out_path, self.err_path = Path(out), Path(err)
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0

    def start(self, timeout: float = 20.0) -> CliReceiver:
        env = dict(os.environ)
        env.pop("STX_PSK_FILE", None)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.stderr)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"stx recv exited with {self.proc.returncode}: {self.stderr!r}"
                )
            time.sleep(0.02)
        raise AssertionError(f"stx recv did not report listening: {self.stderr!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.stdout.splitlines() if ln.strip()]

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int | None:
        """Interrupt (SIGINT), then kill if it does not go; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        assert_no_secrets(self.stdout, self.stderr)
        return self.proc.returncode


@contextlib.contextmanager
def cli_receiver_rig(prefix: str) -> Iterator[tuple[CliReceiver, Path, Path]]:
    """A running ``stx recv`` (never ``--once``) in a fresh scratch root on tmpfs where there is
    one, with ``dest``, ``logs`` and ``src`` in it and a key at ``stx.key``: (receiver, key
    file, root). Stopped and removed at the end."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    for d in ("dest", "logs", "src"):
        (root / d).mkdir()
    make_keyfile(root / "stx.key")
    recv = CliReceiver(root / "stx.key", root / "dest", root / "logs", once=False)
    try:
        recv.start()
        yield recv, root / "stx.key", root
    finally:
        recv.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- files and digests


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes; their sha256 hex."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def blocks_for(size: int, block_size: int) -> int:
    return -(-size // block_size)


def expected_digest(path: Path, block_size: int) -> str:
    """The STX whole-transfer digest of sending the one file ``path``, computed here from the
    definition (docs/protocol.md §9; not with stxpar): the file's entry (its file id from its
    real path, device, inode, size, mtime and ctime), the manifest digest over it, the file
    digest over the XXH3-128 of every block, and the tree digest over both."""
    st = path.stat()
    real = os.path.realpath(path)
    ident = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    file_id = hashlib.sha256(ident.encode()).digest()[:16]
    extents = [0, st.st_size] if st.st_size else []
    entry = [0, path.name, st.st_size, st.st_mode & 0o777, st.st_mtime_ns, "", extents, file_id]
    manifest = hashlib.sha256(b"stx3 manifest" + struct.pack(">I", block_size))
    manifest.update(msgpack.packb(entry, use_bin_type=True))
    h = hashlib.sha256(b"stx1 file digest")
    h.update(struct.pack(">IQ", block_size, st.st_size))
    with open(path, "rb") as f:
        while block := f.read(block_size):
            h.update(xxh3_128_digest(block))
    tree = hashlib.sha256(b"stx3 tree" + manifest.digest() + h.digest())
    return tree.hexdigest()


def assert_dest_exactly(dest: Path, names: set[str]) -> None:
    """``dest`` holds exactly ``names`` (no partial files, nothing else)."""
    found = {p.name for p in dest.iterdir()}
    assert found == names, f"destination holds {sorted(found)}, expected {sorted(names)}"
    assert not [n for n in found if n.endswith(PART_SUFFIX)]


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants now (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


#: worker module -> the process name that worker gives itself (a forked worker's command line is
#: its coordinator's: the name is what tells it apart)
WORKER_NAMES = {
    "stxpar.workers.sender": ipc.SENDER_WORKER_NAME,
    "stxpar.workers.receiver": ipc.RECEIVER_WORKER_NAME,
}


def is_worker(p: psutil.Process, module: str) -> bool:
    """Whether ``p`` is a live worker of ``module`` (started either way: ``ipc``)."""
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return p.name() == WORKER_NAMES[module] or module in p.cmdline()
    except psutil.Error:
        return False


def wait_dead(p: psutil.Process, timeout: float = 10.0) -> bool:
    """Wait until ``p`` is gone or a zombie (a signal's effect is asynchronous)."""

    def dead() -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return wait_for(dead, timeout=timeout, step=0.005)


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WriteMeter:
    """Samples the bytes a process tree has written (``write``/``pwrite``) until stopped."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WriteMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    self._seen[p.pid] = p.io_counters().write_chars
                except psutil.Error:
                    pass  # (gone: its last count stays)
            self.samples.append((time.monotonic(), sum(self._seen.values())))
            time.sleep(0.05)

    def busiest_window(self, window: float) -> float:
        """The most bytes written in any ``window`` seconds (edges at the samples)."""
        best = 0
        j = 0
        for i, (t, total) in enumerate(self.samples):
            while self.samples[j][0] < t - window:
                j += 1
            # from the last sample before the window to this one: never shorter than ``window``
            start = self.samples[max(0, j - 1)][1]
            best = max(best, total - start)
            del i
        return float(best)
