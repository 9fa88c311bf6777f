"""``stx demo``: the whole product on one machine, with nothing to set up."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

from .errors import IntegrityError, UsageError
from .progress import Progress, _human
from .psk import generate
from .receiver import Receiver
from .sender import send

CHUNK = 16 << 20


def _scratch_dir(size: int, directory: str | None) -> str:
    if directory:
        if not os.path.isdir(directory):
            raise UsageError(f"scratch directory {directory} does not exist")
        base = directory
    elif os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size + (256 << 20):
        base = "/dev/shm"
    else:
        base = tempfile.gettempdir()
    if shutil.disk_usage(base).free < 2 * size + (64 << 20):
        raise UsageError(
            f"not enough space in {base} for a {_human(size)} demo (needs twice the size)"
        )
    return tempfile.mkdtemp(prefix="stx-demo-", dir=base)


def _make_file(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def run_demo(
    *,
    size: int,
    workers: int | None,
    block_size: int | None,
    directory: str | None,
    as_json: bool,
    quiet: bool,
) -> int:
    root = _scratch_dir(size, directory)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    try:
        src_dir, dst_dir = os.path.join(root, "src"), os.path.join(root, "dst")
        os.mkdir(src_dir)
        os.mkdir(dst_dir, 0o700)  # a private destination (Receiver refuses a shared one)
        src = os.path.join(src_dir, "demo.bin")
        say(f"stx demo: making a {_human(size)} random test file in {root}")
        want = _make_file(src, size)
        key = generate()  # in memory only, never written anywhere
        with Receiver(dst_dir, psk=key, host="127.0.0.1", port=0, workers=workers) as receiver:
            host, port = receiver.address
            say(f"stx demo: receiver listening on {host}:{port} ({receiver.workers} workers)")
            progress = None if quiet or not sys.stderr.isatty() else Progress(sys.stderr, "sending")
            try:
                result = send(
                    src,
                    host,
                    port,
                    psk=key,
                    workers=workers,
                    block_size=block_size,
                    progress=progress,
                )
            finally:
                if progress is not None:
                    progress.close()
        started = time.monotonic()
        got = _sha256(os.path.join(dst_dir, "demo.bin"))
        if got != want:
            raise IntegrityError("demo: the received file differs from the source (sha256)")
        summary = result.as_json()
        summary["sha256"] = got
        summary["verify_seconds"] = round(time.monotonic() - started, 3)
        say(
            f"stx demo: sent {_human(result.bytes)} in {result.seconds:.2f} s = {result.mb_per_s:.0f} MB/s "
            f"over {result.workers} encrypted stream{'' if result.workers == 1 else 's'} ({_human(result.block_size)} blocks); "
            f"sha256 of source and copy match: {got[:16]}..."
        )
        if as_json:
            sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
