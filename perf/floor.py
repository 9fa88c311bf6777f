"""How close to plain TCP can stxpar get on this machine? The work it cannot skip, measured.

    python perf/floor.py [--size 1G] [--rounds 3]

Plain ``socat`` moves a file with the kernel's copies alone (file -> buffer -> socket ->
buffer -> file). stxpar pays the same copies and, per byte, what the protocol requires on top:
AES-256-GCM on both sides, the CRC-32 on both sides, and the block digest on both sides. This
script measures, in one run:

1. ``socat -b 1M`` over loopback, ``/dev/shm`` to a fresh file there: wall time and CPU of each
   side (``wait4`` rusage of the two processes);
2. one ``stx send`` to an ``stx recv --once`` at their defaults, the same way (CPU of each
   process tree);
3. on one core, the CPU per GB of each required step on 4 MiB blocks (``encrypt_into``,
   ``decrypt_into``, ISA-L CRC-32, XXH3-128), medians of ``--rounds``.

and prints the floor: socat's CPU plus the required steps, the two ceilings that follow for
the stxpar/socat throughput ratio when both sides share the machine's cores (if stxpar keeps
its cores as busy as socat keeps them; if it kept every core busy and started in no time), and
where the measured stxpar run stands. Medians of ``--rounds`` alternating runs; the numbers
move with the machine's memory state (perf/README.md, "Noise"), the ratios much less.
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

from bench import make_random_file, same_content
from peers import wait_for_text
from proctree import measure

from stxpar.config import parse_size
from stxpar.digest import block_digest
from stxpar.records import crc32

BLOCK = 4 << 20


def step_costs(rounds: int, gb: float = 0.5) -> dict[str, float]:
    """CPU seconds per GB of each step the protocol requires per byte, on one core."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    nonce, aad = bytes(12), bytes(64)
    plain = bytearray(os.urandom(BLOCK))
    sealed = bytearray(BLOCK + 16)
    out = bytearray(BLOCK)
    n = int(gb * 1e9) // BLOCK
    aead.encrypt_into(nonce, plain, aad, sealed)
    steps = {
        "AES-256-GCM encrypt_into": lambda: aead.encrypt_into(nonce, plain, aad, sealed),
        "AES-256-GCM decrypt_into": lambda: aead.decrypt_into(nonce, sealed, aad, out),
        "CRC-32 (ISA-L)": lambda: crc32(sealed),
        "XXH3-128 block digest": lambda: block_digest(plain),
    }
    costs: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t = time.process_time()
            for _ in range(n):
                fn()
            costs[name].append((time.process_time() - t) / (n * BLOCK / 1e9))
    return {k: statistics.median(v) for k, v in costs.items()}


def free_others(keep: Path) -> None:
    """Free the previous copies now, just before the timed run (perf/README.md, "Noise")."""
    for old in keep.parent.glob("d*"):
        if old != keep:
            shutil.rmtree(old)


def required_per_gb(steps: dict[str, float]) -> float:
    """CPU s/GB the protocol requires per byte over both sides: the cipher once each way, the
    CRC and the block digest once on each side."""
    return (
        steps["AES-256-GCM encrypt_into"]
        + steps["AES-256-GCM decrypt_into"]
        + 2 * steps["CRC-32 (ISA-L)"]
        + 2 * steps["XXH3-128 block digest"]
    )


def socat_run(src: Path, dest: Path, port: int) -> tuple[float, float, float]:
    """Wall seconds, sender CPU s, receiver CPU s of one socat transfer."""
    dst = dest / src.name
    recv = subprocess.Popen(
        ["socat", "-u", "-b", "1048576", f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1",
         f"OPEN:{dst},creat,trunc"],
    )  # fmt: skip
    time.sleep(0.5)
    free_others(dest)
    t0 = time.perf_counter()
    send = subprocess.Popen(
        ["socat", "-u", "-b", "1048576", f"OPEN:{src}", f"TCP:127.0.0.1:{port}"]
    )
    usage = {}
    for p in (send, recv):
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        usage[p.pid] = ru.ru_utime + ru.ru_stime
    wall = time.perf_counter() - t0
    if send.returncode or recv.returncode or not same_content(src, dst):
        raise RuntimeError("socat run failed")
    return wall, usage[send.pid], usage[recv.pid]


def stx_run(src: Path, dest: Path, key: Path, port: int) -> tuple[float, float, float]:
    """Wall seconds (sender start -> sender exit), sender and receiver tree CPU s."""
    py = sys.executable
    log = dest.parent / f"recv-{port}.err"
    with log.open("wb") as err:
        recv = subprocess.Popen(
            [py, "-m", "stxpar.cli", "recv", "--listen", f"127.0.0.1:{port}", "--psk-file",
             str(key), "--dest", str(dest), "--once"],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    wait_for_text(log, "listening on", recv, 30)  # its workers are up: as perf/bench.py waits
    argv = [py, "-m", "stxpar.cli", "send", "--psk-file", str(key), "-q", str(src),
            f"127.0.0.1:{port}"]  # fmt: skip
    free_others(dest)
    m = measure(lambda: subprocess.Popen(argv, start_new_session=True), receiver=recv)
    if m.rc_send or not same_content(src, dest / src.name):
        raise RuntimeError("stx run failed")
    return m.wall, m.cpu_send, m.cpu_recv or 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1G", help="file size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not shutil.which("socat"):
        print("floor.py needs socat (apt-get install socat)", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    gb = size / 1e9
    work = Path(tempfile.mkdtemp(prefix="stx-floor-", dir="/dev/shm"))
    try:
        src = work / "src.bin"
        make_random_file(src, size)
        key = work / "key"
        subprocess.run([sys.executable, "-m", "stxpar.cli", "keygen", "-o", str(key)],
                       check=True, capture_output=True)  # fmt: skip
        socat: list[tuple[float, float, float]] = []
        stx: list[tuple[float, float, float]] = []
        port = 47700
        for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
            for tool in ("socat", "stx") if r % 2 else ("stx", "socat"):
                port += 1
                d = work / f"d{port}"
                d.mkdir()
                if tool == "socat":
                    res = socat_run(src, d, port)
                else:
                    res = stx_run(src, d, key, port)
                if r:
                    (socat if tool == "socat" else stx).append(res)
                print(f"round {r} {tool}: {res[0]:.2f} s, CPU {res[1]:.2f} + {res[2]:.2f} s",
                      file=sys.stderr)  # fmt: skip
        for old in work.glob("d*"):
            shutil.rmtree(old)
        steps = step_costs(args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ncpu = len(os.sched_getaffinity(0))
    s_wall = statistics.median(w for w, _, _ in socat) / gb
    s_cpu = statistics.median(a + b for _, a, b in socat) / gb
    x_wall = statistics.median(w for w, _, _ in stx) / gb
    x_cpu = statistics.median(a + b for _, a, b in stx) / gb
    required = required_per_gb(steps)
    floor_cpu = s_cpu + required
    s_busy = s_cpu / (ncpu * s_wall)  # how busy socat keeps the cores
    print(f"# The floor on this machine ({ncpu} CPUs, {args.size}, {args.rounds} rounds)\n")
    print("| step (one core, 4 MiB blocks) | CPU s/GB |\n| --- | ---: |")
    for k, v in steps.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| required on top of the copies (AES each way, CRC x2, digest x2) | {required:.3f} |")
    print()
    print("| | wall s/GB | CPU s/GB (both sides) | cores busy |\n| --- | ---: | ---: | ---: |")
    print(f"| socat -b 1M | {s_wall:.3f} | {s_cpu:.3f} | {s_busy:.0%} |")
    print(f"| stxpar defaults | {x_wall:.3f} | {x_cpu:.3f} | {x_cpu / (ncpu * x_wall):.0%} |")
    print(f"| floor: socat's CPU + required steps | | {floor_cpu:.3f} | |")
    print()
    print(f"- measured stxpar / socat throughput: {s_wall / x_wall:.2f}")
    print(f"- ceiling if stxpar kept the cores as busy as socat: {s_cpu / floor_cpu:.2f}")
    print(
        f"- ceiling if it kept every core busy from the first instant: "
        f"{s_wall / (floor_cpu / ncpu):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
