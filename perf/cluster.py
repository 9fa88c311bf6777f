"""Benchmark one sender host against three (two helpers joined), each uplink shaped (issue 14),
and with ``--side recv`` one receiving host against three, each downlink shaped.

    python perf/cluster.py                      # 600M file, 400mbit uplinks, 3 rounds
    python perf/cluster.py --size 200M --rounds 1 --no-warmup   # a quick try
    python perf/cluster.py --side recv          # the receiving side (``both``: one, then the other)

Builds a network lab (tests/netlab.py; root needed): a receiver host ``recv`` (unshaped) and
three sender hosts ``s0``, ``s1``, ``s2`` whose uplinks are shaped with tbf to ``--rate``, so
that the links, not the CPUs, are the bottleneck. A random file of ``--size`` in a private
scratch directory under ``--dir`` (/dev/shm, seen by every namespace) is sent to
``stx recv --once`` (in ``recv``, its destination in the scratch directory) two ways:

* ``one``: ``stx send FILE RECV:PORT --workers 4`` in s0;
* ``three``: ``stx worker --join S0:PORT --workers 4 --once`` in s1 and s2, started first, and
  right after them ``stx send ... --workers 4 --cluster S0:PORT --cluster-workers 8`` in s0.

Rounds are interleaved (the order alternates from round to round) after an untimed warm-up
of each. Wall time runs from starting the first process of the sending side (the helpers, for
``three``) to the sender's exit (after the receiver's receipt). Every copy is checked with
sha256 against the source. Prints median seconds and MB/s of each and the ratio of their
throughputs (target >= 2.4), the load average, and per run the share of the two CPUs that
the machine and the receiver used (so a CPU-bound run shows); ``--json-out`` writes every run
(the sender's ``--json`` with its ``hosts``, the helpers' timed log lines, bytes each uplink
carried). The lab, every process and the scratch directory are removed at the end, also on
Ctrl-C, SIGTERM or SIGHUP. See perf/README.md.

``--side recv``: one sender host ``snd`` (unshaped) and three receiving hosts ``r0``, ``r1``,
``r2`` whose downlinks are shaped with tbf to ``--rate`` (``rate_in``). ``stx send FILE
R0:PORT --workers 12`` in snd sends to

* ``one``: ``stx recv --workers 4 --once`` in r0;
* ``three``: ``stx worker --join R0:7000 --data-listen RN:0 --workers 4 --once`` in r1 and r2,
  started first, and ``stx recv ... --workers 4 --cluster R0:7000 --cluster-workers 8`` in r0,
  all three with the same ``--dest`` (the scratch directory: every namespace sees it).

The receiving side is started and ready (listening, the helpers joined) before the clock
starts, as for ``one`` the receiver is; wall time is ``stx send``'s run. The receiver's
``--json`` ``streams`` and ``hosts`` (streams served per host) and each helper's ``transfer
done: N blocks landed`` show that the helpers took their share.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import peers  # noqa: E402
from netlab import Host, Lab, available  # noqa: E402

CONFIGS = ("one", "three")
RECV_PORT = 9000
CLUSTER_PORT = 7000
TARGET = 2.4
SRC_NAME = "cluster-src.bin"
HELPERS = ("s1", "s2")
RECV_HELPERS = ("r1", "r2")
#: a run counts as possibly CPU-bound when the machine's CPUs were this busy over it
BUSY_FLAG = 0.85


def say(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """``200M``, ``600MB``, ``1G`` (powers of 1024, as perf/tree.py) or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200M, 600MB)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return float(total - idle), float(total)


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` so far: its own plus its reaped children's (utime .. cstime)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = stat.rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


def tbf_sent(host: Host, ingress: bool = False) -> int:
    m = re.search(r"Sent (\d+) bytes", host.qdisc_stats(ingress=ingress))
    return int(m.group(1)) if m else 0


def rx_bytes(host: Host, counter: str = "rx_bytes") -> int:
    """Bytes the host has sent: what its bridge-side veth peer (root namespace) received;
    with ``counter="tx_bytes"`` the bytes it has received (what the peer sent it)."""
    return int(Path(f"/sys/class/net/{host.peer}/statistics/{counter}").read_text())


class Uplinks:
    """Samples every sender's uplink (bytes sent, from the root namespace) every ``interval``
    seconds from ``t0`` until stopped: when each uplink started and stopped carrying data.
    ``counter="tx_bytes"`` samples downlinks instead (bytes each host received)."""

    def __init__(
        self, hosts: list[Host], t0: float, interval: float = 0.05, counter: str = "rx_bytes"
    ) -> None:
        self.hosts = hosts
        self.t0 = t0
        self.interval = interval
        self.counter = counter
        self.base = [rx_bytes(h, counter) for h in hosts]
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self.t0
            try:
                sent = [
                    rx_bytes(h, self.counter) - b
                    for h, b in zip(self.hosts, self.base, strict=True)
                ]
            except (OSError, ValueError):
                return  # the lab is going away
            self.samples.append((now, sent))
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, dict[str, float]]:
        """Per host: bytes, and the times (s since t0) its first and last MiB went out."""
        self._stop.set()
        self._thread.join(5)
        out: dict[str, dict[str, float]] = {}
        for i, h in enumerate(self.hosts):
            total = self.samples[-1][1][i] if self.samples else 0
            with contextlib.suppress(OSError, ValueError):
                total = rx_bytes(h, self.counter) - self.base[i]
            first = next((t for t, b in self.samples if b[i] >= 1 << 20), None)
            last = next((t for t, b in self.samples if b[i] >= total - (1 << 20)), None)
            out[h.name] = {"bytes": total}
            if total > 2 << 20 and first is not None and last is not None:
                out[h.name].update(first_mib_s=first, last_mib_s=last)
        return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


class Failed(Exception):
    pass


class TimedLog:
    """Copies a process's stderr to a file and keeps each line with its time since ``t0``."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._pump, args=(stream, path), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes], path: Path) -> None:
        with open(path, "wb") as out:
            for raw in iter(stream.readline, b""):
                out.write(raw)
                out.flush()
                line = raw.decode(errors="replace").rstrip()
                self.lines.append((time.monotonic(), line))
        stream.close()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def relative(self, t0: float) -> list[tuple[float, str]]:
        return [(round(t - t0, 3), line) for t, line in self.lines]


@dataclass
class Run:
    """One timed run's processes, the helpers' timed logs, its shaped links' sampler and its
    destination: what ``ClusterBench.finish`` reaps and ``ClusterBench.end`` tears down."""

    dst: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, TimedLog] = field(default_factory=dict)
    helpers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    links: Uplinks | None = None


class ClusterBench:
    def __init__(self, args: argparse.Namespace, lab: Lab) -> None:
        self.args = args
        self.lab = lab
        self.stx = args.stx or str(Path(sys.executable).with_name("stx"))
        if not os.access(self.stx, os.X_OK):
            self.stx = shutil.which(self.stx) or shutil.which("stx") or self.stx
        self.root = Path(tempfile.mkdtemp(prefix="stx-cluster-", dir=args.dir))  # mode 0700
        self.env = peers.installed_env(self.root / "pycache")
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.key = self.root / "psk.key"
        self.src = self.root / "src" / SRC_NAME
        self.src_sha = ""
        self.stale: list[Path] = []
        self.runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
        self.seq = 0
        self.started = dt.datetime.now().astimezone()
        self.load_start = os.getloadavg()
        self.hosts: dict[str, Host] = {}

    # ------------------------------------------------------------ setup

    def prepare(self) -> None:
        """The room for the source and one copy, and the key."""
        a = self.args
        need = 2 * a.size + (256 << 20)
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise SystemExit(f"cluster: {a.dir} has {free >> 20} MiB free; this needs {need >> 20}")
        subprocess.run([self.stx, "keygen", "-o", str(self.key)], check=True, capture_output=True)
        os.chmod(self.key, 0o600)

    def setup(self) -> None:
        a = self.args
        self.prepare()
        self.hosts["recv"] = self.lab.add_host("recv")
        for name in ("s0", *HELPERS):
            self.hosts[name] = self.lab.add_host(
                name, rate=a.rate, burst=a.burst, latency=a.latency
            )
        say(
            f"lab: recv {self.hosts['recv'].addr} (unshaped), s0/s1/s2"
            f" {', '.join(self.hosts[h].addr for h in ('s0', *HELPERS))} (uplinks tbf {a.rate},"
            f" burst {a.burst}, latency {a.latency})"
        )
        self.make_source()

    def make_source(self) -> None:
        a = self.args
        say(f"making {a.size / 1e6:.1f} MB of random data in {self.src}")
        self.src.parent.mkdir()
        h = hashlib.sha256()
        with open(self.src, "wb") as f:
            left = a.size
            while left:
                chunk = os.urandom(min(left, 16 << 20))
                f.write(chunk)
                h.update(chunk)
                left -= len(chunk)
        self.src_sha = h.hexdigest()

    # ------------------------------------------------------------ processes

    def start(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """``argv`` in ``host``'s namespace, under a UTS namespace named after the host (the
        lab's namespaces share the machine's hostname, and ``stx send --json`` counts workers
        per host name)."""
        wrapped = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, *argv]
        return self.hosts[host].popen(wrapped, env=self.env, **kw)

    @staticmethod
    def reap(proc: subprocess.Popen[bytes], deadline: float) -> float:
        """Wait for ``proc`` (pidfd) until ``deadline``; its CPU seconds, children it waited
        for included (``wait4``). Raises ``Failed`` after SIGKILLing it on timeout."""
        if proc.returncode is not None:
            return 0.0
        fd = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        if not ready:
            proc.kill()
            proc.wait()
            raise Failed(f"{proc.args[-1] if proc.args else proc.pid}: timed out")
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return ru.ru_utime + ru.ru_stime

    def tag(self, name: str) -> str:
        self.seq += 1
        return f"{self.seq:03d}-{name}"

    def verify(
        self,
        rec: dict[str, Any],
        tag: str,
        helpers: Iterable[str],
        dst: Path,
        serr: Path,
        rerr: Path,
    ) -> None:
        """Failed unless every process exited 0 and the copy in ``dst`` is the source."""
        bad = {k: v for k, v in rec["rc"].items() if v != 0}
        if bad:
            tails = [f"send: {self.err_tail(serr)}", f"recv: {self.err_tail(rerr)}"]
            tails += [f"{h}: {self.err_tail(self.logs / f'{tag}-{h}.err')}" for h in helpers]
            raise Failed(f"exit {bad}: {'; '.join(tails)}")
        copy = dst / SRC_NAME
        if not copy.is_file():
            raise Failed(f"no {copy}: {sorted(p.name for p in dst.iterdir())}")
        got = sha256(copy)
        rec["sha256_ok"] = got == self.src_sha
        if not rec["sha256_ok"]:
            raise Failed(f"the copy differs: sha256 {got[:16]}... != {self.src_sha[:16]}...")
        rec["ok"] = True

    def err_tail(self, path: Path) -> str:
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-3:])[-400:]

    def release(self) -> None:
        for p in self.stale:
            shutil.rmtree(p, ignore_errors=True)
        self.stale.clear()

    # ------------------------------------------------------------ one run

    def start_helpers(
        self, run: Run, tag: str, coordinator: str, names: Iterable[str], *extra: str
    ) -> None:
        """``stx worker --join`` the coordinator on host ``coordinator`` on each host of
        ``names``, with ``extra`` options ("{addr}" in one is that host's address)."""
        join = self.hosts[coordinator].addr
        for h in names:
            hargv = [self.stx, "worker", "--join", f"{join}:{CLUSTER_PORT}"]
            hargv += ["--psk-file", str(self.key), "--workers", str(self.args.helper_workers)]
            hargv += [x.format(addr=self.hosts[h].addr) for x in extra] + ["--once"]
            p = self.start(h, hargv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert p.stderr is not None
            run.logs[h] = TimedLog(p.stderr, self.logs / f"{tag}-{h}.err")
            run.helpers[h] = p
            run.procs.append(p)

    def timed_send(
        self,
        rec: dict[str, Any],
        run: Run,
        recv: subprocess.Popen[bytes],
        tag: str,
        host: str,
        argv: list[str],
        *,
        t0: float,
        before: tuple[tuple[float, float], float, dict[str, float], dict[str, int]],
        count: Callable[[str], int],
        links_key: str,
    ) -> Path:
        """Start the timed ``stx send`` (``argv``) in ``host``, its output in the logs, then
        ``finish``; the path of its stderr."""
        serr = self.logs / f"{tag}-send.err"
        with open(serr, "wb") as err, open(self.logs / f"{tag}-send.out", "wb") as out:
            send = self.start(host, argv, stdout=out, stderr=err)
        run.procs.append(send)
        self.finish(rec, run, send, recv, t0=t0, before=before, count=count, links_key=links_key)
        return serr

    def finish(
        self,
        rec: dict[str, Any],
        run: Run,
        send: subprocess.Popen[bytes],
        recv: subprocess.Popen[bytes],
        *,
        t0: float,
        before: tuple[tuple[float, float], float, dict[str, float], dict[str, int]],
        count: Callable[[str], int],
        links_key: str,
    ) -> None:
        """Everything measured once the timed sender is started at ``t0``: its wall time,
        the links' timelines (``rec[links_key]``), each process reaped with its CPU time,
        the machine's busy share, the bytes through each shaped link (``count``), the
        helpers' timed logs. ``before``: the machine's, the receiver's and the helpers' CPU
        and the links' counts at ``t0``."""
        busy0, recv_cpu0, helper_cpu0, counts0 = before
        assert run.links is not None
        send_cpu = self.reap(send, t0 + self.args.timeout)
        rec["wall"] = time.monotonic() - t0
        busy1 = cpu_busy()
        rec[links_key] = run.links.stop()
        counts1 = {h: count(h) for h in counts0}
        end = time.monotonic() + (30 if send.returncode == 0 else 3)
        recv_cpu = self.reap(recv, end) - recv_cpu0
        helper_cpu = {}
        for h, p in run.helpers.items():
            helper_cpu[h] = self.reap(p, end) - helper_cpu0.get(h, 0.0)
            run.logs[h].join()
        busy = (busy1[0] - busy0[0]) / max(1.0, busy1[1] - busy0[1])
        rec.update(
            rc={"send": send.returncode, "recv": recv.returncode}
            | {h: p.returncode for h, p in run.helpers.items()},
            cpu_s={"send": send_cpu, "recv": recv_cpu} | helper_cpu,
            machine_busy=busy,
            recv_cores=recv_cpu / rec["wall"],
            tbf_bytes={h: counts1[h] - counts0[h] for h in counts0},
            helper_log={h: log.relative(t0) for h, log in run.logs.items()},
        )
        rec["maybe_cpu_bound"] = busy >= BUSY_FLAG

    def stx_json(self, tag: str, who: str) -> dict[str, Any] | None:
        """The ``--json`` line ``stx send`` or ``stx recv`` (``who``) printed, if any."""
        try:
            lines = (self.logs / f"{tag}-{who}.out").read_text().strip().splitlines()
            got = json.loads(lines[-1]) if lines else None
        except (ValueError, OSError):
            return None
        return got if isinstance(got, dict) else None

    def end(self, run: Run) -> None:
        """A run's links sampler stopped, its processes killed, its logs closed."""
        if run.links is not None:
            run.links.stop()
        for p in run.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in run.logs.values():
            log.join(1.0)
        self.stale.append(run.dst)

    def run_once(self, cfg: str, round_no: int) -> dict[str, Any]:
        a = self.args
        tag = self.tag(cfg)
        dst = Path(tempfile.mkdtemp(prefix=f"dst-{cfg}-", dir=self.root))
        recv_addr = self.hosts["recv"].addr
        s0 = self.hosts["s0"].addr
        rec: dict[str, Any] = {"round": round_no, "ok": False, "loadavg": os.getloadavg()[0]}
        run = Run(dst)
        try:
            rargv = [self.stx, "recv", "--listen", f"{recv_addr}:{RECV_PORT}"]
            rargv += ["--psk-file", str(self.key), "--dest", str(dst), "--once", "--json"]
            if a.recv_workers:
                rargv += ["--workers", str(a.recv_workers)]
            rerr = self.logs / f"{tag}-recv.err"
            with open(rerr, "wb") as err, open(self.logs / f"{tag}-recv.out", "wb") as out:
                recv = self.start("recv", rargv, stdout=out, stderr=err)
            run.procs.append(recv)
            try:
                peers.wait_for_text(rerr, "listening on", recv, 60)
            except RuntimeError as exc:
                raise Failed(f"stx recv: {exc}") from None
            sargv = [self.stx, "send", str(self.src), f"{recv_addr}:{RECV_PORT}"]
            sargv += ["--psk-file", str(self.key), "--json", "--quiet", "--workers", str(a.workers)]
            if cfg == "three":
                sargv += ["--cluster", f"{s0}:{CLUSTER_PORT}"]
                sargv += ["--cluster-workers", str(a.cluster_workers)]
            self.release()
            uplinks = ("s0", *HELPERS)
            sent0 = {h: tbf_sent(self.hosts[h]) for h in uplinks}
            no_cpu_yet: dict[str, float] = {}  # (the helpers start with the clock)
            before = (cpu_busy(), tree_cpu(recv.pid), no_cpu_yet, sent0)
            t0 = time.monotonic()
            run.links = Uplinks([self.hosts[h] for h in uplinks], t0)
            if cfg == "three":
                self.start_helpers(run, tag, "s0", HELPERS)
            serr = self.timed_send(
                rec,
                run,
                recv,
                tag,
                "s0",
                sargv,
                t0=t0,
                before=before,
                count=lambda h: tbf_sent(self.hosts[h]),
                links_key="uplinks",
            )
            rec["stx_json"] = self.stx_json(tag, "send")
            self.verify(rec, tag, run.helpers, dst, serr, rerr)
        except (Failed, OSError, subprocess.SubprocessError) as exc:
            rec["error"] = str(exc)
            say(f"{cfg}, {self.when(round_no)}: FAILED: {exc}")
        finally:
            self.end(run)
        if rec["ok"]:
            hosts = (rec.get("stx_json") or {}).get("hosts")
            say(
                f"{cfg}, {self.when(round_no)}: {rec['wall']:.2f} s,"
                f" {self.args.size / 1e6 / rec['wall']:.1f} MB/s, machine busy"
                f" {rec['machine_busy']:.0%}, receiver {rec['recv_cores']:.2f} cores"
                + (f", hosts {hosts}" if hosts else "")
            )
        return rec

    @staticmethod
    def when(round_no: int) -> str:
        return "warm-up" if round_no < 0 else f"round {round_no + 1}"

    # ------------------------------------------------------------ rounds and report

    def run(self) -> None:
        if self.args.warmup:
            say("warm-up: one untimed run of each configuration")
            for c in CONFIGS:
                self.run_once(c, -1)
                time.sleep(self.args.pause)
        for r in range(self.args.rounds):
            for c in CONFIGS if r % 2 == 0 else reversed(CONFIGS):
                self.runs[c].append(self.run_once(c, r))
                time.sleep(self.args.pause)
        self.release()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def summary(self, cfg: str) -> dict[str, Any]:
        runs = self.runs[cfg]
        ok = [r for r in runs if r["ok"]]
        walls = [r["wall"] for r in ok]
        med = median(walls)
        return {
            "runs": len(runs),
            "ok": len(ok),
            "wall_median": med,
            "wall_min": min(walls) if walls else None,
            "wall_max": max(walls) if walls else None,
            "mb_s_median": self.args.size / 1e6 / med if med else None,
            "machine_busy_median": median([r["machine_busy"] for r in ok]),
            "recv_cores_median": median([r["recv_cores"] for r in ok]),
            "maybe_cpu_bound": sum(bool(r.get("maybe_cpu_bound")) for r in ok),
        }

    def ratio(self) -> dict[str, Any]:
        """Throughput of three hosts over one: one's median time / three's."""
        one, three = self.summary("one")["wall_median"], self.summary("three")["wall_median"]
        out: dict[str, Any] = {"target": TARGET}
        if one is None or three is None:
            out["why_none"] = "a configuration completed no run"
            return out
        out["ratio"] = one / three
        out["per_round"] = [
            o["wall"] / t["wall"]
            for o, t in zip(self.runs["one"], self.runs["three"], strict=False)
            if o["ok"] and t["ok"]
        ]
        return out

    def label(self, cfg: str) -> str:
        a = self.args
        if cfg == "one":
            return f"1 host: s0 `--workers {a.workers}`"
        return (
            f"3 hosts: s0 `--workers {a.workers} --cluster-workers {a.cluster_workers}`"
            f" + s1, s2 `stx worker --workers {a.helper_workers}`"
        )

    # the report's words for this side (RecvClusterBench has its own)

    def title(self) -> str:
        return f"One sender host against three, uplinks at {self.args.rate}"

    def links(self) -> str:
        a = self.args
        return (
            f"sender uplinks tbf {a.rate} (burst {a.burst}, latency {a.latency}), receiver unshaped"
        )

    def cores_note(self) -> str:
        return "Receiver cores: the `stx recv` tree's CPU seconds over the wall time."

    def per_run_intro(self) -> str:
        return (
            "Per run: each uplink's MB sent (what its bridge port received) and the"
            " seconds after the start when its first and its last MiB went out; worker"
            " processes per host (`stx send --json`):"
        )

    @staticmethod
    def link_times(links: dict[str, dict[str, float]]) -> str:
        return ", ".join(
            f"{h} {u['bytes'] / 1e6:.0f} MB"
            + (f" ({u['first_mib_s']:.2f}-{u['last_mib_s']:.2f} s)" if "last_mib_s" in u else "")
            for h, u in links.items()
            if u["bytes"] > 1 << 20
        )

    def run_line(self, x: dict[str, Any]) -> str:
        hosts = (x.get("stx_json") or {}).get("hosts")
        return self.link_times(x["uplinks"]) + (f"; hosts {hosts}" if hosts else "")

    def markdown(self, interrupted: bool) -> str:
        a = self.args
        L = [
            f"# {self.title()} ({self.started:%Y-%m-%d %H:%M %Z})",
            "",
            f"File: {a.size / 1e6:.1f} MB ({a.size} bytes), random, /dev/shm to /dev/shm through a"
            f" network-namespace lab; {self.links()}. {a.rounds} interleaved round(s)"
            f"{', interrupted' if interrupted else ''}. {os.cpu_count()} CPUs; load average"
            f" {self.load_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
            "",
            "| configuration | ok/runs | median s | min-max s | MB/s | machine busy | receiver"
            " cores | maybe CPU-bound |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in CONFIGS:
            s = self.summary(c)
            rng = "-" if s["wall_min"] is None else f"{s['wall_min']:.2f}-{s['wall_max']:.2f}"
            busy = s["machine_busy_median"]
            L.append(
                f"| {self.label(c)} | {s['ok']}/{s['runs']} | {fmt(s['wall_median'])} | {rng} |"
                f" {fmt(s['mb_s_median'], 1)} | {'-' if busy is None else f'{busy:.0%}'} |"
                f" {fmt(s['recv_cores_median'])} | {s['maybe_cpu_bound']}/{s['ok']} |"
            )
        L.append("")
        r = self.ratio()
        if "ratio" in r:
            pr = r["per_round"]
            rng = f" (per round {min(pr):.2f}-{max(pr):.2f})" if pr else ""
            met = "met" if r["ratio"] >= TARGET else "NOT met"
            L.append(
                f"Throughput, three hosts over one: {r['ratio']:.2f}x{rng};"
                f" target >= {TARGET}x: {met}. Every copy checked with sha256."
            )
        else:
            L.append(f"Throughput, three hosts over one: - ({r['why_none']}).")
        L += [
            "",
            f"Machine busy: share of all CPUs busy over the run (/proc/stat); a run at"
            f" {BUSY_FLAG:.0%} or more counts as maybe CPU-bound. {self.cores_note()}",
            "",
        ]
        done = [(c, x) for c in CONFIGS for x in self.runs[c] if x["ok"]]
        if done:
            L.append(self.per_run_intro())
            L.append("")
            for c, x in done:
                L.append(f"- {c}, round {x['round'] + 1}, {x['wall']:.2f} s: {self.run_line(x)}")
            L.append("")
        notes = [
            f"- {c}, round {x['round'] + 1}: {x['error']}"
            for c in CONFIGS
            for x in self.runs[c]
            if not x["ok"]
        ]
        if notes:
            L += ["Failures:", "", *notes, ""]
        return "\n".join(L)

    def to_json(self, interrupted: bool) -> dict[str, Any]:
        a = self.args
        return {
            "started": self.started.isoformat(),
            "argv": sys.argv,
            "interrupted": interrupted,
            "cpus": os.cpu_count(),
            "loadavg_start": self.load_start,
            "loadavg_end": os.getloadavg(),
            "stx": peers.version([self.stx, "--version"]),
            "size": a.size,
            "rate": a.rate,
            "burst": a.burst,
            "latency": a.latency,
            "rounds": a.rounds,
            "workers": a.workers,
            "helper_workers": a.helper_workers,
            "cluster_workers": a.cluster_workers,
            "recv_workers": a.recv_workers,
            "configs": {
                c: {"label": self.label(c), "summary": self.summary(c), "runs": self.runs[c]}
                for c in CONFIGS
            },
            "ratio": self.ratio(),
        }


RECV_HOSTS = ("r0", *RECV_HELPERS)


class RecvClusterBench(ClusterBench):
    """The receiving side: one sender host ``snd`` (unshaped) and three receiving hosts whose
    downlinks are shaped: ``r0`` (``stx recv``) alone, or with ``r1``, ``r2`` joined to it as
    receiving helpers (``stx worker --data-listen``), all writing into one destination path.
    The receiving side is started and ready (listening; the helpers joined) before the clock
    starts, as a receiver is a service that waits; wall time is ``stx send``'s run."""

    def setup(self) -> None:
        a = self.args
        self.prepare()
        self.hosts["snd"] = self.lab.add_host("snd")
        for name in RECV_HOSTS:
            self.hosts[name] = self.lab.add_host(
                name, rate_in=a.rate, burst=a.burst, latency=a.latency
            )
        say(
            f"lab: snd {self.hosts['snd'].addr} (unshaped), r0/r1/r2"
            f" {', '.join(self.hosts[h].addr for h in RECV_HOSTS)} (downlinks tbf {a.rate},"
            f" burst {a.burst}, latency {a.latency})"
        )
        self.make_source()

    def wait_ready(
        self,
        recv: subprocess.Popen[bytes],
        rerr: Path,
        helpers: dict[str, subprocess.Popen[bytes]],
        logs: dict[str, TimedLog],
    ) -> None:
        """Until the receiver listens and every helper has joined it (60 s at most)."""
        try:
            peers.wait_for_text(rerr, "listening on", recv, 60)
        except RuntimeError as exc:
            raise Failed(f"stx recv: {exc}") from None
        end = time.monotonic() + 60
        for h, p in helpers.items():
            while not any("as receiver helper" in line for _, line in logs[h].lines):
                if p.poll() is not None or time.monotonic() > end:
                    what = "exited" if p.returncode is not None else "not joined after 60 s"
                    tail = " | ".join(line for _, line in logs[h].lines[-3:])
                    raise Failed(f"helper {h}: {what}: {tail[-400:]}")
                time.sleep(0.01)

    def run_once(self, cfg: str, round_no: int) -> dict[str, Any]:
        a = self.args
        tag = self.tag(cfg)
        dst = Path(tempfile.mkdtemp(prefix=f"dst-{cfg}-", dir=self.root))
        r0 = self.hosts["r0"].addr
        rec: dict[str, Any] = {"round": round_no, "ok": False, "loadavg": os.getloadavg()[0]}
        run = Run(dst)
        try:
            self.release()
            t_start = time.monotonic()
            if cfg == "three":  # the helpers first: they wait for their coordinator
                self.start_helpers(run, tag, "r0", RECV_HELPERS, "--data-listen", "{addr}:0")
            rargv = [self.stx, "recv", "--listen", f"{r0}:{RECV_PORT}"]
            rargv += ["--psk-file", str(self.key), "--dest", str(dst), "--once", "--json"]
            rargv += ["--workers", str(a.recv_workers)]
            if cfg == "three":
                rargv += ["--cluster", f"{r0}:{CLUSTER_PORT}"]
                rargv += ["--cluster-workers", str(a.cluster_workers)]
            rerr = self.logs / f"{tag}-recv.err"
            with open(rerr, "wb") as err, open(self.logs / f"{tag}-recv.out", "wb") as out:
                recv = self.start("r0", rargv, stdout=out, stderr=err)
            run.procs.append(recv)
            self.wait_ready(recv, rerr, run.helpers, run.logs)
            rec["ready_s"] = time.monotonic() - t_start
            sargv = [self.stx, "send", str(self.src), f"{r0}:{RECV_PORT}"]
            sargv += ["--psk-file", str(self.key), "--json", "--quiet", "--workers", str(a.workers)]
            got0 = {h: tbf_sent(self.hosts[h], ingress=True) for h in RECV_HOSTS}
            helper_cpu0 = {h: tree_cpu(p.pid) for h, p in run.helpers.items()}
            before = (cpu_busy(), tree_cpu(recv.pid), helper_cpu0, got0)
            t0 = time.monotonic()
            run.links = Uplinks([self.hosts[h] for h in RECV_HOSTS], t0, counter="tx_bytes")
            serr = self.timed_send(
                rec,
                run,
                recv,
                tag,
                "snd",
                sargv,
                t0=t0,
                before=before,
                count=lambda h: tbf_sent(self.hosts[h], ingress=True),
                links_key="downlinks",
            )
            for who in ("send", "recv"):
                rec[f"{who}_json"] = self.stx_json(tag, who)
            self.verify(rec, tag, run.helpers, dst, serr, rerr)
        except (Failed, OSError, subprocess.SubprocessError) as exc:
            rec["error"] = str(exc)
            say(f"recv side, {cfg}, {self.when(round_no)}: FAILED: {exc}")
        finally:
            self.end(run)
        if rec["ok"]:
            say(
                f"recv side, {cfg}, {self.when(round_no)}: {rec['wall']:.2f} s,"
                f" {self.args.size / 1e6 / rec['wall']:.1f} MB/s, machine busy"
                f" {rec['machine_busy']:.0%}, r0 {rec['recv_cores']:.2f} cores,"
                f" {self.streams(rec)}"
            )
        return rec

    @staticmethod
    def streams(x: dict[str, Any]) -> str:
        """The data streams the receiver served, per host where it had helpers."""
        rj = x.get("recv_json") or {}
        hosts = rj.get("hosts")
        return f"{rj.get('streams', '?')} streams" + (f", hosts {hosts}" if hosts else "")

    @staticmethod
    def landed(x: dict[str, Any]) -> str:
        """Blocks each helper landed, from its ``transfer done: N blocks landed`` line."""
        out = []
        for h, lines in (x.get("helper_log") or {}).items():
            for _, line in lines:
                if m := re.search(r"transfer done: (\d+) blocks landed", line):
                    out.append(f"{h} landed {m.group(1)} blocks")
        return ", ".join(out)

    def title(self) -> str:
        return f"One receiving host against three, downlinks at {self.args.rate}"

    def links(self) -> str:
        a = self.args
        return (
            f"receiving hosts' downlinks tbf {a.rate} (burst {a.burst}, latency {a.latency}),"
            " sender unshaped; the receiving side started and ready (helpers joined) before"
            " the clock starts, wall time is `stx send`'s run"
        )

    def cores_note(self) -> str:
        return "Receiver cores: r0's `stx recv` tree's CPU seconds over the wall time."

    def per_run_intro(self) -> str:
        return (
            "Per run: each downlink's MB received (what its bridge port sent) and the seconds"
            " after the start when its first and its last MiB arrived; data streams served"
            " per host (`stx recv --json`: `streams`, `hosts`) and blocks each helper landed:"
        )

    def run_line(self, x: dict[str, Any]) -> str:
        landed = self.landed(x)
        return f"{self.link_times(x['downlinks'])}; {self.streams(x)}" + (
            f"; {landed}" if landed else ""
        )

    def label(self, cfg: str) -> str:
        a = self.args
        if cfg == "one":
            return (
                f"1 host: r0 `stx recv --workers {a.recv_workers}`; snd `stx send --workers"
                f" {a.workers}`"
            )
        return (
            f"3 hosts: r0 `--workers {a.recv_workers} --cluster-workers {a.cluster_workers}`"
            f" + r1, r2 `stx worker --data-listen --workers {a.helper_workers}`; snd"
            f" `--workers {a.workers}`"
        )

    def to_json(self, interrupted: bool) -> dict[str, Any]:
        return {"side": "recv", **super().to_json(interrupted)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="perf/cluster.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", default="600M", help="file size (powers of 1024; default 600M)")
    ap.add_argument(
        "--side",
        choices=("send", "recv", "both"),
        default="send",
        help="helpers on the sending side (default), the receiving side, or both, one after"
        " the other",
    )
    ap.add_argument(
        "--rate",
        default="400mbit",
        help="tbf rate of each shaped link: the sender hosts' uplinks (send), the receiving"
        " hosts' downlinks (recv); default 400mbit",
    )
    ap.add_argument("--burst", default="256kb", help="tbf burst (default 256kb, the lab's)")
    ap.add_argument("--latency", default="50ms", help="tbf latency (default 50ms, the lab's)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument(
        "--workers", type=int, help="stx send --workers (default: 4 with send, 12 with recv)"
    )
    ap.add_argument("--helper-workers", type=int, default=4, help="each helper's --workers (4)")
    ap.add_argument("--cluster-workers", type=int, default=8, help="--cluster-workers (8)")
    ap.add_argument(
        "--recv-workers",
        type=int,
        help="stx recv --workers (default: stx's with send, 4 with recv)",
    )
    ap.add_argument("--stx", help="the stx to run (default: the one beside this Python)")
    ap.add_argument("--json-out", metavar="FILE", help="write the results as JSON here")
    ap.add_argument("--dir", default="/dev/shm", help="scratch directory (default /dev/shm)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between runs (default 1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="limit for one run, s (300)")
    ap.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up runs"
    )
    a = ap.parse_args(argv)
    try:
        a.size = parse_size(a.size)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    counts = [a.helper_workers, a.cluster_workers]
    counts += [n for n in (a.workers, a.recv_workers) if n is not None]
    if a.rounds < 1 or a.size < 1 or min(counts) < 1:
        ap.error("--rounds, --size and the worker counts must be at least 1")
    return a


def side_args(a: argparse.Namespace, side: str) -> argparse.Namespace:
    """``a`` with the worker counts that were not given set to ``side``'s defaults."""
    out = argparse.Namespace(**vars(a))
    if out.workers is None:
        out.workers = 4 if side == "send" else 12
    if out.recv_workers is None and side == "recv":
        out.recv_workers = 4
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (reason := available()) is not None:
        say(reason)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    interrupted = False
    mds: list[str] = []
    docs: dict[str, dict[str, Any]] = {}
    sides = ("send", "recv") if args.side == "both" else (args.side,)
    for side in sides:
        if interrupted:
            break
        bench: ClusterBench | None = None
        try:
            with Lab() as lab:
                kind = ClusterBench if side == "send" else RecvClusterBench
                bench = kind(side_args(args, side), lab)
                try:
                    bench.setup()
                    bench.run()
                except KeyboardInterrupt:
                    interrupted = True
                    say("interrupted: cleaning up")
                finally:
                    docs[side] = bench.to_json(interrupted)
                    mds.append(bench.markdown(interrupted))
        except KeyboardInterrupt:  # a second signal while the lab was closing
            interrupted = True
        finally:
            if bench is not None:
                bench.cleanup()
    if mds:
        print("\n\n".join(mds))
    if docs and args.json_out:
        doc = docs if args.side == "both" else docs[args.side]
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
        say(f"wrote {args.json_out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
