"""ZeroMQ plumbing between a coordinator and its workers (local IPC).

Messages are msgpack lists ``[verb, ...]``. Endpoints are ``ipc://`` sockets inside a private
0700 directory, so stream secrets handed to workers never touch the network; every socket has a
message size cap and linger 0. One context per process, created after the process started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import msgpack
import zmq

#: Largest IPC message (a list of block digests for a big range stays well below this).
MAX_IPC_MESSAGE = 16 << 20


def harden_process() -> None:
    """Keep key material out of core files and away from same-user debuggers: no core dumps
    (RLIMIT_CORE 0) and, on Linux, PR_SET_DUMPABLE 0. Called by the CLI and every worker, not
    by the library API (an embedding program decides that for itself)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
        except (OSError, AttributeError):
            pass


def private_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o700)
    return path


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def configure(sock: zmq.Socket, *, linger_ms: int = 0) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_IPC_MESSAGE)
    return sock


def pack(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def unpack(data: bytes) -> list[Any]:
    obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(obj, list) or not obj:
        raise ValueError("bad IPC message")
    return obj


def spawn_worker(
    module: str, *args: str, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    """Start ``python -P -m module args`` with no secrets in argv or the environment.

    ``-P``: the worker imports the installed stxpar, never a ``stxpar/`` folder that happens to
    be in the current directory (a source checkout keeps ``workers/`` outside it).
    """
    env = dict(os.environ)
    env.pop("STX_PSK_FILE", None)
    return subprocess.Popen(
        [sys.executable, "-P", "-m", module, *args],
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
        env=env,
        close_fds=True,
    )
