"""No (key, nonce) pair is ever sealed twice, across processes, kills, reconnects and resumes.

Every process of every transfer here (the sender coordinator, run through a small driver script
so that ``SendOptions(rekey_records=3)`` can be set; its worker processes; the ``stx recv``
coordinator, which seals METADATA_ACK and RECEIPT; its workers) starts with
``PYTHONPATH=nonce_probe/`` and ``STX_NONCE_LOG=<log>``: ``nonce_probe/sitecustomize.py`` wraps
cryptography's AESGCM and appends ``sha256(key)[:16] nonce pid role`` for every ``encrypt`` and
``encrypt_into`` call (it only observes; the real AESGCM does the work). The scenarios, all with a
tiny rekey limit (3 records per stream key) so that epochs ratchet constantly:

1. a clean 4-worker transfer;
2. a sender worker SIGKILLed mid-transfer (its blocks go out again on a replacement stream);
3. the receiver (its whole process tree) SIGKILLed and restarted on the same port under a
   running sender (the sender reconnects: a new session);
4. the sender (its whole process tree) SIGKILLed mid-transfer, then run again (a resume).

Scenarios 2-4 go through a throttling TCP relay so that the kills land mid-transfer. Each
scenario checks its own part of the log, and the last test checks the whole log: no
(key hash, nonce) pair appears twice, the log is not empty, lines come from the sender's worker
processes and from the receiver, and there are many distinct keys.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from itest_support import STX, assert_no_secrets, free_port, is_worker, register_key, wait_for
from tcp_relay import UP, Direction, RelayConnection, TcpRelay

from stxpar import state
from stxpar.psk import load_key_file, write_key_file

PROBE_DIR = Path(__file__).resolve().parent / "nonce_probe"
BLOCK = 64 << 10
SIZE = 3 << 20
TOTAL_BLOCKS = SIZE // BLOCK
REKEY_RECORDS = 3
#: bytes per second per relayed connection in the scenarios that kill something mid-transfer
THROTTLE = 768 << 10
#: blocks the receiver must have recorded before a kill (of TOTAL_BLOCKS)
KILL_AFTER = 6

DRIVER = """\
import json, sys
import stxpar
from stxpar.netio import Backoff

path, host, port, keyfile, workers, rekey = sys.argv[1:]
options = stxpar.SendOptions(
    workers=int(workers),
    block_size=65536,
    rekey_records=int(rekey),
    max_retries=40,
    stall_timeout=10.0,
    backoff=Backoff(initial=0.05, factor=2.0, cap=0.5),
)
try:
    result = stxpar.send(path, host, int(port), psk=stxpar.load_key_file(keyfile), options=options)
except stxpar.StxError as exc:
    print(f"driver: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
print(json.dumps(result.as_json()))
"""

_LISTENING = re.compile(r"listening on (\S+):(\d+)\b")


class Throttle(TcpRelay):
    """Forwards sender -> receiver at about THROTTLE bytes/s per connection."""

    def transform(self, conn: RelayConnection, direction: Direction, data: bytes) -> bytes | None:
        if direction == UP and len(data) > 4096:
            time.sleep(len(data) / THROTTLE)
        return data


@dataclass
class Line:
    key: str
    nonce: str
    pid: int
    role: str

    @property
    def sender_worker(self) -> bool:
        return self.role == "workers/sender.py"


@dataclass
class Probe:
    """The log, the environment that turns the probe on, and every process started here."""

    root: Path
    log: Path
    keyfile: Path
    src: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scenarios: set[str] = field(default_factory=set)

    def lines(self, start: int = 0) -> list[Line]:
        if not self.log.exists():
            return []
        out = []
        with open(self.log, "rb") as f:
            f.seek(start)
            data = f.read()
            # a line still being written by a live process is left for the next read
            for raw in data[: data.rfind(b"\n") + 1].decode().splitlines():
                key, nonce, pid, role = raw.split(" ")
                assert len(key) == 32 and len(nonce) == 24, raw
                out.append(Line(key, nonce, int(pid), role))
        return out

    def offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def popen(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        assert_no_secrets(argv)
        with (
            open(self.root / f"{name}.out", "wb") as out,
            open(self.root / f"{name}.err", "wb") as err,
        ):
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env
            )
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> tuple[str, str]:
        out = (self.root / f"{name}.out").read_text(errors="replace")
        err = (self.root / f"{name}.err").read_text(errors="replace")
        assert_no_secrets(out, err)
        return out, err

    def receiver(self, dest: Path, name: str, port: int = 0) -> tuple[subprocess.Popen[bytes], int]:
        dest.mkdir(exist_ok=True)
        argv = [
            str(STX), "recv", "--listen", f"127.0.0.1:{port}", "--psk-file", str(self.keyfile),
            "--dest", str(dest), "--workers", "2", "--json",
        ]  # fmt: skip
        proc = self.popen(argv, name)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.output(name)[1])
            if m:
                return proc, int(m.group(2))
            assert proc.poll() is None, f"stx recv exited: {self.output(name)[1]!r}"
            time.sleep(0.02)
        raise AssertionError(f"stx recv did not start: {self.output(name)[1]!r}")

    def sender(self, port: int, name: str, workers: int = 3) -> subprocess.Popen[bytes]:
        driver = self.root / "driver.py"
        argv = [sys.executable, str(driver), str(self.src), "127.0.0.1", str(port)]
        argv += [str(self.keyfile), str(workers), str(REKEY_RECORDS)]
        return self.popen(argv, name)

    def finished(self, proc: subprocess.Popen[bytes], name: str, timeout: float = 60) -> dict:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} did not finish: {self.output(name)[1][-2000:]!r}"
            ) from None
        out, err = self.output(name)
        assert rc == 0, f"{name} failed with {rc}: {err[-2000:]!r}"
        result = json.loads(out.strip().splitlines()[-1])
        assert isinstance(result, dict)
        return result


def kill_trees(*pids: int) -> None:
    """SIGKILL processes and every descendant (all collected first, so none is missed)."""
    victims: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            victims += [root, *root.children(recursive=True)]
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)


def sender_workers(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    return [c for c in children if is_worker(c, "stxpar.workers.sender")]


def held(dest: Path) -> int:
    """Blocks the receiver's resume log records as durable (0 before it exists)."""
    try:
        parsed = state.load(dest / f".{SRC_NAME}.stxstate")
    except Exception:  # mid-write: ask again shortly
        return 0
    return 0 if parsed is None else sum(parsed.have)


SRC_NAME = "payload.bin"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probe]:
    root = tmp_path_factory.mktemp("nonce")
    keyfile = write_key_file(root / "stx.key")
    register_key(load_key_file(keyfile))
    src = root / SRC_NAME
    src.write_bytes(random.Random(11).randbytes(SIZE))
    (root / "driver.py").write_text(DRIVER)
    env = dict(os.environ)
    env.pop("STX_PSK_FILE", None)
    env.pop("STX_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROBE_DIR), env.get("PYTHONPATH")]))
    env["STX_NONCE_LOG"] = str(root / "nonces.log")
    p = Probe(root, root / "nonces.log", keyfile, src, env)
    try:
        yield p
    finally:
        kill_trees(*(proc.pid for proc in p.procs if proc.poll() is None))
        for proc in p.procs:
            proc.wait(timeout=10)


def assert_unique(lines: list[Line]) -> None:
    seen: collections.Counter[tuple[str, str]] = collections.Counter(
        (ln.key, ln.nonce) for ln in lines
    )
    repeated = [(pair, n) for pair, n in seen.items() if n > 1]
    assert not repeated, f"{len(repeated)} (key, nonce) pairs sealed more than once: {repeated[:5]}"


def check_scenario(probe: Probe, name: str, start: int) -> list[Line]:
    """This scenario's lines: unique pairs, data keys within the rekey limit, probe in workers."""
    lines = probe.lines(start)
    assert lines, "the probe recorded nothing: was it loaded?"
    assert_unique(lines)
    workers = [ln for ln in lines if ln.sender_worker]
    assert workers, (
        f"no seal recorded in a sender worker process: {sorted({ln.role for ln in lines})}"
    )
    per_key = collections.Counter(ln.key for ln in workers)
    assert max(per_key.values()) <= REKEY_RECORDS, (
        "a data key sealed more than rekey_records records"
    )
    # every block went out at least once, each key sealed at most 3 of them
    assert len(workers) >= TOTAL_BLOCKS
    assert len(per_key) >= TOTAL_BLOCKS // REKEY_RECORDS
    # the receiver's coordinator (``stx recv``) sealed its METADATA_ACK and RECEIPT too
    assert any(ln.role == "bin/stx" for ln in lines)
    probe.scenarios.add(name)
    return lines


def assert_delivered(dest: Path, src: Path) -> None:
    assert (dest / SRC_NAME).read_bytes() == src.read_bytes()
    assert not list(dest.glob(".*.stxpart"))


@pytest.mark.timeout(60)
def test_the_probe_sees_a_repeated_nonce(probe: Probe) -> None:
    """The check is not vacuous: a process that seals twice under one (key, nonce) through
    the AESGCM name records.py imports is caught (own log, not the scenarios' one)."""
    log = probe.root / "self-test.log"
    code = (
        "from stxpar.records import AESGCM\n"
        "a = AESGCM(bytes(32)); n = bytes(12)\n"
        "a.encrypt(n, b'one', b''); buf = bytearray(19); a.encrypt_into(n, b'two', b'', buf)\n"
    )
    env = {**probe.env, "STX_NONCE_LOG": str(log)}
    subprocess.run([sys.executable, "-P", "-c", code], env=env, check=True, timeout=30)
    lines = Probe(probe.root, log, probe.keyfile, probe.src, env).lines()
    assert len(lines) == 2 and lines[0].key != bytes(32).hex()[:32]  # a hash, not the key
    with pytest.raises(AssertionError, match="sealed more than once"):
        assert_unique(lines)


@pytest.mark.timeout(120)
def test_tiny_rekey_limit_multi_worker(probe: Probe) -> None:
    start = probe.offset()
    dest = probe.root / "dest-rekey"
    _, port = probe.receiver(dest, "recv-rekey")
    result = probe.finished(probe.sender(port, "send-rekey", workers=4), "send-rekey")
    assert result["blocks_total"] == TOTAL_BLOCKS and result["workers"] == 4
    assert_delivered(dest, probe.src)
    check_scenario(probe, "rekey", start)


@pytest.mark.timeout(120)
def test_sender_worker_killed_mid_transfer(probe: Probe) -> None:
    start = probe.offset()
    dest = probe.root / "dest-worker-kill"
    _, port = probe.receiver(dest, "recv-worker-kill")
    with Throttle(("127.0.0.1", port)) as relay:
        sender = probe.sender(relay.port, "send-worker-kill")
        assert wait_for(lambda: held(dest) >= KILL_AFTER, timeout=30), "no progress to kill into"
        assert held(dest) < TOTAL_BLOCKS, "the transfer finished before the kill"
        # the worker that sealed the most is the likeliest to have blocks still unacknowledged
        sealed = collections.Counter(ln.pid for ln in probe.lines(start) if ln.sender_worker)
        victims = sorted(sender_workers(sender.pid), key=lambda p: -sealed[p.pid])
        assert victims, "no sender worker to kill"
        victims[0].send_signal(signal.SIGKILL)
        result = probe.finished(sender, "send-worker-kill")
    assert result["streams_replaced"] >= 1, result
    assert_delivered(dest, probe.src)
    check_scenario(probe, "worker-kill", start)


@pytest.mark.timeout(120)
def test_receiver_restarted_under_a_running_sender(probe: Probe) -> None:
    start = probe.offset()
    dest = probe.root / "dest-recv-restart"
    port = free_port()
    receiver, _ = probe.receiver(dest, "recv-restart-1", port=port)
    with Throttle(("127.0.0.1", port)) as relay:
        sender = probe.sender(relay.port, "send-recv-restart")
        assert wait_for(lambda: held(dest) >= KILL_AFTER, timeout=30), "no progress to kill into"
        assert held(dest) < TOTAL_BLOCKS, "the transfer finished before the kill"
        kill_trees(receiver.pid)
        probe.receiver(dest, "recv-restart-2", port=port)
        result = probe.finished(sender, "send-recv-restart")
    assert result["reconnects"] >= 1, result
    assert_delivered(dest, probe.src)
    check_scenario(probe, "receiver-restart", start)


@pytest.mark.timeout(120)
def test_resume_after_the_sender_was_killed(probe: Probe) -> None:
    start = probe.offset()
    dest = probe.root / "dest-send-kill"
    _, port = probe.receiver(dest, "recv-send-kill")
    with Throttle(("127.0.0.1", port)) as relay:
        first = probe.sender(relay.port, "send-kill-1")
        assert wait_for(lambda: held(dest) >= KILL_AFTER, timeout=30), "no progress to kill into"
        assert held(dest) < TOTAL_BLOCKS, "the transfer finished before the kill"
        kill_trees(first.pid)
    before = held(dest)
    result = probe.finished(probe.sender(port, "send-kill-2"), "send-kill-2")
    assert result["blocks_resumed"] >= before >= KILL_AFTER, (before, result)
    assert_delivered(dest, probe.src)
    check_scenario(probe, "sender-kill-resume", start)


@pytest.mark.timeout(30)
def test_whole_log_no_key_nonce_pair_repeats(probe: Probe) -> None:
    """Runs last: every line every scenario logged, in every process, all together."""
    lines = probe.lines()
    if not lines:
        pytest.skip("no scenario ran in this session")
    assert_unique(lines)
    keys = {ln.key for ln in lines}
    assert len(keys) >= TOTAL_BLOCKS // REKEY_RECORDS, len(keys)
    assert len({ln.pid for ln in lines if ln.sender_worker}) >= len(probe.scenarios)
    assert {ln.role for ln in lines} >= {"workers/sender.py", "bin/stx"}
    if len(probe.scenarios) == 4:
        # 4 transfers of 48 blocks, at most 3 records per data key, plus the control keys
        assert len(keys) >= 4 * (TOTAL_BLOCKS // REKEY_RECORDS) + 8, len(keys)
