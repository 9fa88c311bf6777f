"""Benchmark stxpar against scp, ssh, socat and cp on this machine; report Markdown, JSON, PNG.

    python perf/bench.py                      # 2 GiB, 3 rounds, stxpar defaults + workers 1,2,4,8, all peers
    python perf/bench.py --full               # + block sizes, resume, handshake, real disk, RSS at 2G/8G, plot
    python perf/bench.py --quick              # smoke test of the harness: 256M, 1 round, every mode small

A random file is made in /dev/shm. stxpar runs through its CLI (``stx recv --once`` and
``stx send --json``, key from ``stx keygen``), so the measured process trees are the product's.
The peers: ``scp -O -c aes256-gcm@openssh.com`` and ``ssh -c aes256-gcm@openssh.com HOST
'cat > dst'`` through a private sshd on 127.0.0.1 that the harness starts (installing Debian's
openssh-server / openssh-client / socat with apt-get if they are missing), ``socat -b 1M``
over plain TCP, and ``cp``. Configurations run round-robin, in alternating order each round.
Every copy is compared with the source, then removed. See perf/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
import proctree  # noqa: E402
import psutil  # noqa: E402

import stxpar  # noqa: E402
from stxpar.config import DEFAULT_BLOCK_SIZE, default_workers, parse_size  # noqa: E402
from stxpar.state import load as load_state  # noqa: E402

#: What `stx send` starts by default to a receiver on 127.0.0.1 (half the CPUs: they are shared).
SEND_WORKERS = default_workers(peer_on_this_machine=True)

MiB = 1 << 20
GB = 1e9
CHUNK = 16 << 20
say = peers.say


# ---------------------------------------------------------------- small helpers


def human(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f}G"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}M"
    return f"{n}B"


def sizes(text: str) -> list[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def make_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def same_content(a: Path, b: Path) -> bool:
    """``cmp``: the copy has the source's size and bytes."""
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
            while True:
                x = fa.read(CHUNK)
                y = fb.read(CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


def fsync_path(path: Path) -> float:
    t = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent
    rev = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "stxpar", "workers"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "stxpar": stxpar.__version__,
        "git": (rev or "?") + (" + uncommitted changes in stxpar/ or workers/" if dirty else ""),
        "stxpar_default_workers": SEND_WORKERS,
        "stxpar_default_recv_workers": default_workers(),
        "stxpar_default_block_size": DEFAULT_BLOCK_SIZE,
        "free_page_reporting": page_reporting(),
    }


def page_reporting() -> dict[str, str] | None:
    """The guest kernel's free page reporting settings, when it has them: a VM that hands
    freed memory back to its host makes writing into it again expensive (see release())."""
    params = Path("/sys/module/page_reporting/parameters")
    try:
        return {p.name: p.read_text().strip() for p in sorted(params.iterdir()) if p.is_file()}
    except OSError:
        return None


# ---------------------------------------------------------------- configurations and runs


@dataclass
class Config:
    key: str
    label: str
    group: str  # main | block | disk | resume | rss
    tool: str  # stxpar | scp | ssh | socat | cp
    workers: int | None = None
    block_size: int | None = None
    disk: bool = False
    runs: list[dict[str, Any]] = field(default_factory=list)

    def ok_runs(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["ok"]]

    def summary(self, size: int) -> dict[str, Any]:
        ok = self.ok_runs()
        walls = [r["wall"] for r in ok]
        gb = size / GB

        def per_gb(key: str) -> list[float]:
            return [r[key] / gb for r in ok if r.get(key) is not None]

        def tot(r: dict[str, Any]) -> float:
            return float(r["cpu_send"] + (r["cpu_recv"] or 0.0))

        rs = [r["rss_send"] / MiB for r in ok]
        rr = [r["rss_recv"] / MiB for r in ok if r.get("rss_recv") is not None]
        return {
            "runs": len(self.runs),
            "ok": len(ok),
            "wall_median": median(walls),
            "wall_min": min(walls) if walls else None,
            "wall_max": max(walls) if walls else None,
            "mb_s_median": size / 1e6 / statistics.median(walls) if walls else None,
            "mb_s_min": size / 1e6 / max(walls) if walls else None,
            "mb_s_max": size / 1e6 / min(walls) if walls else None,
            "cpu_s_per_gb_send": median(per_gb("cpu_send")),
            "cpu_s_per_gb_recv": median(per_gb("cpu_recv")),
            "cpu_s_per_gb_total": median([tot(r) / gb for r in ok]),
            "cpu_s_per_gb_total_min": min((tot(r) / gb for r in ok), default=None),
            "cpu_s_per_gb_total_max": max((tot(r) / gb for r in ok), default=None),
            "rss_send_mib_median": median(rs),
            "rss_send_mib_max": max(rs) if rs else None,
            "rss_recv_mib_median": median(rr),
            "rss_recv_mib_max": max(rr) if rr else None,
        }

    def as_json(self, size: int) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "group": self.group,
            "tool": self.tool,
            "workers": self.workers,
            "block_size": self.block_size,
            "dest": "disk" if self.disk else "tmpfs",
            "summary": self.summary(size),
            "runs": self.runs,
        }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.stx = str(Path(sys.executable).with_name("stx"))
        if not os.access(self.stx, os.X_OK):
            self.stx = shutil.which("stx") or "stx"
        self.root = Path(tempfile.mkdtemp(prefix="stx-bench-", dir=args.dir))
        self.disk_root: Path | None = None
        if args.real_disk:
            self.disk_root = Path(tempfile.mkdtemp(prefix="stx-bench-", dir=args.real_disk))
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.keyfile = self.root / "psk.key"
        self.src = self.root / "src.bin"
        self.sshd: peers.LoopbackSshd | None = None
        self.live: list[subprocess.Popen[bytes]] = []
        self.seq = 0
        self.notes: list[str] = []
        self.skipped: dict[str, str] = {}
        self.configs: list[Config] = []
        #: Copies already checked, freed only just before the next timed run (see release()).
        self.stale: list[Path] = []
        self.resume: dict[str, Any] = {}
        self.handshake: dict[str, Any] = {}
        self.rss_sizes: dict[str, Any] = {}
        #: CPU s/GB of the per-byte steps the protocol requires (perf/floor.py), after the rounds
        self.required: dict[str, float] = {}
        self.started = dt.datetime.now().astimezone()
        self.load_start = os.getloadavg()
        self.harness_cpu0 = time.process_time()

    # ------------------------------------------------------------ processes

    def spawn(
        self, argv: list[str], *, tag: str, stdin: Path | None = None
    ) -> subprocess.Popen[bytes]:
        out, err = self.logs / f"{tag}.out", self.logs / f"{tag}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            fin = open(stdin, "rb") if stdin is not None else None  # noqa: SIM115
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=fin if fin is not None else subprocess.DEVNULL,
                    stdout=fo,
                    stderr=fe,
                    start_new_session=True,
                )
            finally:
                if fin is not None:
                    fin.close()
        self.live.append(proc)
        self.live = [p for p in self.live if p.returncode is None]
        return proc

    def tag(self, name: str) -> str:
        self.seq += 1
        return f"{self.seq:04d}-{name}"

    def kill_all(self) -> None:
        for proc in self.live:
            if proc.returncode is None:
                proctree.kill_tree(proc)
                try:
                    proc.wait(timeout=10)
                except (subprocess.TimeoutExpired, ChildProcessError):
                    pass

    def cleanup(self) -> None:
        self.kill_all()
        if self.sshd is not None:
            self.sshd.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        if self.disk_root is not None:
            shutil.rmtree(self.disk_root, ignore_errors=True)

    # ------------------------------------------------------------ setup

    def setup(self) -> None:
        need = 2 * self.size + 256 * MiB
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise SystemExit(
                f"bench: {self.args.dir} has {human(free)} free; a {human(self.size)} run needs"
                f" {human(need)} (source + one copy + slack)"
            )
        wanted = list(self.args.peer_list)
        self.skipped = peers.ensure_tools(wanted, install=not self.args.no_install)
        if any(p in wanted and p not in self.skipped for p in ("scp", "ssh")):
            try:
                self.sshd = peers.LoopbackSshd().start()
                say(f"loopback sshd on 127.0.0.1:{self.sshd.port} (pid {self.sshd.pid})")
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                for p in ("scp", "ssh"):
                    self.skipped.setdefault(p, f"skipped: {exc}")
                say(f"scp/ssh skipped: {exc}")
        subprocess.run(
            [self.stx, "keygen", "-o", str(self.keyfile)], check=True, capture_output=True
        )
        say(f"making a {human(self.size)} random source file in {self.root}")
        make_random_file(self.src, self.size)

    def versions(self) -> dict[str, str]:
        v = {"stx": peers.version([self.stx, "--version"])}
        if self.sshd is not None:
            v["ssh"] = peers.version(["ssh", "-V"])
        if shutil.which("socat"):
            out = subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout
            m = re.search(r"socat version (\S+)", out)
            v["socat"] = m.group(1) if m else "?"
        v["cp"] = peers.version(["cp", "--version"])
        return v

    # ------------------------------------------------------------ one run of each tool

    def dest_dir(self, disk: bool) -> Path:
        base = self.disk_root if disk and self.disk_root is not None else self.root
        return Path(tempfile.mkdtemp(prefix="dst-", dir=base))

    def timeout_for(self, size: int) -> float:
        return self.args.timeout or 120.0 + size / 5e6

    def start_stx_recv(
        self, dest: Path, workers: int | None
    ) -> tuple[subprocess.Popen[bytes], int, Path]:
        argv = [self.stx, "recv", "--listen", "127.0.0.1:0", "--psk-file", str(self.keyfile)]
        argv += ["--dest", str(dest), "--once", "--json"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        tag = self.tag("stx-recv")
        proc = self.spawn(argv, tag=tag)
        log = self.logs / f"{tag}.err"
        text = peers.wait_for_text(log, "listening on", proc, 60)
        m = re.search(r"listening on [\d.]+:(\d+)", text)
        if not m:
            proctree.kill_tree(proc)
            raise RuntimeError(f"cannot find the port in: {text.strip()}")
        return proc, int(m.group(1)), log

    def stx_send_argv(
        self, src: Path, port: int, workers: int | None, block_size: int | None
    ) -> list[str]:
        argv = [self.stx, "send", str(src), f"127.0.0.1:{port}", "--psk-file", str(self.keyfile)]
        argv += ["--json", "--quiet"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        if block_size is not None:
            argv += ["--block-size", str(block_size)]
        return argv

    def release(self) -> None:
        """Free the previous runs' copies now, then wait ``--settle`` seconds if it freed any.

        Called just before each timed run starts its sender (its receiver is already up), so
        that every tool's copy lands in memory freed the same moment before. On VMs whose guest
        hands free memory back to the hypervisor (free page reporting), pages freed a second or
        two earlier have been handed back and cost far more to write again; freeing the copy
        right after each run let a tool that starts fast (socat) write into memory that a tool
        that starts slower (stxpar's receiver and workers) found already handed back: 1250 vs
        510 MB/s for the same stxpar transfer here (perf/README.md).
        """
        freed = bool(self.stale)
        for path in self.stale:
            shutil.rmtree(path, ignore_errors=True)
        self.stale.clear()
        if freed and self.args.settle:  # (nothing freed: nothing to settle, e.g. a resumed run)
            time.sleep(self.args.settle)

    def measure(
        self, launch: Callable[[], subprocess.Popen[bytes]], timeout: float, **kw: Any
    ) -> proctree.Measured:
        self.release()
        return proctree.measure(launch, interval=self.args.interval, timeout=timeout, **kw)

    def run_once(self, cfg: Config, src: Path | None = None) -> dict[str, Any]:
        """One transfer of ``src`` for ``cfg``: measured, checked, cleaned up."""
        src = src or self.src
        size = src.stat().st_size
        dest = self.dest_dir(cfg.disk)
        dst = dest / src.name
        tag = self.tag(cfg.key)
        timeout = self.timeout_for(size)
        rec: dict[str, Any] = {"ok": False, "loadavg_before": round(os.getloadavg()[0], 2)}
        recv: subprocess.Popen[bytes] | None = None
        try:
            if cfg.tool == "stxpar":
                recv, port, _ = self.start_stx_recv(dest, cfg.workers)
                argv = self.stx_send_argv(src, port, cfg.workers, cfg.block_size)
                m = self.measure(lambda: self.spawn(argv, tag=tag), timeout, receiver=recv)
                try:
                    js = json.loads(last_line(self.logs / f"{tag}.out"))
                    rec["stx"] = {
                        k: js.get(k)
                        for k in ("seconds", "mb_per_s", "workers", "block_size", "retransmits",
                                  "reconnects", "streams_replaced", "blocks_resumed")
                    }  # fmt: skip
                except ValueError:
                    pass
            elif cfg.tool in ("scp", "ssh"):
                assert self.sshd is not None
                sshd = self.sshd
                if proctree.children(sshd.pid):
                    time.sleep(0.5)
                if cfg.tool == "scp":
                    argv = sshd.scp_argv(str(src), str(dst))
                    stdin = None
                else:
                    argv = sshd.ssh_argv(f"cat > {shlex.quote(str(dst))}")
                    stdin = src
                m = self.measure(
                    lambda: self.spawn(argv, tag=tag, stdin=stdin),
                    timeout,
                    external_receiver=sshd.pid,
                )
            elif cfg.tool == "socat":
                port = peers.free_port()
                rtag = self.tag("socat-recv")
                recv = self.spawn(
                    ["socat", "-d", "-d", "-b", "1048576", "-u",
                     f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"OPEN:{dst},creat,trunc"],
                    tag=rtag,
                )  # fmt: skip
                peers.wait_for_text(self.logs / f"{rtag}.err", "listening on", recv, 30)
                argv = ["socat", "-b", "1048576", "-u", f"OPEN:{src}", f"TCP:127.0.0.1:{port}"]
                m = self.measure(
                    lambda: self.spawn(argv, tag=tag), timeout, receiver=recv, done_when="both"
                )
            elif cfg.tool == "cp":
                argv = ["cp", str(src), str(dst)]
                m = self.measure(lambda: self.spawn(argv, tag=tag), timeout)
            else:
                raise ValueError(cfg.tool)
            rec.update(
                wall=round(m.wall, 4),
                cpu_send=round(m.cpu_send, 3),
                cpu_recv=None if m.cpu_recv is None else round(m.cpu_recv, 3),
                rss_send=m.rss_send,
                rss_recv=m.rss_recv,
                rc_send=m.rc_send,
                rc_recv=m.rc_recv,
                measure=m.extra,
            )
            if m.notes:
                rec["notes"] = m.notes
            if m.rc_send != 0 or (m.rc_recv not in (None, 0)):
                rec["error"] = (
                    f"exit {m.rc_send}/{m.rc_recv}: {last_line(self.logs / f'{tag}.err')}"
                )
            elif cfg.disk:
                rec["wall_process"] = rec["wall"]
                rec["fsync_s"] = round(fsync_path(dst), 4)
                rec["wall"] = round(m.wall + rec["fsync_s"], 4)
            if "error" not in rec:
                if same_content(src, dst):
                    rec["ok"] = True
                else:
                    rec["error"] = "the copy differs from the source"
        except (proctree.Timeout, RuntimeError, OSError) as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if recv is not None and recv.returncode is None:
                proctree.kill_tree(recv)
                proctree.reap(recv)
            self.stale.append(dest)  # freed just before the next timed run
        return rec

    # ------------------------------------------------------------ phases

    def build_configs(self) -> list[Config]:
        a = self.args
        cs: list[Config] = [Config("stxpar-default", "stxpar (defaults)", "main", "stxpar")]
        for w in a.worker_list:
            cs.append(Config(f"stxpar-w{w}", f"stxpar workers={w}", "main", "stxpar", workers=w))
        labels = {
            "scp": "scp -O -c aes256-gcm",
            "ssh": "ssh -c aes256-gcm 'cat > dst'",
            "socat": "socat -b 1M (plain TCP)",
            "cp": "cp (no network)",
        }
        live_peers = [p for p in a.peer_list if p not in self.skipped]
        for p in live_peers:
            cs.append(Config(p, labels[p], "main", p))
        for bs in a.block_size_list:
            cs.append(
                Config(f"stxpar-bs{human(bs)}", f"stxpar block={human(bs)}", "block", "stxpar",
                       block_size=bs)
            )  # fmt: skip
        if self.disk_root is not None:
            cs.append(
                Config(
                    "stxpar-default-disk", "stxpar (defaults) -> disk", "disk", "stxpar", disk=True
                )
            )
            for p in live_peers:
                cs.append(Config(f"{p}-disk", f"{labels[p]} -> disk", "disk", p, disk=True))
        return cs

    def run_rounds(self) -> None:
        self.configs = self.build_configs()
        n = len(self.configs)
        # Untimed warm-up: one run of every tool (its first configuration). The first transfer
        # after the source was written, whichever tool it is, runs on a colder machine (fresh
        # memory from the hypervisor, cold caches) and would always penalise the same one.
        seen: set[str] = set()
        for cfg in self.configs[: n if self.args.warmup else 0]:
            if cfg.tool in seen:
                continue
            seen.add(cfg.tool)
            time.sleep(self.args.pause)
            rec = self.run_once(cfg)
            self.progress(f"[warm-up, not counted] {cfg.label}", rec, self.size)
        for r in range(self.args.rounds):
            order = self.configs if r % 2 == 0 else list(reversed(self.configs))
            for i, cfg in enumerate(order):
                time.sleep(self.args.pause)
                rec = self.run_once(cfg)
                rec["round"] = r
                cfg.runs.append(rec)
                self.progress(
                    f"[round {r + 1}/{self.args.rounds} {i + 1}/{n}] {cfg.label}", rec, self.size
                )

    def progress(self, head: str, rec: dict[str, Any], size: int) -> None:
        if rec["ok"]:
            rr = "-" if rec.get("rss_recv") is None else f"{rec['rss_recv'] / MiB:.0f}"
            cr = "-" if rec.get("cpu_recv") is None else f"{rec['cpu_recv']:.2f}"
            say(
                f"{head}: {rec['wall']:.2f} s, {size / 1e6 / rec['wall']:.0f} MB/s, CPU"
                f" {rec['cpu_send']:.2f}+{cr} s, peak RSS {rec['rss_send'] / MiB:.0f}/{rr} MiB, copy ok"
            )
        else:
            say(f"{head}: FAILED: {rec.get('error')}")
        for note in rec.get("notes", []):
            say(f"  note: {note}")

    def run_resume(self) -> None:
        """Full run vs a run killed at about half and sent again; alternating, ``rounds`` times."""
        full_cfg = Config("resume-full", "stxpar full run", "resume", "stxpar")
        runs: list[dict[str, Any]] = []
        for r in range(self.args.rounds):
            for step in ("full", "resume") if r % 2 == 0 else ("resume", "full"):
                time.sleep(self.args.pause)
                if step == "full":
                    rec = self.run_once(full_cfg)
                    rec["round"] = r
                    full_cfg.runs.append(rec)
                    self.progress(f"[resume {r + 1}/{self.args.rounds}] full run", rec, self.size)
                else:
                    res = self.resume_once()
                    res["round"] = r
                    runs.append(res)
                    if res["ok"]:
                        say(
                            f"[resume {r + 1}/{self.args.rounds}] killed at {res['killed_after_s']:.2f} s"
                            f" with {100 * res['held_fraction']:.0f}% held; second run"
                            f" {res['wall']:.2f} s, copy ok"
                        )
                    else:
                        say(f"[resume {r + 1}/{self.args.rounds}] FAILED: {res.get('error')}")
        full = full_cfg.summary(self.size)
        ok = [x for x in runs if x["ok"]]
        fw = full["wall_median"]
        out: dict[str, Any] = {"full": full, "full_runs": full_cfg.runs, "resume_runs": runs}
        if ok and fw:
            rw = statistics.median(x["wall"] for x in ok)
            held = statistics.median(x["held_fraction"] for x in ok)
            out.update(
                resume_wall_median=rw,
                resume_wall_min=min(x["wall"] for x in ok),
                resume_wall_max=max(x["wall"] for x in ok),
                held_fraction_median=held,
                resume_over_full=rw / fw,
                ideal_resume_wall=fw * (1 - held),
                overhead_s=rw - fw * (1 - held),
                receiver_noticed_s_median=statistics.median(x["receiver_noticed_s"] for x in ok),
            )
        self.resume = out

    def resume_once(self) -> dict[str, Any]:
        self.release()  # room for this run's copy; its timed second run frees nothing more
        dest = self.dest_dir(False)
        statep = dest / f".{self.src.name}.stxstate"
        res: dict[str, Any] = {"ok": False}
        recv: subprocess.Popen[bytes] | None = None
        try:
            recv, port, rlog = self.start_stx_recv(dest, None)
            argv = self.stx_send_argv(self.src, port, None, None)
            t0 = time.monotonic()
            first = self.spawn(argv, tag=self.tag("resume-first"))
            killed: float | None = None
            while first.poll() is None:
                st = load_state(statep)
                if st is not None and 2 * st.count >= st.identity.total_blocks:
                    os.killpg(first.pid, signal.SIGKILL)
                    killed = time.monotonic() - t0
                    break
                if time.monotonic() - t0 > self.timeout_for(self.size):
                    raise proctree.Timeout("first run never reached half")
                time.sleep(0.005)
            first.wait()
            if killed is None:
                raise RuntimeError("the first run finished before half the blocks were held")
            # The receiver refuses a new sender of the same file (not retryable: exit 1) until
            # it has noticed that the old session is gone: wait for its log line, then the gap.
            peers.wait_for_text(rlog, "partial kept", recv, 60)
            res["receiver_noticed_s"] = round(time.monotonic() - t0 - killed, 3)
            time.sleep(self.args.resume_gap)
            st = load_state(statep)
            if st is None:
                raise RuntimeError("no resume state after the kill")
            res["killed_after_s"] = round(killed, 3)
            res["held_fraction"] = round(st.count / st.identity.total_blocks, 4)
            res["blocks_held"] = st.count
            res["blocks_total"] = st.identity.total_blocks
            tag = self.tag("resume-second")
            m = self.measure(
                lambda: self.spawn(argv, tag=tag), self.timeout_for(self.size), receiver=recv
            )
            res.update(
                wall=round(m.wall, 4),
                cpu_send=round(m.cpu_send, 3),
                cpu_recv=None if m.cpu_recv is None else round(m.cpu_recv, 3),
                rss_send=m.rss_send,
                rss_recv=m.rss_recv,
            )
            try:
                js = json.loads(last_line(self.logs / f"{tag}.out"))
                res["stx"] = {
                    k: js.get(k) for k in ("blocks_resumed", "blocks_sent", "reconnects", "seconds")
                }
            except ValueError:
                pass
            if m.rc_send != 0 or m.rc_recv not in (None, 0):
                res["error"] = (
                    f"exit {m.rc_send}/{m.rc_recv}: {last_line(self.logs / f'{tag}.err')}"
                )
            elif not same_content(self.src, dest / self.src.name):
                res["error"] = "the copy differs from the source"
            else:
                res["ok"] = True
        except (proctree.Timeout, RuntimeError, OSError) as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if recv is not None and recv.returncode is None:
                proctree.kill_tree(recv)
                proctree.reap(recv)
            self.stale.append(dest)
        return res

    def run_handshake(self) -> None:
        """Latency of tiny transfers: stxpar API and stx CLI (0 B, 1 B), ssh true, scp 0 B."""
        n = self.args.handshake
        self.release()
        empty, one = self.root / "empty.bin", self.root / "one.bin"
        empty.write_bytes(b"")
        one.write_bytes(b"x")
        dest = self.dest_dir(False)
        key = stxpar.load_key_file(str(self.keyfile))
        times: dict[str, list[float]] = {}
        errors: dict[str, str] = {}
        with stxpar.Receiver(str(dest), psk=key, host="127.0.0.1", port=0) as rx:
            host, port = rx.address

            def api(src: Path) -> Callable[[], bool]:
                def go() -> bool:
                    stxpar.send(str(src), host, port, psk=key)
                    return same_content(src, dest / src.name)

                return go

            def cli(src: Path) -> Callable[[], bool]:
                def go() -> bool:
                    argv = self.stx_send_argv(src, port, None, None)
                    ok = subprocess.run(argv, capture_output=True).returncode == 0
                    return ok and same_content(src, dest / src.name)

                return go

            cases: dict[str, Callable[[], bool]] = {
                "stxpar API, 0 B": api(empty),
                "stxpar API, 1 B (workers start)": api(one),
                "stx send CLI, 0 B (with interpreter start)": cli(empty),
                "stx send CLI, 1 B (interpreter, forked workers)": cli(one),
            }
            if self.sshd is not None:
                sshd = self.sshd

                def ssh_true() -> bool:
                    return (
                        subprocess.run(sshd.ssh_argv("true"), capture_output=True).returncode == 0
                    )

                def scp_empty() -> bool:
                    argv = sshd.scp_argv(str(empty), str(dest / "scp-empty.bin"))
                    return subprocess.run(argv, capture_output=True).returncode == 0

                cases["ssh -c aes256-gcm HOST true"] = ssh_true
                cases["scp -O -c aes256-gcm, 0 B"] = scp_empty
            names = list(cases)
            for i in range(n + 1):  # the first round is a warm-up
                for name in names if i % 2 == 0 else list(reversed(names)):
                    for f in dest.iterdir():
                        f.unlink()
                    t = time.perf_counter()
                    try:
                        ok = cases[name]()
                    except stxpar.StxError as exc:
                        ok = False
                        errors[name] = str(exc)
                    elapsed = time.perf_counter() - t
                    if not ok:
                        errors.setdefault(name, "failed")
                    elif i > 0:
                        times.setdefault(name, []).append(elapsed)
        shutil.rmtree(dest, ignore_errors=True)
        out: dict[str, Any] = {"n": n, "cases": {}}
        for name in names:
            v = sorted(times.get(name, []))
            out["cases"][name] = {
                "n": len(v),
                "median_ms": statistics.median(v) * 1e3 if v else None,
                "min_ms": v[0] * 1e3 if v else None,
                "max_ms": v[-1] * 1e3 if v else None,
                "p90_ms": v[min(len(v) - 1, int(0.9 * len(v)))] * 1e3 if v else None,
                "error": errors.get(name),
            }
            say(f"[handshake] {name}: median {fmt(out['cases'][name]['median_ms'], 1)} ms")
        self.handshake = out

    def run_rss_sizes(self) -> None:
        """Peak RSS of stxpar (defaults) at several file sizes, one size at a time."""
        out: dict[str, Any] = {
            "sizes": {},
            "order": "one size after the other (room for one source)",
        }
        self.src.unlink(missing_ok=True)
        for sz in self.args.rss_size_list:
            self.release()
            need = 2 * sz + 512 * MiB
            free = shutil.disk_usage(self.root).free
            if free < need:
                msg = f"skipped: {human(free)} free in {self.args.dir}, {human(need)} needed"
                out["sizes"][human(sz)] = {"bytes": sz, "error": msg}
                say(f"[rss {human(sz)}] {msg}")
                continue
            src = self.root / f"rss-{human(sz)}.bin"
            say(f"[rss {human(sz)}] making the source file")
            make_random_file(src, sz)
            cfg = Config(f"rss-{human(sz)}", f"stxpar (defaults), {human(sz)}", "rss", "stxpar")
            try:
                for r in range(self.args.rounds):
                    time.sleep(self.args.pause)
                    rec = self.run_once(cfg, src)
                    rec["round"] = r
                    cfg.runs.append(rec)
                    self.progress(f"[rss {human(sz)} {r + 1}/{self.args.rounds}]", rec, sz)
            finally:
                src.unlink(missing_ok=True)
            out["sizes"][human(sz)] = {"bytes": sz, "summary": cfg.summary(sz), "runs": cfg.runs}
        done = [
            v["summary"] for v in out["sizes"].values() if "summary" in v and v["summary"]["ok"]
        ]
        if len(done) >= 2:
            small, big = done[0], done[-1]
            for side in ("send", "recv"):
                a, b = small[f"rss_{side}_mib_max"], big[f"rss_{side}_mib_max"]
                if a and b:
                    out[f"growth_{side}"] = b / a
        self.rss_sizes = out

    # ------------------------------------------------------------ reporting

    def config(self, key: str) -> Config | None:
        return next((c for c in self.configs if c.key == key), None)

    def paired_ratio(self, num: str, den: str) -> dict[str, float] | None:
        """den wall / num wall (= num MB/s over den MB/s), per round, from the same round."""
        a, b = self.config(num), self.config(den)
        if a is None or b is None:
            return None
        wa = {r["round"]: r["wall"] for r in a.ok_runs()}
        wb = {r["round"]: r["wall"] for r in b.ok_runs()}
        per_round = [wb[k] / wa[k] for k in wa if k in wb]
        sa, sb = a.summary(self.size), b.summary(self.size)
        if not per_round or not sa["wall_median"] or not sb["wall_median"]:
            return None
        return {
            "of_medians": sb["wall_median"] / sa["wall_median"],
            "paired_min": min(per_round),
            "paired_max": max(per_round),
        }

    def measure_required_steps(self) -> None:
        """What the protocol requires per byte on top of the copies (perf/floor.py), on one
        core: the context for the socat ratio (its ceiling on this machine)."""
        if self.config("socat") is not None:
            from floor import required_per_gb, step_costs  # (floor.py imports this module)

            self.required = step_costs(3, gb=0.25)
            self.required["total"] = required_per_gb(self.required)

    def targets(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        r = self.paired_ratio("stxpar-default", "scp")
        if r:
            rows.append({"target": "throughput >= 2x scp -O aes256-gcm", "value": r["of_medians"],
                         "text": f"{r['of_medians']:.2f}x (per round {r['paired_min']:.2f}-{r['paired_max']:.2f})",
                         "pass": r["of_medians"] >= 2.0})  # fmt: skip
        r = self.paired_ratio("stxpar-default", "socat")
        if r:
            rows.append({"target": "throughput >= 0.75x plain socat", "value": r["of_medians"],
                         "text": f"{r['of_medians']:.2f}x (per round {r['paired_min']:.2f}-{r['paired_max']:.2f})",
                         "pass": r["of_medians"] >= 0.75})  # fmt: skip
            socat = self.config("socat")
            cpu = socat.summary(self.size)["cpu_s_per_gb_total"] if socat else None
            if self.required and cpu:
                need = self.required["total"]
                rows.append({"target": "(context) ceiling of that ratio here at socat's core use: socat's CPU / (socat's CPU + the protocol's required steps)",
                             "value": cpu / (cpu + need),
                             "text": f"{cpu / (cpu + need):.2f} (socat {cpu:.2f} CPU-s/GB + {need:.2f} for AES, CRC and digest on each side; perf/floor.py)",
                             "pass": None})  # fmt: skip
        stx = self.config("stxpar-default")
        s = stx.summary(self.size) if stx else None
        for peer, name in (("ssh", "ssh 'cat'"), ("scp", "scp -O")):
            c = self.config(peer)
            if s and c and s["cpu_s_per_gb_total"] is not None:
                p = c.summary(self.size)["cpu_s_per_gb_total"]
                if p:
                    v = s["cpu_s_per_gb_total"]
                    rows.append({"target": f"CPU s/GB (both sides) no worse than {name}", "value": v / p,
                                 "text": f"{v:.2f} vs {p:.2f} s/GB ({v / p:.2f}x)", "pass": v <= p})  # fmt: skip
        if s and s["rss_send_mib_max"] is not None:
            worst = max(s["rss_send_mib_max"], s["rss_recv_mib_max"] or 0.0)
            rows.append({"target": "peak RSS of each side's tree < 400 MiB", "value": worst,
                         "text": f"sender {s['rss_send_mib_max']:.0f} MiB, receiver {fmt(s['rss_recv_mib_max'], 0)} MiB (max over runs)",
                         "pass": worst < 400})  # fmt: skip
        gs, gr = self.rss_sizes.get("growth_send"), self.rss_sizes.get("growth_recv")
        if gs and gr:
            names = [k for k, v in self.rss_sizes["sizes"].items() if "summary" in v]
            rows.append({"target": f"peak RSS flat in file size ({names[0]} -> {names[-1]})",
                         "value": max(gs, gr),
                         "text": f"sender x{gs:.2f}, receiver x{gr:.2f} (within 10% counts as flat)",
                         "pass": max(gs, gr) <= 1.10})  # fmt: skip
        return rows

    def to_json(self, interrupted: bool) -> dict[str, Any]:
        return {
            "meta": self.meta(interrupted),
            "configs": [c.as_json(self.size) for c in self.configs],
            "targets": self.targets(),
            "resume": self.resume,
            "handshake": self.handshake,
            "rss_sizes": self.rss_sizes,
            "required_steps_cpu_s_per_gb": self.required,
            "skipped": self.skipped,
            "notes": self.notes,
        }

    def meta(self, interrupted: bool) -> dict[str, Any]:
        a = self.args
        return {
            "date": self.started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.orig_argv),
            "cwd": os.getcwd(),
            "size": self.size,
            "rounds": a.rounds,
            "warmup": a.warmup,
            "pause": a.pause,
            "settle": a.settle,
            "source_dir": a.dir,
            "real_disk": a.real_disk,
            "machine": machine_info(),
            "versions": self.versions(),
            "loadavg_start": [round(x, 2) for x in self.load_start],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "harness_cpu_s": round(time.process_time() - self.harness_cpu0, 2),
            "sample_interval_s": a.interval,
            "interrupted": interrupted,
        }

    def markdown(self, interrupted: bool) -> str:
        m = self.meta(interrupted)
        mi = m["machine"]
        L: list[str] = []
        L.append(
            f"# stxpar benchmark, {m['date']}" + (" (INTERRUPTED: partial)" if interrupted else "")
        )
        L.append("")
        L.append(f"- command: `{m['command']}`")
        L.append(
            f"- machine: {mi['hostname']}, {mi['cores']} cores ({mi['cpu_model']}),"
            f" {mi['memory_gib']} GiB memory, Linux {mi['kernel']}, Python {mi['python']}"
        )
        if mi.get("free_page_reporting"):
            fpr = mi["free_page_reporting"]
            L.append(
                "- free page reporting on (the VM hands freed memory back to its host): "
                + ", ".join(
                    f"{k}={fpr[k]}" for k in ("page_reporting_order", "min_free_ms") if k in fpr
                )
                + "; each timed run starts right after the previous copy is freed"
                + (f", then {m['settle']} s of settling" if m.get("settle") else "")
            )
        L.append(
            f"- stxpar {mi['stxpar']} (git {mi['git']}); defaults here: {mi['stxpar_default_workers']}"
            f" sender worker(s) to 127.0.0.1 ({mi.get('stxpar_default_recv_workers', '?')} receiver"
            f" workers), {mi['stxpar_default_block_size'] >> 20} MiB blocks"
        )
        L.append(
            "- peers: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "stx")
        )
        L.append(
            f"- file: {human(self.size)} ({self.size} bytes) of random data in {m['source_dir']};"
            f" each copy a fresh file ({'tmpfs' if m['source_dir'].startswith('/dev/shm') else m['source_dir']}"
            + (f", or `{m['real_disk']}` for the '-> disk' rows" if m["real_disk"] else "")
            + "); loopback 127.0.0.1"
        )
        L.append(
            f"- {m['rounds']} round(s){' after an untimed warm-up run of each tool' if m.get('warmup') else ''},"
            " configurations round-robin in alternating order; load average"
            f" {m['loadavg_start'][0]} at start, {m['loadavg_end'][0]} at the end; harness CPU"
            f" {m['harness_cpu_s']} s"
        )
        L.append(
            "- MB/s = 10^6 bytes/s over the wall time (sender start -> copy complete); CPU = user+sys"
            " of the whole process tree, per 10^9 bytes; peak RSS = largest sum over each side's"
            " tree, sampled every"
            f" {int(m['sample_interval_s'] * 1000)} ms (median (max) over runs). A shared, noisy"
            " machine: quote ratios from one run, not absolute numbers."
        )
        for peer, why in self.skipped.items():
            L.append(f"- {peer}: {why}")
        L.append("")

        def table(group: str, title: str) -> None:
            cs = [c for c in self.configs if c.group == group]
            if not cs:
                return
            L.append(f"## {title}")
            L.append("")
            suffix = "-disk" if group == "disk" else ""
            refs = {}
            for peer in ("scp", "socat"):
                ref = self.config(peer + suffix)
                mb = ref.summary(self.size)["mb_s_median"] if ref is not None else None
                if mb:
                    refs[peer] = mb
            L.append(
                "| configuration | ok/runs | wall s | wall min-max | MB/s | MB/s min-max |"
                + "".join(f" x {p} |" for p in refs)
                + " CPU s/GB send | CPU s/GB recv | CPU s/GB total | peak RSS send MiB |"
                " peak RSS recv MiB |"
            )
            L.append("| --- |" + " ---: |" * (10 + len(refs)))
            for c in cs:
                s = c.summary(self.size)
                ratios = "".join(
                    f" {fmt(s['mb_s_median'] / mb if s['mb_s_median'] else None)} |"
                    for mb in refs.values()
                )
                rss_s = f"{fmt(s['rss_send_mib_median'], 0)} ({fmt(s['rss_send_mib_max'], 0)})"
                rss_r = (
                    "-"
                    if s["rss_recv_mib_median"] is None
                    else f"{fmt(s['rss_recv_mib_median'], 0)} ({fmt(s['rss_recv_mib_max'], 0)})"
                )
                L.append(
                    f"| {c.label} | {s['ok']}/{s['runs']} | {fmt(s['wall_median'])} |"
                    f" {fmt(s['wall_min'])}-{fmt(s['wall_max'])} | {fmt(s['mb_s_median'], 0)} |"
                    f" {fmt(s['mb_s_min'], 0)}-{fmt(s['mb_s_max'], 0)} |{ratios}"
                    f" {fmt(s['cpu_s_per_gb_send'])} |"
                    f" {fmt(s['cpu_s_per_gb_recv'])} | {fmt(s['cpu_s_per_gb_total'])} | {rss_s} | {rss_r} |"
                )
            if refs:
                L.append("")
                L.append(
                    ", ".join(f"'x {p}'" for p in refs)
                    + ": median MB/s over that peer's median MB/s"
                    + (" (to disk)." if suffix else ".")
                )
            L.append("")

        table("main", f"Throughput, CPU and memory ({human(self.size)}, tmpfs -> tmpfs)")
        tg = self.targets()
        if tg:
            L.append("## Against the targets (stxpar at its defaults)")
            L.append("")
            L.append("| target | measured | met |")
            L.append("| --- | --- | --- |")
            for t in tg:
                met = "-" if t["pass"] is None else "yes" if t["pass"] else "NO"
                L.append(f"| {t['target']} | {t['text']} | {met} |")
            L.append("")
            L.append(
                "Ratios are of median wall times; 'per round' pairs the two tools' runs of the same"
                " round."
            )
            L.append("")
        table("block", f"Block size (stxpar, default workers, {human(self.size)})")
        if self.disk_root is not None:
            table("disk", f"Destination on a real disk ({self.args.real_disk})")
            L.append(
                "Wall time here includes an fsync of the copy by the harness after the tool exits"
                " (stxpar syncs as it writes, the others do not), so every row is time to durable."
            )
            L.append("")
        if self.resume:
            r = self.resume
            L.append("## Resume cost (stxpar defaults)")
            L.append("")
            L.append(
                "`stx send` is SIGKILLed (its whole process group) once the receiver's"
                " `.NAME.stxstate` holds half the blocks; once the receiver has logged that it kept"
                f" the partial (+ {self.args.resume_gap} s) the same command runs again against the"
                " same receiver. The second run's wall time is the resume cost."
            )
            L.append("")
            L.append("| what | median s | min-max |")
            L.append("| --- | ---: | ---: |")
            f = r["full"]
            L.append(
                f"| full run | {fmt(f['wall_median'])} | {fmt(f['wall_min'])}-{fmt(f['wall_max'])} |"
            )
            if "resume_wall_median" in r:
                L.append(
                    f"| second run after the kill | {fmt(r['resume_wall_median'])} |"
                    f" {fmt(r['resume_wall_min'])}-{fmt(r['resume_wall_max'])} |"
                )
                L.append(f"| ideal: full x (1 - held) | {fmt(r['ideal_resume_wall'])} | |")
                L.append("")
                L.append(
                    f"Held at the restart: {100 * r['held_fraction_median']:.0f}% of the blocks"
                    f" (median). Second run / full run = {r['resume_over_full']:.2f}; overhead over"
                    f" the ideal {r['overhead_s']:+.2f} s. The receiver noticed the kill after"
                    f" {r['receiver_noticed_s_median']:.2f} s (median); until then it refuses the"
                    " same file from a new sender."
                )
            else:
                L.append("")
                L.append(
                    "No resume run completed: "
                    + "; ".join(str(x.get("error")) for x in r["resume_runs"])
                )
            L.append("")
        if self.handshake:
            L.append(f"## Latency of tiny transfers ({self.handshake['n']} each, after a warm-up)")
            L.append("")
            L.append("| case | median ms | p90 ms | min-max ms |")
            L.append("| --- | ---: | ---: | ---: |")
            for name, c in self.handshake["cases"].items():
                err = f" (errors: {c['error']})" if c.get("error") else ""
                L.append(
                    f"| {name}{err} | {fmt(c['median_ms'], 1)} | {fmt(c['p90_ms'], 1)} |"
                    f" {fmt(c['min_ms'], 1)}-{fmt(c['max_ms'], 1)} |"
                )
            L.append("")
        if self.rss_sizes:
            L.append("## Peak RSS against file size (stxpar defaults)")
            L.append("")
            L.append("| file | ok/runs | MB/s | peak RSS send MiB | peak RSS recv MiB |")
            L.append("| --- | ---: | ---: | ---: | ---: |")
            for name, v in self.rss_sizes["sizes"].items():
                if "summary" not in v:
                    L.append(f"| {name} | {v['error']} | | | |")
                    continue
                s = v["summary"]
                L.append(
                    f"| {name} | {s['ok']}/{s['runs']} | {fmt(s['mb_s_median'], 0)} |"
                    f" {fmt(s['rss_send_mib_median'], 0)} ({fmt(s['rss_send_mib_max'], 0)}) |"
                    f" {fmt(s['rss_recv_mib_median'], 0)} ({fmt(s['rss_recv_mib_max'], 0)}) |"
                )
            L.append("")
            L.append(f"Sizes run {self.rss_sizes['order']}.")
            L.append("")
        problems = [
            f"- {c.label}, round {r.get('round', 0) + 1}: {r.get('error') or ''} {'; '.join(r.get('notes', []))}"
            for c in self.configs
            for r in c.runs
            if not r["ok"] or r.get("notes")
        ]
        if problems or self.notes:
            L.append("## Failures and notes")
            L.append("")
            L.extend(problems)
            L.extend(f"- {n}" for n in self.notes)
            L.append("")
        return "\n".join(L)

    def plot(self, path: Path) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            say("no plot: matplotlib is not installed (pip install -e '.[perf]')")
            return False
        blocks = [c for c in self.configs if c.group == "block" and c.ok_runs()]
        fig, axes = plt.subplots(
            1, 2 if blocks else 1, figsize=(13 if blocks else 8, 5), squeeze=False
        )
        ax = axes[0][0]
        pts = []
        for c in self.configs:
            if c.group == "main" and c.tool == "stxpar" and c.workers is not None:
                s = c.summary(self.size)
                if s["mb_s_median"]:
                    pts.append((c.workers, s["mb_s_median"], s["mb_s_min"], s["mb_s_max"]))
        pts.sort()
        if pts:
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                marker="o",
                capsize=4,
                lw=2,
                color="C0",
                label="stxpar (median, min-max)",
            )
        d = self.config("stxpar-default")
        if d is not None and d.ok_runs():
            s = d.summary(self.size)
            ax.plot([SEND_WORKERS], [s["mb_s_median"]], marker="*", ms=16, ls="none", color="C3",
                    label=f"stxpar defaults ({SEND_WORKERS} workers)")  # fmt: skip
        styles = {"scp": "C1", "ssh": "C2", "socat": "C4", "cp": "C7"}
        for c in self.configs:
            if c.group == "main" and c.tool != "stxpar" and c.ok_runs():
                s = c.summary(self.size)
                ax.axhline(s["mb_s_median"], ls="--", color=styles.get(c.tool, "k"),
                           label=f"{c.label}: {s['mb_s_median']:.0f} MB/s")  # fmt: skip
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for p in pts} | {SEND_WORKERS})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel("stxpar workers (each side)")
        ax.set_ylabel("MB/s (10^6 bytes/s, wall time)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(
            f"{human(self.size)}, tmpfs -> tmpfs over loopback, {self.args.rounds} round(s)"
        )
        if blocks:
            bx = axes[0][1]
            bs = sorted(
                ((c.block_size or 0, c.summary(self.size)) for c in blocks), key=lambda t: t[0]
            )
            xs = [b for b, _ in bs]
            ys = [s["mb_s_median"] for _, s in bs]
            err = [
                [s["mb_s_median"] - s["mb_s_min"] for _, s in bs],
                [s["mb_s_max"] - s["mb_s_median"] for _, s in bs],
            ]
            bx.errorbar(xs, ys, yerr=err, marker="o", capsize=4, lw=2)
            bx.set_xscale("log", base=2)
            bx.set_xticks(xs)
            bx.set_xticklabels([human(x) for x in xs])
            bx.set_xlabel(f"stxpar block size ({SEND_WORKERS} workers)")
            bx.set_ylabel("MB/s")
            bx.set_ylim(bottom=0)
            bx.grid(True, alpha=0.3)
            bx.set_title("block size")
        mi = machine_info()
        fig.suptitle(
            f"stxpar vs peers on {mi['cores']} cores ({mi['cpu_model']}), {self.started:%Y-%m-%d %H:%M}",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True

    def write(self, interrupted: bool) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        md = self.markdown(interrupted)
        (out / "results.md").write_text(md + "\n")
        (out / "results.json").write_text(json.dumps(self.to_json(interrupted), indent=2) + "\n")
        print(md)
        wrote = [str(out / "results.md"), str(out / "results.json")]
        if self.args.plot and self.configs and self.plot(out / "throughput.png"):
            wrote.append(str(out / "throughput.png"))
        say("wrote " + ", ".join(wrote))


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="perf/bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", help="file size (default 2G; 256M with --quick)")
    ap.add_argument(
        "--rounds", type=int, help="rounds of every configuration (default 3; 1 with --quick)"
    )
    ap.add_argument(
        "--workers", help="stxpar worker counts, both sides (default 1,2,4,8; 1,2 with --quick)"
    )
    ap.add_argument(
        "--block-sizes",
        help="stxpar block sizes to sweep at default workers (default none; 1M,4M,16M with --full)",
    )
    ap.add_argument(
        "--peers", default="scp,ssh,socat,cp", help="any of scp,ssh,socat,cp (default all)"
    )
    ap.add_argument("--out", default="perf/results", help="output directory (default perf/results)")
    ap.add_argument(
        "--plot", action="store_true", help="also draw throughput.png (needs the perf extra)"
    )
    ap.add_argument(
        "--real-disk",
        metavar="DIR",
        help="also run every tool with the copy on this (real disk) directory ('none': off;"
        " /var/tmp with --full or --quick)",
    )
    ap.add_argument(
        "--resume", action="store_true", help="measure the cost of a resume after a kill at half"
    )
    ap.add_argument(
        "--handshake", type=int, metavar="N", help="latency of tiny transfers, N times each"
    )
    ap.add_argument(
        "--rss-sizes",
        metavar="SIZES",
        help="peak RSS of stxpar at these file sizes (2G,8G with --full)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of the harness: small and short, every mode",
    )
    ap.add_argument("--full", action="store_true", help="every mode the issue asks for, full size")
    ap.add_argument(
        "--dir", default="/dev/shm", help="where the source and copies go (default /dev/shm)"
    )
    ap.add_argument(
        "--interval", type=float, default=0.05, help="RSS sampling interval, s (default 0.05)"
    )
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between runs (default 1)")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds between freeing the previous copy and starting the next timed run, for"
        " every tool (default 0; a few seconds measures writes into memory the VM has handed"
        " back to its host: see perf/README.md)",
    )
    ap.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-up run of each tool before the rounds",
    )
    ap.add_argument(
        "--resume-gap",
        type=float,
        default=0.0,
        help="seconds to wait, after the receiver noticed the kill, before the second run (default 0)",
    )
    ap.add_argument(
        "--timeout", type=float, default=0.0, help="per-run limit, s (default 120 + size/5 MB/s)"
    )
    ap.add_argument("--no-install", action="store_true", help="never apt-get install missing peers")
    a = ap.parse_args(argv)
    q, f = a.quick, a.full
    a.size = parse_size(a.size or ("256M" if q else "2G"))
    a.rounds = a.rounds or (1 if q else 3)
    a.worker_list = [int(w) for w in (a.workers or ("1,2" if q else "1,2,4,8")).split(",") if w]
    a.block_size_list = sizes(a.block_sizes or ("1M,16M" if q else "1M,4M,16M" if f else ""))
    a.peer_list = [p for p in a.peers.split(",") if p]
    bad = [p for p in a.peer_list if p not in peers.NEEDS]
    if bad:
        ap.error(f"unknown peer(s) {bad}: choose from {','.join(peers.NEEDS)}")
    if a.real_disk is None and (q or f):
        a.real_disk = "/var/tmp"
    if a.real_disk in ("", "none"):
        a.real_disk = None
    if a.real_disk and not os.path.isdir(a.real_disk):
        ap.error(f"--real-disk {a.real_disk}: not a directory")
    a.resume = a.resume or q or f
    a.handshake = a.handshake if a.handshake is not None else (3 if q else 20 if f else 0)
    a.rss_size_list = sizes(a.rss_sizes or ("64M,256M" if q else "2G,8G" if f else ""))
    a.plot = a.plot or q or f
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    bench = Bench(args)
    interrupted = False
    try:
        bench.setup()
        bench.run_rounds()
        bench.measure_required_steps()
        if args.resume:
            bench.run_resume()
        if args.handshake:
            bench.run_handshake()
        if args.rss_size_list:
            bench.run_rss_sizes()
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: cleaning up")
    finally:
        bench.cleanup()
    if bench.configs:
        bench.write(interrupted)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
