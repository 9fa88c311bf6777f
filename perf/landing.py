"""How fast can N processes land blocks into one fresh file? (the receiver's last step)

    python perf/landing.py --size 2G --procs 1,2,4,8,16 --modes flock,pwrite,mmap --rounds 3

Every receiver worker of a transfer writes its verified blocks into the same partial file.
This measures that step alone, without network or crypto: N forked processes each write the
blocks ``i`` with ``i % N == rank`` (4 MiB, from a buffer of random bytes) into one fresh file
made like the receiver makes it (``ftruncate`` on tmpfs), through the receiver's own
``Lander`` (``workers/receiver.py``), in three ways:

- ``flock``: ``pwrite`` under an exclusive ``flock`` (stxpar's landing for up to 3 streams);
- ``pwrite``: ``pwrite`` with no lock (writers meet on the inode's lock in the kernel);
- ``mmap``: copy into a shared mapping of the block's range populated with
  ``MADV_POPULATE_WRITE`` (page faults instead of the inode lock; every new page is zeroed;
  stxpar's landing for 4 streams or more).

Prints a Markdown table: median GB/s (10^9 bytes/s, wall time from a common start to the last
writer's exit) and CPU s/GB (all writers' user+sys), per mode and process count.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

from stxpar.workers.receiver import Lander

from stxpar.config import parse_size


def writer(path: str, mode: str, rank: int, procs: int, size: int, block: int, go: int) -> None:
    """Lands its blocks with the receiver's own ``Lander``, set up for ``mode``."""
    buf = memoryview(bytearray(os.urandom(block)))
    fd = os.open(path, os.O_RDWR if mode == "mmap" else os.O_WRONLY)  # a shared mapping reads too
    lander = Lander(fd, mapped=mode == "mmap")
    lander.locking = mode == "flock"
    os.read(go, 1)  # wait for the common start
    for i in range(rank, -(-size // block), procs):
        off = i * block
        lander.write(buf[: min(block, size - off)], off)
    if mode == "mmap" and lander.mapped_blocks == 0:
        raise RuntimeError("no block went in through a mapping")
    os.close(fd)


def one_run(root: str, mode: str, procs: int, size: int, block: int) -> tuple[float, float]:
    path = os.path.join(root, "land.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    os.close(fd)
    r, w = os.pipe()
    pids = []
    for rank in range(procs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(w)
                writer(path, mode, rank, procs, size, block, r)
            except BaseException as exc:
                print(f"landing: writer {rank}: {exc!r}", file=sys.stderr)
                code = 1
            os._exit(code)
        pids.append(pid)
    os.close(r)
    time.sleep(0.3)  # let every writer reach the start line
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    os.write(w, b"x" * procs)
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.close(w)
    os.unlink(path)
    if failed:
        raise SystemExit(f"landing: {failed} writer(s) failed in mode {mode}")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="2G", help="file size (default 2G)")
    ap.add_argument("--block", default="4M", help="block size (default 4M)")
    ap.add_argument("--procs", default="1,2,4", help="writer counts (default 1,2,4)")
    ap.add_argument("--modes", default="flock,pwrite,mmap")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args(argv)
    size, block = parse_size(args.size), parse_size(args.block)
    grid = [(m, int(p)) for p in args.procs.split(",") for m in args.modes.split(",")]
    root = tempfile.mkdtemp(prefix="stx-landing-", dir=args.dir)
    res: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for r in range(args.rounds):
            for mode, procs in grid if r % 2 == 0 else grid[::-1]:
                wall, cpu = one_run(root, mode, procs, size, block)
                res.setdefault((mode, procs), []).append((wall, cpu))
                print(
                    f"round {r + 1}: {mode} x{procs}: {size / wall / 1e9:.2f} GB/s,"
                    f" CPU {cpu / (size / 1e9):.2f} s/GB",
                    file=sys.stderr,
                )
    finally:
        for f in os.listdir(root):
            os.unlink(os.path.join(root, f))
        os.rmdir(root)
    print(f"\n{args.size} file in {args.dir}, {args.block} blocks, {args.rounds} rounds, medians\n")
    print(
        "| writers | "
        + " | ".join(f"{m} GB/s | {m} CPU s/GB" for m in args.modes.split(","))
        + " |"
    )
    print("| ---: |" + " ---: | ---: |" * len(args.modes.split(",")))
    for p in args.procs.split(","):
        cells = []
        for m in args.modes.split(","):
            runs = res[(m, int(p))]
            cells.append(f"{statistics.median(size / w / 1e9 for w, _ in runs):.2f}")
            cells.append(f"{statistics.median(c / (size / 1e9) for _, c in runs):.2f}")
        print(f"| {p} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
