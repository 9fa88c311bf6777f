"""ZeroMQ plumbing between a coordinator and its workers (local IPC), and how workers start.

Messages are msgpack lists ``[verb, ...]``. Endpoints are ``ipc://`` sockets inside a private
0700 directory, so stream secrets handed to workers never touch the network; every socket has a
message size cap and linger 0. One context per process, created after the process started.

A worker starts in one of two ways. ``spawn_worker`` runs a new interpreter
(``python -P -m stxpar.workers.X``): always safe, about 0.1 s before it is ready (the
interpreter and its imports). ``fork_worker`` forks the calling process, which must have
nothing to hide and nothing running: the ``stx send`` CLI forks its first workers before it
reads the key and before it makes a ZeroMQ context (one thread, no secret), and they are ready
at once. Either way the worker names itself (``stx-send-worker``, ``stx-recv-worker``: what
``ps -e``, ``top`` and psutil's ``name()`` show).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

#: Largest IPC message (a list of block digests for a big range stays well below this).
MAX_IPC_MESSAGE = 16 << 20
#: A worker's ZeroMQ sockets retry a connect this often (ms): a forked worker may try before its
#: coordinator has bound the endpoint (ZeroMQ's default, 100 ms, would be its whole head start).
RECONNECT_IVL_MS = 5
#: Process names (``/proc/PID/comm``, at most 15 bytes) of the two kinds of worker.
SENDER_WORKER_NAME = "stx-send-worker"
RECEIVER_WORKER_NAME = "stx-recv-worker"


def harden_process() -> None:
    """Keep key material out of core files and away from same-user debuggers: no core dumps
    (RLIMIT_CORE 0) and, on Linux, PR_SET_DUMPABLE 0. Called by the CLI and every worker, not
    by the library API (an embedding program decides that for itself)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    _prctl(4, 0)  # PR_SET_DUMPABLE


def name_process(name: str) -> None:
    """Set this process's name as ``ps``/``top`` show it (Linux ``PR_SET_NAME``; a no-op
    elsewhere). A forked worker's command line is still its coordinator's."""
    _prctl(15, name.encode()[:15])  # PR_SET_NAME


def _prctl(option: int, arg: int | bytes) -> None:
    """Linux ``prctl(option, arg)``; nothing elsewhere or where it cannot be called."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
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
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
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


def can_fork() -> bool:
    """Whether ``fork_worker`` may fork this process now: Linux, and one thread (a fork while
    another thread holds a lock leaves the child deadlocked; a ZeroMQ context has threads)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class ForkedWorker:
    """A worker forked by ``fork_worker``, with the parts of ``subprocess.Popen`` that the
    coordinators use: ``pid``, ``returncode``, ``poll``, ``wait``, ``terminate``, ``kill``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            while self.poll() is None:
                self._sleep(None)
        else:
            end = time.monotonic() + timeout
            while self.poll() is None:
                left = end - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
                self._sleep(left)
        assert self.returncode is not None
        return self.returncode

    def _sleep(self, timeout: float | None) -> None:
        """Until the child exits (its pidfd turns readable) or ``timeout`` s pass."""
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            time.sleep(0.005 if timeout is None else min(0.005, timeout))
            return
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_worker(main: Callable[[list[str]], int], *args: str) -> ForkedWorker:
    """Fork this process and run ``main(list(args))`` in the child, which then exits with its
    result and never returns here. Only where ``can_fork()`` (the caller checks), and only
    before this process holds anything a worker must not see."""
    sys.stdout.flush()  # else the child would hold a copy of unwritten output
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return ForkedWorker(pid)
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # main() sets its own handlers
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # main() reports its own failures; nothing may unwind into the CLI
        code = 1
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)
