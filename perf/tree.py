"""Benchmark copying a directory tree: stxpar against rsync, tar | ssh, scp -r and GridFTP.

    python perf/tree.py                                   # 10,000 x 16 KiB in 100 dirs + 4 x 64 MiB, 5 rounds
    python perf/tree.py --peers rsync,tar --rounds 3      # only some tools
    python perf/tree.py --small 500 --large 1 --large-size 8M --rounds 1 --install   # a quick try

The tree (random contents) is made once in a scratch directory under --dir (/dev/shm) and
copied, /dev/shm to /dev/shm over loopback, by:

* stxpar: ``stx recv --listen 127.0.0.1:0 --dest DST --psk-file K --once`` and
  ``stx send SRC 127.0.0.1:PORT --psk-file K --json --quiet [--workers N]``;
* rsync: ``rsync -a -e 'ssh -c aes256-gcm@openssh.com ...' SRC HOST:DST/``;
* tar: ``tar -C PARENT -cf - tree | ssh -c aes256-gcm@openssh.com HOST 'tar -xf - -C DST'``;
* scp: ``scp -r -O -c aes256-gcm@openssh.com SRC HOST:DST``;
* globus: ``globus-url-copy -r -cd -cc 4 -p 4 -fast file://SRC/ ftp://127.0.0.1:PORT/DST/tree/``
  against an anonymous ``globus-gridftp-server`` on 127.0.0.1 (unencrypted; for reference).

ssh-based tools go through the private loopback sshd of perf/peers.py. Rounds are
interleaved (every tool once per round, in the same order), each run starts from an empty
destination and its copy is checked (every file present with its size, nothing extra; for
stxpar also ``diff -r``). Prints median seconds and MB/s per tool and the ratio of stxpar to
the faster of rsync and tar | ssh; ``--json-out`` writes everything as JSON. Everything it
made (scratch directory, sshd keys, servers) is removed at the end, also on Ctrl-C.
See perf/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402

TOOLS = ("stx", "rsync", "tar", "scp", "globus")
LABELS = {
    "stx": "stxpar (stx send/recv)",
    "rsync": "rsync -a over ssh",
    "tar": "tar c | ssh tar x",
    "scp": "scp -r -O",
    "globus": "globus-url-copy -r -cc 4 -p 4 (plain)",
}
GRIDFTP = shutil.which("globus-gridftp-server") or "/usr/sbin/globus-gridftp-server"
SSH_TOOLS = ("ssh", "ssh-keygen", peers.SSHD)
SSH_PKGS = ("openssh-server", "openssh-client")
#: tool -> (programs it needs, Debian packages that bring them)
NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "stx": ((), ()),
    "rsync": (("rsync", *SSH_TOOLS), ("rsync", *SSH_PKGS)),
    "tar": (("tar", *SSH_TOOLS), ("tar", *SSH_PKGS)),
    "scp": (("scp", *SSH_TOOLS), SSH_PKGS),
    "globus": (
        ("globus-url-copy", GRIDFTP),
        ("globus-gridftp-server-progs", "globus-gass-copy-progs"),
    ),
}
TREE = "tree"  # the source directory's name: it arrives as DST/tree


def say(msg: str) -> None:
    print(f"tree: {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """``16K``, ``64M``, ``1G`` (powers of 1024) or plain bytes; without importing stxpar, so
    the peers can be measured while stxpar's own code is mid-change."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16K, 64M)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def have(prog: str) -> bool:
    return os.access(prog, os.X_OK) if prog.startswith("/") else shutil.which(prog) is not None


def ensure_tools(tools: list[str], *, install: bool) -> dict[str, str]:
    """With ``install``, apt-get the packages of missing tools (as root); {tool: why skipped}."""
    want = sorted(
        {pkg for t in tools for prog in NEEDS[t][0] if not have(prog) for pkg in NEEDS[t][1]}
    )
    if want and install:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            say(f"cannot install {' '.join(want)} (needs root and apt-get)")
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", *want]
            say("installing: " + " ".join(cmd))
            if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                say("apt-get install failed; running apt-get update and trying again")
                subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL)
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
    skipped = {}
    for t in tools:
        gone = [p for p in NEEDS[t][0] if not have(p)]
        if gone:
            skipped[t] = f"skipped: {', '.join(gone)} not installed" + (
                "" if install else " (--install installs it)"
            )
            say(f"{t} {skipped[t]}")
    return skipped


def human(n: float) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{int(n) >> shift}{unit}"
    return f"{n / 1e6:.1f}MB" if n >= 1e6 else f"{int(n)}B"


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


class Failed(Exception):
    pass


class TreeBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stx = args.stx or str(Path(sys.executable).with_name("stx"))
        if not os.access(self.stx, os.X_OK):
            self.stx = shutil.which(self.stx) or shutil.which("stx") or self.stx
        NEEDS["stx"] = ((self.stx,), ())
        self.root = Path(tempfile.mkdtemp(prefix="stx-tree-", dir=args.dir))
        # stx's bytecode cached as an installed stxpar has it (the warm-up run fills it)
        self.stx_env = peers.installed_env(self.root / "pycache")
        # the anonymous GridFTP server runs as nobody: it must reach its destinations
        os.chmod(self.root, 0o755)
        self.src = self.root / "src" / TREE
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.key = self.root / "psk.key"
        self.sshd: peers.LoopbackSshd | None = None
        self.gridftp: subprocess.Popen[bytes] | None = None
        self.gridftp_port = 0
        self.live: list[subprocess.Popen[bytes]] = []
        self.stale: list[Path] = []
        self.skipped: dict[str, str] = {}
        self.expected: dict[str, int] = {}
        self.tools: list[str] = []
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.seq = 0
        self.started = dt.datetime.now().astimezone()
        self.load_start = os.getloadavg()

    # ------------------------------------------------------------ processes

    def spawn(self, argv: list[str], tag: str, **kw: Any) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{tag}.err", "wb") as err:
            kw.setdefault("stdout", subprocess.DEVNULL)
            kw.setdefault("stdin", subprocess.DEVNULL)
            proc = subprocess.Popen(argv, stderr=err, start_new_session=True, **kw)
        self.live = [p for p in self.live if p.returncode is None] + [proc]
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def tag(self, name: str) -> str:
        self.seq += 1
        return f"{self.seq:04d}-{name}"

    def err_tail(self, tag: str) -> str:
        try:
            text = (self.logs / f"{tag}.err").read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-3:])[-400:]

    def cleanup(self) -> None:
        for proc in self.live:
            self.kill(proc)
        if self.gridftp is not None:
            self.kill(self.gridftp)
        if self.sshd is not None:
            self.sshd.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ setup

    def make_tree(self) -> None:
        a = self.args
        need = 2 * (a.small * a.small_size + a.large * a.large_size) + (256 << 20)
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise SystemExit(f"tree: {a.dir} has {human(free)} free; this tree needs {human(need)}")
        say(
            f"making the tree in {self.src}: {a.small} x {human(a.small_size)} in {a.dirs}"
            f" directories + {a.large} x {human(a.large_size)}"
        )
        self.src.mkdir(parents=True)
        dirs = max(1, min(a.dirs, a.small)) if a.small else 0
        for d in range(dirs):
            (self.src / f"d{d:03d}").mkdir()
        for i in range(a.small):
            rel = f"d{i % dirs:03d}/f{i:05d}.bin"
            (self.src / rel).write_bytes(os.urandom(a.small_size))
            self.expected[rel] = a.small_size
        for i in range(a.large):
            rel = f"large-{i}.bin"
            with open(self.src / rel, "wb") as f:
                left = a.large_size
                while left:
                    n = min(left, 16 << 20)
                    f.write(os.urandom(n))
                    left -= n
            self.expected[rel] = a.large_size
        for dirpath, _, _ in os.walk(self.root / "src"):
            os.chmod(dirpath, 0o755)

    def setup(self) -> None:
        wanted = self.args.tool_list
        self.skipped = ensure_tools(wanted, install=self.args.install)
        if any(t in wanted and t not in self.skipped for t in ("rsync", "tar", "scp")):
            try:
                self.sshd = peers.LoopbackSshd().start()
                say(f"loopback sshd on 127.0.0.1:{self.sshd.port} (pid {self.sshd.pid})")
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                for t in ("rsync", "tar", "scp"):
                    self.skipped.setdefault(t, f"skipped: no loopback sshd: {exc}")
                say(f"ssh-based tools skipped: {exc}")
        if "globus" in wanted and "globus" not in self.skipped:
            try:
                self.start_gridftp()
            except RuntimeError as exc:
                self.skipped["globus"] = f"skipped: {exc}"
                say(f"globus skipped: {exc}")
        if "stx" in wanted and "stx" not in self.skipped:
            subprocess.run(
                [self.stx, "keygen", "-o", str(self.key)], check=True, capture_output=True
            )
        self.tools = [t for t in wanted if t not in self.skipped]
        self.runs = {t: [] for t in self.tools}
        self.make_tree()

    def start_gridftp(self) -> None:
        self.gridftp_port = peers.free_port()
        argv = [GRIDFTP, "-aa", "-p", str(self.gridftp_port), "-control-interface", "127.0.0.1"]
        argv += ["-data-interface", "127.0.0.1", "-c", "/dev/null", "-log-level", "ERROR"]
        argv += ["-logfile", str(self.logs / "gridftp.log")]
        if os.geteuid() == 0:
            argv += ["-anonymous-user", "nobody"]
        self.gridftp = self.spawn(argv, "gridftp-server")
        end = time.monotonic() + 15
        while not port_open(self.gridftp_port):
            if self.gridftp.poll() is not None or time.monotonic() > end:
                why = self.err_tail("gridftp-server") or f"exit {self.gridftp.poll()}"
                raise RuntimeError(f"globus-gridftp-server did not come up: {why}")
            time.sleep(0.05)
        say(f"anonymous GridFTP server on 127.0.0.1:{self.gridftp_port} (pid {self.gridftp.pid})")

    def versions(self) -> dict[str, str]:
        v: dict[str, str] = {}
        if "stx" in self.tools:
            v["stx"] = peers.version([self.stx, "--version"])
        if self.sshd is not None:
            v["ssh"] = peers.version(["ssh", "-V"])
        if "rsync" in self.tools:
            v["rsync"] = peers.version(["rsync", "--version"])
        if "tar" in self.tools:
            v["tar"] = peers.version(["tar", "--version"])
        if "globus" in self.tools:
            v["globus-url-copy"] = peers.version(["globus-url-copy", "-version"])
        return v

    # ------------------------------------------------------------ one run

    def dest(self, tool: str) -> Path:
        dst = Path(tempfile.mkdtemp(prefix=f"dst-{tool}-", dir=self.root))
        if tool == "globus" and os.geteuid() == 0:
            os.chown(dst, pwd.getpwnam("nobody").pw_uid, -1)
        return dst

    def release(self) -> None:
        """Free the previous copies now, just before a timed run (every tool alike)."""
        for p in self.stale:
            shutil.rmtree(p, ignore_errors=True)
        self.stale.clear()

    def wait_all(self, procs: list[subprocess.Popen[bytes]], t0: float) -> float:
        """Wait for every process; seconds from t0 to the last exit. Raises Failed on timeout.

        The waits block (a timer kills the processes at the limit): ``Popen.wait(timeout=)``
        polls, with sleeps of up to 50 ms, which rounded every time here up to the next poll."""
        expired = threading.Event()

        def kill_all() -> None:
            expired.set()
            for q in procs:
                self.kill(q)

        timer = threading.Timer(max(0.1, t0 + self.args.timeout - time.monotonic()), kill_all)
        timer.start()
        try:
            for p in procs:
                p.wait()
            done = time.monotonic() - t0
        finally:
            timer.cancel()
        if expired.is_set():
            raise Failed(f"timed out after {self.args.timeout:.0f} s")
        return done

    def wait_sshd_idle(self) -> None:
        """Let the sshd reap the previous connection's processes before the next run."""
        assert self.sshd is not None
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                kids = Path(f"/proc/{self.sshd.pid}/task/{self.sshd.pid}/children").read_text()
            except OSError:
                return
            if not kids.strip():
                return
            time.sleep(0.05)

    def run_once(self, tool: str, round_no: int) -> dict[str, Any]:
        dst = self.dest(tool)
        tag = self.tag(tool)
        rec: dict[str, Any] = {"round": round_no, "ok": False, "loadavg": os.getloadavg()[0]}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            if tool == "stx":
                rargv = [self.stx, "recv", "--listen", "127.0.0.1:0", "--dest", str(dst)]
                rargv += ["--psk-file", str(self.key), "--once", "--json"]
                with open(self.logs / f"{tag}-recv.out", "wb") as rout:
                    recv = self.spawn(rargv, f"{tag}-recv", stdout=rout, env=self.stx_env)
                procs.append(recv)
                try:
                    text = peers.wait_for_text(
                        self.logs / f"{tag}-recv.err", "listening on", recv, 60
                    )
                except RuntimeError as exc:
                    raise Failed(f"stx recv: {exc}") from None
                m = re.search(r"listening on [\d.]+:(\d+)", text)
                if not m:
                    raise Failed(f"no port in: {text.strip()[-200:]}")
                argv = [self.stx, "send", str(self.src), f"127.0.0.1:{m.group(1)}"]
                argv += ["--psk-file", str(self.key), "--json", "--quiet"]
                if self.args.stx_workers:
                    argv += ["--workers", str(self.args.stx_workers)]
                self.release()
                t0 = time.monotonic()
                with open(self.logs / f"{tag}.out", "wb") as out:
                    send = self.spawn(argv, tag, stdout=out, env=self.stx_env)
                procs.append(send)
                rec["wall"] = self.wait_all([send], t0)
                try:  # the receiver exits after its receipt (--once): not counted, but awaited
                    recv.wait(timeout=30 if send.returncode == 0 else 2)
                except subprocess.TimeoutExpired:
                    self.kill(recv)
                rec["rc"] = [send.returncode, recv.returncode]
                try:
                    lines = (self.logs / f"{tag}.out").read_text().strip().splitlines()
                    rec["stx_json"] = json.loads(lines[-1]) if lines else None
                except ValueError:
                    pass
                if send.returncode != 0 or recv.returncode != 0:
                    raise Failed(
                        f"exit {send.returncode}/{recv.returncode}: {self.err_tail(tag)}"
                        f" {self.err_tail(f'{tag}-recv')}"
                    )
            elif tool in ("rsync", "tar", "scp"):
                assert self.sshd is not None
                self.wait_sshd_idle()
                host = f"{self.sshd.user}@127.0.0.1"
                if tool == "rsync":
                    ssh = shlex.join(self.sshd.ssh_argv("true")[:-2])
                    argvs = [["rsync", "-a", "-e", ssh, str(self.src), f"{host}:{dst}/"]]
                elif tool == "scp":
                    scp = self.sshd.scp_argv(str(self.src), str(dst))
                    argvs = [[scp[0], "-r", *scp[1:]]]
                else:
                    argvs = [
                        ["tar", "-C", str(self.src.parent), "-cf", "-", TREE],
                        self.sshd.ssh_argv(f"tar -xf - -C {shlex.quote(str(dst))}"),
                    ]
                self.release()
                t0 = time.monotonic()
                if len(argvs) == 1:
                    procs.append(self.spawn(argvs[0], tag))
                else:
                    tar = self.spawn(argvs[0], f"{tag}-tar", stdout=subprocess.PIPE)
                    procs.append(tar)
                    assert tar.stdout is not None
                    procs.append(self.spawn(argvs[1], tag, stdin=tar.stdout))
                    tar.stdout.close()
                rec["wall"] = self.wait_all(procs, t0)
                rec["rc"] = [p.returncode for p in procs]
                if any(procs_rc != 0 for procs_rc in rec["rc"]):
                    raise Failed(f"exit {rec['rc']}: {self.err_tail(tag)}")
            elif tool == "globus":
                argv = ["globus-url-copy", "-r", "-cd", "-cc", "4", "-p", "4", "-fast"]
                argv += [f"file://{self.src}/"]
                argv += [f"ftp://127.0.0.1:{self.gridftp_port}{dst}/{TREE}/"]
                self.release()
                t0 = time.monotonic()
                procs.append(self.spawn(argv, tag))
                rec["wall"] = self.wait_all(procs, t0)
                rec["rc"] = [procs[0].returncode]
                if procs[0].returncode != 0:
                    raise Failed(f"exit {procs[0].returncode}: {self.err_tail(tag)}")
            else:
                raise ValueError(tool)
            problems = self.check(dst / TREE)
            if not problems and tool == "stx":
                diff = subprocess.run(
                    ["diff", "-r", "-q", "--no-dereference", str(self.src), str(dst / TREE)],
                    capture_output=True,
                    text=True,
                )
                if diff.returncode != 0:
                    problems.append(f"diff -r: {(diff.stdout + diff.stderr).strip()[:300]}")
            if problems:
                raise Failed(
                    f"the copy is wrong ({len(problems)} problems): {'; '.join(problems[:5])}"
                )
            rec["ok"] = True
        except (Failed, OSError, subprocess.SubprocessError) as exc:
            rec["error"] = str(exc)
            say(f"{tool}, {self.when(round_no)}: FAILED: {exc}")
        finally:
            for p in procs:
                self.kill(p)
            self.stale.append(dst)
        if rec["ok"]:
            say(f"{tool}, {self.when(round_no)}: {rec['wall']:.2f} s")
        return rec

    @staticmethod
    def when(round_no: int) -> str:
        return "warm-up" if round_no < 0 else f"round {round_no + 1}"

    def check(self, copy: Path) -> list[str]:
        """Every file of the source present in the copy with its size, nothing else there."""
        if not copy.is_dir():
            return [f"{copy} is not a directory"]
        got: dict[str, int] = {}
        for dirpath, _, names in os.walk(copy):
            for name in names:
                p = Path(dirpath) / name
                got[p.relative_to(copy).as_posix()] = os.lstat(p).st_size
        problems = [f"{r}: missing" for r in sorted(self.expected.keys() - got.keys())]
        problems += [f"{r}: extra" for r in sorted(got.keys() - self.expected.keys())]
        problems += [
            f"{r}: {got[r]} bytes, not {n}"
            for r, n in sorted(self.expected.items())
            if r in got and got[r] != n
        ]
        return problems

    # ------------------------------------------------------------ rounds and report

    def run(self) -> None:
        if self.args.warmup:
            say("warm-up: one untimed run of each tool")
            for t in self.tools:
                self.run_once(t, -1)
        for r in range(self.args.rounds):
            for t in self.tools:
                self.runs[t].append(self.run_once(t, r))
                time.sleep(self.args.pause)
        self.release()

    @property
    def total_bytes(self) -> int:
        return sum(self.expected.values())

    def summary(self, tool: str) -> dict[str, Any]:
        runs = self.runs.get(tool, [])
        walls = [r["wall"] for r in runs if r["ok"]]
        med = median(walls)
        return {
            "label": LABELS[tool],
            "runs": len(runs),
            "ok": len(walls),
            "wall_median": med,
            "wall_min": min(walls) if walls else None,
            "wall_max": max(walls) if walls else None,
            "mb_s_median": self.total_bytes / 1e6 / med if med else None,
            "files_s_median": len(self.expected) / med if med else None,
        }

    def ratio(self) -> dict[str, Any]:
        """stxpar against the faster (by median) of rsync and tar | ssh: their time / stx's."""
        stx = self.summary("stx")["wall_median"] if "stx" in self.runs else None
        best = [
            (s["wall_median"], t)
            for t in ("rsync", "tar")
            if t in self.runs and (s := self.summary(t))["wall_median"] is not None
        ]
        out: dict[str, Any] = {"target": 1.5, "stx_median": stx}
        if not best:
            out["why_none"] = "neither rsync nor tar | ssh completed a run"
            return out
        wall, tool = min(best)
        out.update(faster_peer=tool, faster_peer_median=wall)
        if stx is None:
            out["why_none"] = "stxpar completed no run" if "stx" in self.runs else "stx not run"
            return out
        out["ratio"] = wall / stx
        per_round = []
        for r, s in enumerate(self.runs["stx"]):
            pw = [
                self.runs[t][r]["wall"]
                for t in ("rsync", "tar")
                if t in self.runs and r < len(self.runs[t]) and self.runs[t][r]["ok"]
            ]
            if s["ok"] and pw:
                per_round.append(min(pw) / s["wall"])
        out["per_round"] = per_round
        return out

    def markdown(self, interrupted: bool) -> str:
        a = self.args
        L = [
            f"# Tree copy, {a.dir} -> {a.dir} over loopback ({self.started:%Y-%m-%d %H:%M %Z})",
            "",
            f"Tree: {a.small} files of {human(a.small_size)} in {a.dirs} directories + {a.large}"
            f" files of {human(a.large_size)} = {len(self.expected)} files,"
            f" {self.total_bytes / 1e6:.1f} MB. {a.rounds} interleaved round(s)"
            f"{', interrupted' if interrupted else ''}. {os.cpu_count()} CPUs; load average"
            f" {self.load_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
            "",
            "| tool | ok/runs | median s | min-max s | MB/s | files/s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for t in self.tools:
            s = self.summary(t)
            rng = "-" if s["wall_min"] is None else f"{s['wall_min']:.2f}-{s['wall_max']:.2f}"
            L.append(
                f"| {s['label'].replace('|', chr(92) + '|')} | {s['ok']}/{s['runs']} | {fmt(s['wall_median'])} |"
                f" {rng} | {fmt(s['mb_s_median'], 0)} |"
                f" {fmt(s['files_s_median'], 0)} |"
            )
        L.append("")
        r = self.ratio()
        if "ratio" in r:
            pr = r["per_round"]
            rng = f" (per round {min(pr):.2f}-{max(pr):.2f})" if pr else ""
            met = "met" if r["ratio"] >= r["target"] else "NOT met"
            L.append(
                f"stxpar vs the faster of rsync and tar | ssh ({LABELS[r['faster_peer']]}):"
                f" {r['ratio']:.2f}x{rng}; target >= {r['target']}x: {met}."
            )
        else:
            L.append(f"stxpar vs the faster of rsync and tar | ssh: - ({r['why_none']}).")
        L.append("")
        notes = [f"- {t}: {why}" for t, why in self.skipped.items()]
        notes += [
            f"- {t}, round {x['round'] + 1}: {x['error']}"
            for t in self.tools
            for x in self.runs[t]
            if not x["ok"]
        ]
        if notes:
            L += ["Failures and notes:", "", *notes, ""]
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
            "versions": self.versions(),
            "tree": {
                "small": a.small,
                "small_size": a.small_size,
                "dirs": a.dirs,
                "large": a.large,
                "large_size": a.large_size,
                "files": len(self.expected),
                "bytes": self.total_bytes,
            },
            "rounds": a.rounds,
            "stx_workers": a.stx_workers,
            "skipped": self.skipped,
            "tools": {t: {"summary": self.summary(t), "runs": self.runs[t]} for t in self.tools},
            "ratio": self.ratio(),
        }


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="perf/tree.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--small", type=int, default=10_000, help="small files (default 10000)")
    ap.add_argument("--small-size", default="16K", help="size of each small file (default 16K)")
    ap.add_argument("--dirs", type=int, default=100, help="directories for the small files (100)")
    ap.add_argument("--large", type=int, default=4, help="large files (default 4)")
    ap.add_argument("--large-size", default="64M", help="size of each large file (default 64M)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument(
        "--peers",
        default=",".join(TOOLS),
        help=f"tools to run, any of {','.join(TOOLS)} (default all; 'stx' is stxpar)",
    )
    ap.add_argument(
        "--stx", help="the stx program to run (default: the one beside this Python, else on PATH)"
    )
    ap.add_argument("--stx-workers", type=int, help="--workers for stx send (default: stx's)")
    ap.add_argument("--json-out", metavar="FILE", help="write the results as JSON here")
    ap.add_argument(
        "--install",
        action="store_true",
        help="apt-get install the Debian packages of missing tools",
    )
    ap.add_argument("--dir", default="/dev/shm", help="scratch directory (default /dev/shm)")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between runs (default 0.5)")
    ap.add_argument("--timeout", type=float, default=300.0, help="limit for one run, s (300)")
    ap.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up runs"
    )
    a = ap.parse_args(argv)
    try:
        a.small_size = parse_size(a.small_size)
        a.large_size = parse_size(a.large_size)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    a.tool_list = [{"stxpar": "stx"}.get(t, t) for t in a.peers.split(",") if t]
    bad = [t for t in a.tool_list if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {bad}: choose from {','.join(TOOLS)}")
    if a.rounds < 1 or a.small < 0 or a.large < 0 or a.dirs < 1:
        ap.error("--rounds and --dirs must be at least 1, --small and --large not negative")
    if not a.small and not a.large:
        ap.error("an empty tree: give --small or --large")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    bench = TreeBench(args)
    interrupted = False
    try:
        bench.setup()
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: cleaning up")
    finally:
        doc = bench.to_json(interrupted) if bench.runs else None
        md = bench.markdown(interrupted) if bench.runs else None
        bench.cleanup()
    if md is not None:
        print(md)
    if doc is not None and args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
        say(f"wrote {args.json_out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
