"""Fixtures for the fault-injection tests: real ``stx`` processes, SIGKILLs, restarts.

Helpers are handed out through fixtures (a ``conftest`` module cannot be imported by name
reliably when several exist). The shared integration helpers (``itest_support``) and the TCP
relay (``tcp_relay``) are put on ``sys.path`` here, as ``tests/integration/conftest.py`` does.

Every process a test starts, and every process those start (worker pools, replacements,
orphans of a killed coordinator), is SIGKILLed in teardown: the ``procs`` fixture makes the
test process a child subreaper (Linux), so orphaned workers stay its descendants and are found.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE.parent / "integration"), str(_HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fault_relay import ProcGroup  # noqa: E402
from itest_support import (  # noqa: E402
    STX,
    CliReceiver,
    CliRun,
    assert_dest_exactly,
    assert_no_secrets,
    expected_digest,
    is_worker,
    make_keyfile,
    sha256_file,
    wait_dead,
    wait_for,
)
from tcp_relay import UplinkThrottle  # noqa: E402

import stxpar  # noqa: E402
from stxpar.digest import BLOCK_DIGEST_LEN, block_digest  # noqa: E402
from stxpar.state import parse as parse_state  # noqa: E402

PART_SUFFIX = ".stxpart"
STATE_SUFFIX = ".stxstate"
SENDER_WORKER = "stxpar.workers.sender"
RECEIVER_WORKER = "stxpar.workers.receiver"
KB = 1 << 10
MB = 1 << 20


# ---------------------------------------------------------------- processes


def _become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: orphans of our children are re-parented to us, not to init."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class ProcessGuard:
    """Tracks every process a test starts; ``kill_all`` SIGKILLs them and their trees."""

    def __init__(self) -> None:
        self.subreaper = _become_subreaper()
        self.me = psutil.Process()
        self.baseline = {p.pid for p in self.me.children(recursive=True)}
        self.popens: list[subprocess.Popen[bytes]] = []
        self.noted: dict[int, float] = {}  # pid -> create_time (pids get reused)

    def track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.popens.append(proc)
        return proc

    def note(self, procs: Sequence[psutil.Process]) -> None:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                self.noted[p.pid] = p.create_time()

    def tree(self, pid: int) -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def kill_all(self) -> list[int]:
        victims: dict[int, psutil.Process] = {}
        for proc in self.popens:
            if proc.poll() is None:
                for p in self.tree(proc.pid):
                    victims[p.pid] = p
        for pid, created in self.noted.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created:
                    for q in self.tree(pid):
                        victims[q.pid] = q
        with contextlib.suppress(psutil.Error):
            for p in self.me.children(recursive=True):
                if p.pid not in self.baseline:
                    victims[p.pid] = p
        alive = []
        for p in victims.values():
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
                p.kill()
        psutil.wait_procs(list(victims.values()), timeout=10)
        for proc in self.popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.reap()
        return alive

    def reap(self) -> None:
        """Collect orphans that were re-parented to us and have exited."""
        mine = {p.pid for p in self.popens}
        with contextlib.suppress(psutil.Error):
            for p in self.me.children():
                if p.pid in mine or p.pid in self.baseline:
                    continue
                with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
                    if p.status() == psutil.STATUS_ZOMBIE:
                        os.waitpid(p.pid, os.WNOHANG)


@pytest.fixture
def procs() -> Iterator[ProcessGuard]:
    guard = ProcessGuard()
    try:
        yield guard
    finally:
        guard.kill_all()


def workers_of(pid: int, module: str) -> list[psutil.Process]:
    """Live worker children of process ``pid`` (forked or ``python -P -m module``)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    return sorted((c for c in children if is_worker(c, module)), key=lambda p: p.pid)


def has_tcp_stream(p: psutil.Process) -> bool | None:
    """Whether ``p`` holds an established TCP connection (None: not allowed to look)."""
    try:
        return any(c.status == psutil.CONN_ESTABLISHED for c in p.net_connections(kind="tcp"))
    except psutil.AccessDenied:
        return None
    except psutil.Error:
        return False


# ---------------------------------------------------------------- the CLI sender


class CliSender:
    """``stx send --json`` in a subprocess; output to files (no pipe can fill up)."""

    def __init__(
        self,
        guard: ProcessGuard,
        src: Path,
        address: str,
        keyfile: Path,
        logdir: Path,
        *,
        workers: int,
        block_size: str,
        max_retries: int = 8,
        extra: Sequence[str] = (),
    ) -> None:
        self.guard = guard
        self.args = [
            str(STX),
            "send",
            str(src),
            address,
            "--psk-file",
            str(keyfile),
            "--workers",
            str(workers),
            "--block-size",
            block_size,
            "--max-retries",
            str(max_retries),
            "--json",
            *extra,
        ]
        assert_no_secrets(self.args)
        fd, out = tempfile.mkstemp(prefix="send-out-", dir=logdir)
        os.close(fd)
        fd, err = tempfile.mkstemp(prefix="send-err-", dir=logdir)
        os.close(fd)
        self.out_path, self.err_path = Path(out), Path(err)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> CliSender:
        env = dict(os.environ)
        env.pop("STX_PSK_FILE", None)
        env.pop("STX_DEBUG", None)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = self.guard.track(
                subprocess.Popen(
                    self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
                )
            )
        self.started = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = 90.0) -> CliRun:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"stx send did not finish in {timeout:.0f} s; stderr: {self.stderr[-2000:]!r}"
            ) from None
        run = CliRun(self.args, rc, self.stdout, self.stderr, time.monotonic() - self.started)
        assert_no_secrets(run.stdout, run.stderr)
        return run


# ---------------------------------------------------------------- a throttling relay


ThrottleRelay = UplinkThrottle


# ---------------------------------------------------------------- sources


@dataclass
class Source:
    path: Path
    data: bytes
    sha256: str

    def digests(self, block_size: int) -> list[bytes]:
        return [
            block_digest(self.data[i : i + block_size])
            for i in range(0, len(self.data), block_size)
        ]


def make_source(path: Path, size: int, seed: int | None = None) -> Source:
    data = os.urandom(size) if seed is None else random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return Source(path, data, hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def fault_dir() -> Iterator[Path]:
    """A module-wide scratch directory on tmpfs when available; always removed."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="stx-faults-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fault_key(fault_dir: Path) -> Path:
    """A key file made by ``stx keygen -o`` (the key is registered as a secret)."""
    path = fault_dir / "stx.key"
    make_keyfile(path)
    return path


@pytest.fixture(scope="module")
def big_source(fault_dir: Path) -> Source:
    """24 MiB of random bytes, shared by the tests of a module (never modified)."""
    return make_source(fault_dir / "payload.bin", 24 * MB)


# ---------------------------------------------------------------- state checks


@dataclass
class StateCheck:
    exists: bool
    claimed: int
    total: int


def check_state_claims(dest: Path, src: Source, block_size: int) -> StateCheck:
    """The receiver's state for ``src`` in ``dest`` is readable (if present) and every block
    it claims is, in the partial file, exactly the source's bytes, with the right digest."""
    name = src.path.name
    statep = dest / f".{name}{STATE_SUFFIX}"
    part = dest / f".{name}{PART_SUFFIX}"
    try:
        raw = statep.read_bytes()
    except FileNotFoundError:
        return StateCheck(False, 0, 0)
    # a state file is created with its whole header (temporary file + rename): never torn
    parsed = parse_state(raw)
    ident = parsed.identity
    assert ident.name == name and ident.size == len(src.data), ident
    assert ident.block_size == block_size, ident
    total = ident.total_blocks
    digests = src.digests(block_size)
    assert total == len(digests)
    claimed = [i for i in range(total) if parsed.have[i]]
    if claimed:
        try:
            f = open(part, "rb")
        except FileNotFoundError:
            # finished meanwhile: the partial was renamed to its final name
            f = open(dest / name, "rb")
        with f:
            for i in claimed:
                recorded = bytes(parsed.digests[i * BLOCK_DIGEST_LEN : (i + 1) * BLOCK_DIGEST_LEN])
                assert recorded == digests[i], f"state records a wrong digest for block {i}"
                f.seek(i * block_size)
                got = f.read(block_size)
                want = src.data[i * block_size : (i + 1) * block_size]
                assert got == want, (
                    f"state claims block {i} of {total}, but the partial file does not hold it"
                )
    return StateCheck(True, len(claimed), total)


# ---------------------------------------------------------------- tracebacks

#: A known product bug (reported, see test_crash.py): when a sender worker's connection drops
#: while its main thread is sending, both threads report the failure; the main thread's exit
#: destroys the ZeroMQ context first and the ack-reader thread then dies with this traceback on
#: stderr. The transfer is not affected (the coordinator replaces the worker). Tolerated in the
#: scenario checks so that they stay deterministic; every other traceback fails them.
KNOWN_WORKER_TRACEBACK = "zmq.error.ZMQError: Socket operation on non-socket"


def tracebacks(stderr: str) -> list[str]:
    """The final exception line of every (possibly chained) traceback in ``stderr``."""
    out: list[str] = []
    in_tb = chained = False
    for line in stderr.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_tb = True
            continue
        if line.startswith(("During handling of the above", "The above exception was")):
            chained = True
            continue
        if in_tb and line.strip() and not line.startswith((" ", "\t")):
            if chained and out:
                out[-1] = line
            else:
                out.append(line)
            in_tb = chained = False
    return out


# ---------------------------------------------------------------- a transfer under fire

TARGETS = ("sender-coordinator", "sender-worker", "receiver-coordinator", "receiver-worker")


@dataclass
class KillPoint:
    target: str
    #: "progress": at a fraction of the blocks recorded; "time": seconds after start;
    #: "end": once every block is recorded (END, digest check, rename and receipt under way)
    mode: str
    fraction: float = 0.0
    delay: float = 0.0
    pick: int = 0  # which worker, when several

    @classmethod
    def draw(cls, rng: random.Random, target: str, *, span: float) -> KillPoint:
        mode = rng.choice(["progress", "progress", "time"])
        return cls(
            target=target,
            mode=mode,
            fraction=round(rng.uniform(0.05, 0.8), 3),
            delay=round(rng.uniform(0.0, span), 3),
            pick=rng.randrange(1 << 16),
        )

    def describe(self) -> str:
        when = {
            "progress": f"{self.fraction:.0%} of blocks",
            "time": f"{self.delay} s",
            "end": "the end",
        }[self.mode]
        return f"{self.target} at {when}"


@dataclass
class Kill:
    point: KillPoint
    pid: int
    state: StateCheck
    count_before: int
    sender_connected: bool
    had_stream: bool | None = None
    orphans: list[psutil.Process] = field(default_factory=list)


class Rig:
    """One file sent from a CLI sender to a CLI receiver (through a throttling relay when
    ``rate`` is set), with SIGKILLs at chosen points and restarts of what died."""

    def __init__(
        self,
        guard: ProcessGuard,
        keyfile: Path,
        src: Source,
        dest: Path,
        logdir: Path,
        *,
        workers: int = 2,
        recv_workers: int = 2,
        block_size: int = 256 * KB,
        rate: float = 6 * MB,
        label: str = "",
    ) -> None:
        self.guard = guard
        self.keyfile = keyfile
        self.src = src
        self.dest = dest
        self.logdir = logdir
        self.workers = workers
        self.recv_workers = recv_workers
        self.block_size = block_size
        self.rate = rate
        self.label = label
        self.total = -(-len(src.data) // block_size)
        self.receivers: list[CliReceiver] = []
        self.senders: list[CliSender] = []
        self.relay: ThrottleRelay | None = None
        self.port = 0
        self.kills: list[Kill] = []
        self.t0 = 0.0
        self.known_noise = 0

    # -- processes
    @property
    def receiver(self) -> CliReceiver:
        return self.receivers[-1]

    @property
    def sender(self) -> CliSender:
        return self.senders[-1]

    def start_receiver(self) -> CliReceiver:
        listen = f"127.0.0.1:{self.port}"
        r = CliReceiver(
            self.keyfile,
            self.dest,
            self.logdir,
            workers=self.recv_workers,
            once=False,
            listen=listen,
        )
        self.receivers.append(r)
        start_on_port(r, self.guard)
        if self.port == 0:
            self.port = r.port
        assert r.port == self.port
        return r

    @property
    def address(self) -> str:
        if self.relay is not None:
            return f"127.0.0.1:{self.relay.port}"
        return f"127.0.0.1:{self.port}"

    def start_sender(self) -> CliSender:
        s = CliSender(
            self.guard,
            self.src.path,
            self.address,
            self.keyfile,
            self.logdir,
            workers=self.workers,
            block_size=f"{self.block_size // KB}K",
        )
        self.senders.append(s.start())
        return s

    def start(self) -> Rig:
        self.start_receiver()
        if self.rate > 0:
            self.relay = ThrottleRelay(("127.0.0.1", self.port), self.rate).start()
        self.t0 = time.monotonic()
        self.start_sender()
        return self

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        for r in self.receivers:
            if r.proc is not None and r.proc.poll() is None:
                r.stop()

    # -- observation
    @property
    def statep(self) -> Path:
        return self.dest / f".{self.src.path.name}{STATE_SUFFIX}"

    def recorded(self) -> int:
        try:
            raw = self.statep.read_bytes()
            return parse_state(raw).count
        except (OSError, ValueError, Exception):
            return 0

    def context(self) -> str:
        parts = [f"[{self.label}] kills: {[k.point.describe() for k in self.kills]}"]
        for i, s in enumerate(self.senders):
            parts.append(f"sender#{i} rc={s.poll()} stderr={s.stderr[-1500:]!r}")
        for i, r in enumerate(self.receivers):
            rc = r.proc.poll() if r.proc is not None else None
            parts.append(f"receiver#{i} rc={rc} stderr={r.stderr[-1500:]!r}")
        return "\n".join(parts)

    def _victim(self, target: str, pick: int) -> tuple[psutil.Process | None, bool | None]:
        if target == "sender-coordinator":
            return (psutil.Process(self.sender.pid) if self.sender.poll() is None else None), None
        if target == "receiver-coordinator":
            proc = self.receiver.proc
            return (psutil.Process(proc.pid) if proc and proc.poll() is None else None), None
        if target == "sender-worker":
            if self.sender.poll() is not None:
                return None, None
            ws = workers_of(self.sender.pid, SENDER_WORKER)
            return (ws[pick % len(ws)] if ws else None), None
        assert target == "receiver-worker"
        proc = self.receiver.proc
        if proc is None or proc.poll() is not None:
            return None, None
        ws = workers_of(proc.pid, RECEIVER_WORKER)
        if not ws:
            return None, None
        busy = [w for w in ws if has_tcp_stream(w)]
        if busy:
            return busy[pick % len(busy)], True
        if all(has_tcp_stream(w) is None for w in ws):
            return ws[pick % len(ws)], None  # cannot look: any worker
        return None, None  # wait until a worker holds a stream

    def finished(self) -> bool:
        """The transfer completed (the receiver reported it) or nothing can make progress."""
        return self.received() is not None

    def received(self) -> dict[str, Any] | None:
        for r in self.receivers:
            try:
                lines = r.json_lines()
            except ValueError:
                continue
            for obj in lines:
                if os.path.basename(str(obj.get("file", ""))) == self.src.path.name:
                    return obj
        return None

    # -- kills
    def kill_at(self, kp: KillPoint, *, timeout: float = 45.0) -> Kill | None:
        """Wait for the kill point, SIGKILL the target, check the state at once. None when the
        transfer finished before the kill point came."""
        start = time.monotonic()
        threshold = max(1, int(kp.fraction * self.total))
        while True:
            if self.finished():
                return None
            if time.monotonic() - start > timeout:
                raise AssertionError(f"kill point {kp.describe()} never came\n{self.context()}")
            if kp.mode == "progress":
                ready = self.recorded() >= threshold
            elif kp.mode == "end":  # every block recorded, the end not yet reached
                ready = self.recorded() >= self.total
            else:
                ready = time.monotonic() - start >= kp.delay
            if ready:
                victim, had_stream = self._victim(kp.target, kp.pick)
                if victim is not None:
                    break
                if kp.target.startswith("sender") and self.sender.poll() is not None:
                    return None  # the sender finished (or gave up) before the kill point
            time.sleep(0.003)
        count_before = self.recorded()
        connected = self.relay.accepted > 0 if self.relay is not None else True
        orphans: list[psutil.Process] = []
        if kp.target.endswith("coordinator"):
            with contextlib.suppress(psutil.Error):
                orphans = victim.children(recursive=True)
            self.guard.note(orphans)
        self.guard.note([victim])
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            return None
        if kp.target == "sender-coordinator":
            assert self.sender.proc is not None
            self.sender.proc.wait(timeout=10)
        elif kp.target == "receiver-coordinator":
            assert self.receiver.proc is not None
            self.receiver.proc.wait(timeout=10)
        else:
            assert wait_dead(victim), f"{kp.target} {victim.pid} survived SIGKILL"
        state = check_state_claims(self.dest, self.src, self.block_size)
        kill = Kill(kp, victim.pid, state, count_before, connected, had_stream, orphans)
        self.kills.append(kill)
        return kill

    def recover(self, kill: Kill) -> None:
        """Restart what the kill took down (workers are the coordinators' business)."""
        target = kill.point.target
        if target == "sender-coordinator":
            self.start_sender()
        elif target == "receiver-coordinator":
            self.start_receiver()
            if self.sender.poll() == 4:
                self.start_sender()

    # -- the end
    def finish(self, timeout: float = 90.0) -> CliRun:
        """The last sender succeeds (re-run once if it gave up while the receiver was down);
        the receiver reports the file; then every end-of-transfer promise is checked."""
        run = self.sender.wait(timeout)
        if run.rc == 4 and any(k.point.target == "receiver-coordinator" for k in self.kills):
            run = self.start_sender().wait(timeout)
        ctx = self.context()
        assert run.rc == 0, f"stx send exited {run.rc}\n{ctx}"
        result = run.json()
        assert result["blocks_total"] == self.total, result
        assert result["bytes"] == len(self.src.data), result
        assert result["block_size"] == self.block_size, result
        assert result["digest"] == expected_digest(self.src.path, self.block_size), result
        assert result["blocks_resumed"] + result["blocks_sent"] >= self.total, result
        assert 0 <= result["blocks_resumed"] <= self.total, result
        assert wait_for(lambda: self.received() is not None, timeout=30), (
            f"the receiver never reported the file\n{ctx}"
        )
        got = self.received()
        assert got is not None and got["digest"] == result["digest"], got
        assert got["bytes"] == len(self.src.data) and got["blocks_total"] == self.total, got
        final = self.dest / self.src.path.name
        assert sha256_file(final) == self.src.sha256, f"the copy differs from the source\n{ctx}"
        assert_dest_exactly(self.dest, {self.src.path.name})
        for text in [s.stderr for s in self.senders] + [r.stderr for r in self.receivers]:
            assert "internal error" not in text, ctx
            for exc in tracebacks(text):
                if KNOWN_WORKER_TRACEBACK in exc:
                    self.known_noise += 1
                else:
                    raise AssertionError(f"a traceback on stderr: {exc}\n{ctx}")
        return run


@pytest.fixture
def rig_factory(
    procs: ProcessGuard, fault_key: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """``rig_factory(src, **kw)`` -> a started :class:`Rig` writing into a fresh directory.

    The processes get ``TMPDIR`` inside the scratch directory: the private IPC directories
    of SIGKILLed coordinators (which cannot clean up after themselves) go with it."""
    rigs: list[Rig] = []
    logdir = scratch / "logs"
    logdir.mkdir(exist_ok=True)
    tmp = scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmp))

    def factory(src: Source, *, start: bool = True, **kw: Any) -> Rig:
        dest = scratch / f"dest{len(rigs)}"
        dest.mkdir()
        rig = Rig(procs, fault_key, src, dest, logdir, **kw)
        rigs.append(rig)
        return rig.start() if start else rig

    try:
        yield factory
    finally:
        for rig in rigs:
            with contextlib.suppress(Exception):
                rig.stop()


def start_on_port(r: CliReceiver, guard: Any) -> None:
    """Start ``r``; its port may be briefly unavailable right after a SIGKILL of the receiver
    that had it: try again for up to 20 s. ``guard`` tracks every process started."""
    deadline = time.monotonic() + 20
    while True:
        try:
            r.start()
            break
        except AssertionError:
            if r.proc is not None:
                guard.track(r.proc)
            if time.monotonic() > deadline or "address already in use" not in r.stderr:
                raise
            time.sleep(0.1)
    assert r.proc is not None
    guard.track(r.proc)


@pytest.fixture
def kit() -> Any:
    """The helper classes and functions, for tests that need them by name."""

    class Kit:
        KillPoint = KillPoint
        Rig = Rig
        Source = Source
        CliSender = CliSender
        TARGETS = TARGETS
        SENDER_WORKER = SENDER_WORKER
        RECEIVER_WORKER = RECEIVER_WORKER
        make_source = staticmethod(make_source)
        check_state_claims = staticmethod(check_state_claims)
        workers_of = staticmethod(workers_of)
        start_on_port = staticmethod(start_on_port)

    return Kit


# ---------------------------------------------------------------- shared by the relay tests


@pytest.fixture
def stx_key(scratch: Path) -> tuple[Path, bytes]:
    path = scratch / "stx.key"
    return path, make_keyfile(path)


@pytest.fixture
def dest(scratch: Path) -> Path:
    path = scratch / "dst"
    path.mkdir()
    return path


@pytest.fixture
def receiver(dest: Path, stx_key: tuple[Path, bytes]) -> Iterator[stxpar.Receiver]:
    with stxpar.Receiver(dest, psk=stx_key[1], host="127.0.0.1", port=0, workers=2) as r:
        yield r


@pytest.fixture
def group(scratch: Path) -> Iterator[ProcGroup]:
    g = ProcGroup(scratch / "logs")
    try:
        yield g
    finally:
        g.kill_all()


@pytest.fixture
def continue_stopped_workers() -> Iterator[None]:
    """For tests that SIGSTOP a worker: a failed one must not leave a stopped process behind
    (teardown kills it anyway)."""
    yield
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if p.status() == psutil.STATUS_STOPPED:
                    p.send_signal(signal.SIGCONT)
