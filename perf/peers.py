"""The peers ``perf/bench.py`` compares stxpar against: tools, installing them, a loopback sshd.

The sshd is a private one: started by the harness on 127.0.0.1 on a free port, with a
throwaway host key and a throwaway user key (authorized for the current user) in a temporary
directory, and stopped at the end. It never touches the system's sshd configuration or keys.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
CIPHER = "aes256-gcm@openssh.com"
#: peer -> (programs it needs, Debian packages that bring them)
NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "scp": ((SSHD, "ssh", "scp", "ssh-keygen"), ("openssh-server", "openssh-client")),
    "ssh": ((SSHD, "ssh", "ssh-keygen"), ("openssh-server", "openssh-client")),
    "socat": (("socat",), ("socat",)),
    "cp": (("cp",), ()),
}


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _have(prog: str) -> bool:
    return os.access(prog, os.X_OK) if prog.startswith("/") else shutil.which(prog) is not None


def missing(peer: str) -> list[str]:
    return [p for p in NEEDS[peer][0] if not _have(p)]


def ensure_tools(peers: list[str], *, install: bool) -> dict[str, str]:
    """Install what the peers need (Debian packages, as root); returns {peer: why skipped}."""
    want = sorted({pkg for peer in peers if missing(peer) for pkg in NEEDS[peer][1]})
    if want and install:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            say(f"cannot install {' '.join(want)} (needs root and apt-get)")
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", *want]
            say("installing Debian packages for the peers: " + " ".join(cmd))
            ok = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0
            if not ok:
                say("apt-get install failed; running apt-get update and trying again")
                subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL)
                ok = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode == 0
            if not ok:
                say(f"could not install {' '.join(want)}")
    skipped = {}
    for peer in peers:
        gone = missing(peer)
        if gone:
            skipped[peer] = f"skipped: {', '.join(gone)} not available" + (
                "" if install else " (--no-install)"
            )
            say(f"{peer} {skipped[peer]}")
    return skipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait until ``text`` appears in the log file ``path``; the whole log then."""
    end = time.monotonic() + timeout
    name = path.name
    while True:
        try:
            data = path.read_text(errors="replace")
        except FileNotFoundError:
            data = ""
        if text in data:
            return data
        if proc.poll() is not None:
            raise RuntimeError(f"{name}: exited ({proc.returncode}): {data.strip()[-500:]}")
        if time.monotonic() > end:
            raise RuntimeError(f"{name}: not ready after {timeout:.0f} s: {data.strip()[-500:]}")
        time.sleep(0.01)


def version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def installed_env(cache_dir: Path) -> dict[str, str]:
    """The environment for timed stx processes: Python's bytecode cached (in ``cache_dir``),
    as ``pip install`` leaves it. Where PYTHONDONTWRITEBYTECODE is set (as on our CI
    machines) an editable checkout would otherwise compile every module of every stx process
    on every run, about 0.07 s a process that an installed stxpar never pays."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    return env


class LoopbackSshd:
    """A private ``sshd -D -e`` on 127.0.0.1 and the ssh/scp options that reach it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stx-bench-ssh-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = getpass.getuser()
        self.log = self.dir / "sshd.log"

    def start(self) -> LoopbackSshd:
        d = self.dir
        for name in ("host_ed25519", "user_ed25519"):
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "stx-bench",
                    "-f",
                    str(d / name),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        shutil.copy(d / "user_ed25519.pub", d / "authorized_keys")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        self.port = free_port()
        (d / "sshd_config").write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {d / 'host_ed25519'}\n"
            f"PidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin yes\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "UseDNS no\n"
            "MaxStartups 64:30:128\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel ERROR\n"
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-f", str(d / "sshd_config"), "-D", "-e"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        end = time.monotonic() + 15
        while True:
            probe = subprocess.run(
                self.ssh_argv("true"), stdin=subprocess.DEVNULL, capture_output=True
            )
            if probe.returncode == 0:
                return self
            if self.proc.poll() is not None or time.monotonic() > end:
                err = probe.stderr.decode(errors="replace").strip()
                logged = self.log.read_text(errors="replace").strip()
                self.stop()
                raise RuntimeError(f"loopback sshd did not come up: {err[-300:]} {logged[-300:]}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _opts(self) -> list[str]:
        return [
            "-F", "/dev/null",
            "-i", str(self.dir / "user_ed25519"),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "Compression=no",
            "-c", CIPHER,
        ]  # fmt: skip

    def ssh_argv(self, command: str) -> list[str]:
        return [
            "ssh",
            *self._opts(),
            "-T",
            "-x",
            "-a",
            "-p",
            str(self.port),
            f"{self.user}@127.0.0.1",
            command,
        ]

    def scp_argv(self, src: str, dst: str) -> list[str]:
        return [
            "scp",
            "-O",
            "-q",
            *self._opts(),
            "-P",
            str(self.port),
            src,
            f"{self.user}@127.0.0.1:{dst}",
        ]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
