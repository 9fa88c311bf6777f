"""ZeroMQ plumbing between a coordinator and its workers (local IPC), and how workers start.

The messages themselves are ``stxpar.messages`` (typed, versioned); endpoints are ``ipc://`` sockets inside a private
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

import gc
import os
import select
import shutil
import signal
import stat as stat_module
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import zmq

from .forking import can_fork as can_fork

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


def freeze_heap() -> None:
    """Put every object alive now out of the cyclic garbage collector's way (``gc.freeze``):
    the imports' modules, classes and functions (and, for ``stx send``, the walked tree) live
    as long as the process, and every full collection would walk them all again; a
    10,000-file tree's transfer spent about 40 ms of its 0.9 s in such collections. Later
    objects are collected as usual. Called by the CLI and every worker, not by the library
    API (an embedding program's heap is its own)."""
    gc.freeze()


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


#: The prefixes of the private directories of coordinators (``private_dir``).
DIR_PREFIXES = ("stx-recv-", "stx-send-")


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (field 22 of ``/proc/PID/stat``, in clock ticks since
    boot): with the pid, it names one process, not whichever one reuses the pid later. None
    if there is no such process (or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(b")") + 2 :].split()[19])  # fields 3.. after "(comm) "
    except (ValueError, IndexError):
        return None


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 if unknown): a pid means something only
    inside its namespace, and two containers may share one temporary directory."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def private_dir(prefix: str) -> str:
    """A new 0700 directory in the temporary directory, named after its owner
    (``PREFIX<pid>-<start time>-<pid namespace>-<random>``) so that ``remove_stale_dirs`` can
    tell one whose process was killed."""
    pid = os.getpid()
    owner = f"{pid}-{_start_time(pid) or 0}-{_pid_namespace()}"
    path = tempfile.mkdtemp(prefix=f"{prefix}{owner}-")
    os.chmod(path, 0o700)
    return path


def _owner(name: str) -> tuple[int, int, int] | None:
    """(pid, start time, pid namespace) from a ``private_dir`` name, or None."""
    prefix = next((p for p in DIR_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return None
    parts = name[len(prefix) :].split("-", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    pid, started, namespace = int(parts[0]), int(parts[1]), int(parts[2])
    return None if started == 0 or namespace == 0 else (pid, started, namespace)


def owner_known(name: str) -> bool:
    """Whether a ``private_dir`` name says which process made it."""
    return _owner(name) is not None


def remove_stale_dirs(tmp: str | None = None) -> list[str]:
    """Remove the private directories (``stx-recv-*``, ``stx-send-*``) of processes that are
    gone (a SIGKILLed coordinator cannot remove its own): only directories, never a symbolic
    link, only ours (owned by this effective uid), only when the pid and start time in the name
    no longer belong to a running process. A name without them (an older version's) is left
    alone, and so is one made in another pid namespace. Returns what was removed."""
    base = tmp if tmp is not None else tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        owner = _owner(name)
        if owner is None or owner[2] != _pid_namespace():
            continue  # its owner cannot be told apart from another process
        pid, started, _ = owner
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat_module.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        now = _start_time(pid)
        if now == started or pid == os.getpid():
            continue  # its owner is alive
        shutil.rmtree(path, ignore_errors=True)  # does not follow symbolic links inside
        removed.append(path)
    return removed


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def configure(sock: zmq.Socket, *, linger_ms: int = 0) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_IPC_MESSAGE)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    return sock


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
    # The stop signals wait until the child has replaced its parent's handlers: the CLI's
    # SIGTERM handler raises, and run in the child during the interpreter's own after-fork
    # clean-up it printed "Exception ignored in _after_fork" into the user's terminal (a
    # worker stopped at once, e.g. when the key file then turned out unusable).
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        return ForkedWorker(pid)
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # main() sets its own handlers
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until then, a SIGTERM just ends it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
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
