"""Sweep stxpar over worker counts and block sizes on loopback; print medians.

    python perf/sweep.py --size 1G --workers 1,2,4,8 --block-sizes 1M,4M,16M --rounds 3

Each configuration runs ``--rounds`` times in alternating order (round-robin over the grid),
source and destination on /dev/shm, one in-process receiver with as many workers as the sender.
Prints a Markdown table of median and min-max MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

import stxpar
from stxpar.config import parse_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1G")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--block-sizes", default="4M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    grid = [
        (int(w), parse_size(b))
        for w in args.workers.split(",")
        for b in args.block_sizes.split(",")
    ]
    root = tempfile.mkdtemp(prefix="stx-sweep-", dir=args.dir)
    results: dict[str, list[float]] = {}
    try:
        src = os.path.join(root, "src.bin")
        with open(src, "wb") as f:
            for _ in range(0, size, 16 << 20):
                f.write(os.urandom(min(16 << 20, size - f.tell())))
        key = stxpar.generate_key()
        for r in range(args.rounds):
            for workers, bs in grid if r % 2 == 0 else list(reversed(grid)):
                dst = tempfile.mkdtemp(dir=root)
                with stxpar.Receiver(dst, psk=key, workers=workers) as rx:
                    host, port = rx.address
                    res = stxpar.send(src, host, port, psk=key, workers=workers, block_size=bs)
                shutil.rmtree(dst)
                results.setdefault(f"{workers}x{bs >> 10}K", []).append(res.mb_per_s)
                print(
                    f"round {r}: workers={workers} block={bs >> 10}K {res.mb_per_s:.0f} MB/s",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.size} file, /dev/shm -> /dev/shm, loopback, {args.rounds} rounds\n")
    print("| workers | block | median MB/s | min-max |")
    print("| --- | --- | --- | --- |")
    for workers, bs in grid:
        v = results[f"{workers}x{bs >> 10}K"]
        print(
            f"| {workers} | {bs >> 10} KiB | {statistics.median(v):.0f} | {min(v):.0f}-{max(v):.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
