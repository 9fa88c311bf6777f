"""Side-by-side A/B of stxpar builds (and socat), alternating, with CPU per process role.

    python perf/ab.py TREE[@LAND] [TREE ...] [--rounds 4] [--size 2G]

Each TREE is a checkout of stxpar with its own ``.venv`` (``python3 -m venv .venv &&
.venv/bin/pip install -e .``), or ``socat`` for plain TCP. ``TREE@VALUE`` runs that tree with
``STX_AB=VALUE`` in the environment, for a switch added to a scratch copy while experimenting.
``TREE::ARG,ARG`` adds those arguments to its ``stx send`` (e.g. ``.::--limit-rate=100G``
against ``.``: what a limit far above the machine's speed costs).
Every round runs each candidate once, in alternating order; each run is ``stx recv --once``
started 1 s ahead, then ``stx send`` of a random file in ``/dev/shm`` over loopback, and the
copy is compared with the source. Wall time runs from the sender's start until both sides have
exited. CPU is sampled from ``/proc`` (psutil) every 20 ms and summed per role: sender
coordinator (sc), sender workers (sw), receiver coordinator (rc), receiver workers (rw), in
seconds per 10^9 bytes; the receiver coordinator's includes its start-up. It is a tool for
deciding between two versions of the code, not a report: ``perf/bench.py`` is that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bench import make_random_file, same_content

from stxpar import ipc
from stxpar.config import parse_size

ROLES = ("sc", "sw", "rc", "rw")


def role_of(name: str, cmdline: str) -> str | None:
    """A process's role, from its name (workers name themselves; a forked sender worker's
    command line is its coordinator's) or its command line."""
    if cmdline.startswith("socat"):
        return "rc" if "LISTEN" in cmdline else "sc"
    if name == ipc.SENDER_WORKER_NAME or "workers.sender" in cmdline:
        return "sw"
    if name == ipc.RECEIVER_WORKER_NAME or "workers.receiver" in cmdline:
        return "rw"
    if " send " in cmdline:
        return "sc"
    if " recv " in cmdline:
        return "rc"
    return None


def one_run(cand: str, src: Path, key: Path, work: Path, port: int) -> tuple[float, dict, bool]:
    cand, _, extra = cand.partition("::")
    tree, _, value = cand.partition("@")
    env = dict(os.environ, STX_AB=value)
    dest = work / f"dst-{port}"
    dest.mkdir()
    out = dest / src.name
    if tree == "socat":
        recv_argv = [
            "socat",
            "-u",
            "-b",
            "1048576",
            f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1",
            f"OPEN:{out},creat,trunc",
        ]
        send_argv = ["socat", "-u", "-b", "1048576", f"OPEN:{src}", f"TCP:127.0.0.1:{port}"]
    else:
        py = str(Path(tree).resolve() / ".venv" / "bin" / "python")
        recv_argv = [
            py,
            "-m",
            "stxpar.cli",
            "recv",
            "--listen",
            f"127.0.0.1:{port}",
            "--psk-file",
            str(key),
            "--dest",
            str(dest),
            "--once",
            "-q",
        ]
        send_argv = [py, "-m", "stxpar.cli", "send", "--psk-file", str(key), str(src),
                     f"127.0.0.1:{port}", "-q", *(a for a in extra.split(",") if a)]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": work, "env": env}
    recv = subprocess.Popen(recv_argv, **quiet)  # type: ignore[call-overload]
    time.sleep(1.0)
    # The previous copy is freed only now, for every candidate alike: on VMs that hand freed
    # memory back to their host, memory freed seconds earlier is slower to write again
    # (perf/README.md, "Noise").
    for old in work.glob("dst-*"):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    send = subprocess.Popen(send_argv, **quiet)  # type: ignore[call-overload]
    procs: dict[int, psutil.Process] = {}
    cpu: dict[int, tuple[str, float]] = {}
    while send.poll() is None or recv.poll() is None:
        for root in (recv.pid, send.pid):
            try:
                rp = psutil.Process(root)
                for p in [rp, *rp.children(recursive=True)]:
                    procs.setdefault(p.pid, p)
            except psutil.Error:
                pass
        for pid, p in procs.items():
            try:
                ct = p.cpu_times()
                r = role_of(p.name(), " ".join(p.cmdline())) or cpu.get(pid, ("?", 0.0))[0]
                cpu[pid] = (r, ct.user + ct.system)
            except psutil.Error:
                pass
        if time.perf_counter() - t0 > 600:
            send.kill()
            recv.kill()
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    ok = send.returncode == 0 and out.exists() and same_content(src, out)
    by = dict.fromkeys(ROLES, 0.0)
    for r, c in cpu.values():
        if r in by:
            by[r] += c
    return wall, by, ok  # the copy is freed just before the next run starts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("candidates", nargs="+", help="stxpar checkouts (TREE or TREE@VALUE), or socat")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--size", default="2G", help="file size, e.g. 512M, 2G (default 2G)")
    ap.add_argument("--dir", default="/dev/shm", help="where the file and copies go")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="stx-ab-", dir=args.dir))
    try:
        src = work / "src.bin"
        make_random_file(src, size)
        key = work / "key"
        stx = next((c for c in args.candidates if c.partition("@")[0] != "socat"), None)
        if stx is not None:
            py = str(Path(stx.partition("@")[0]).resolve() / ".venv" / "bin" / "python")
            subprocess.run([py, "-m", "stxpar.cli", "keygen", "-o", str(key)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        runs: dict[str, list[tuple[float, dict, bool]]] = {c: [] for c in args.candidates}
        port = 47600
        for r in range(args.rounds):
            order = args.candidates if r % 2 == 0 else args.candidates[::-1]
            for cand in order:
                port += 1
                res = one_run(cand, src, key, work, port)
                runs[cand].append(res)
                wall, by, ok = res
                per = " ".join(f"{k} {v / (size / 1e9):.3f}" for k, v in by.items())
                print(f"round {r + 1} {cand}: {wall:.2f} s, {size / wall / 1e6:.0f} MB/s,"
                      f" CPU s/GB {per}{'' if ok else ' COPY DIFFERS'}", flush=True)  # fmt: skip
                time.sleep(1.0)
        print()
        print("| candidate | median MB/s | min-max MB/s | CPU s/GB sc / sw / rc / rw | total |")
        print("| --- | ---: | ---: | --- | ---: |")
        for cand, rs in runs.items():
            rates = [size / w / 1e6 for w, _, _ in rs]
            med = {k: statistics.median(by[k] for _, by, _ in rs) / (size / 1e9) for k in ROLES}
            roles = " / ".join(f"{med[k]:.2f}" for k in ROLES)
            print(f"| {cand} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f}"
                  f" | {roles} | {sum(med.values()):.2f} |")  # fmt: skip
        return 0 if all(ok for rs in runs.values() for _, _, ok in rs) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
