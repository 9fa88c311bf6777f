"""A network lab on one machine: network namespaces as hosts on a private bridge.

    with Lab() as lab:
        recv = lab.add_host("recv")
        helper = lab.add_host("helper", rate="400mbit")
        server = recv.popen([sys.executable, "-m", "http.server", "8000"])
        helper.run(["curl", f"http://{recv.addr}:8000/"], timeout=10)
        helper.kill_all()
        helper.link_down()

Theory of operation. A lab owns one bridge in the root namespace and one namespace per host.
Each host gets a veth pair: one end (``host.iface``) inside its namespace with the host's
address, the other end (``host.peer``) a port of the bridge. The root namespace gets no
address (IPv6 is switched off on the bridge and its ports, so not even a link-local one), so
nothing outside the lab's namespaces can reach the lab, and the lab cannot reach out.

Shaping uses tbf, the one rate-limiting qdisc that is sure to be here (no netem):

* ``rate=`` shapes the host's egress (tbf on ``host.iface`` inside the namespace): its uplink;
* ``rate_in=`` shapes the host's ingress: tbf on the bridge-side peer's egress, which is what
  the host receives. A receiving helper needs it, since shaping only senders' uplinks leaves a
  downlink that takes everything they send.

Every name the lab makes starts with a tag that carries the owning process id, so that
:func:`cleanup_stale` can remove what a crashed run left behind: ``stxt`` + the pid in five
base-36 digits + a per-process lab number in two; interfaces add ``b`` (bridge) or ``v<host>``
(veth in the namespace) and ``v<host>p`` (bridge side), at most 15 characters; namespaces are
``<tag>-<host name>``.

Cleanup always happens: on ``__exit__`` (also when the body raised), in :meth:`Lab.close`, and
at interpreter exit for labs never closed. Closing SIGKILLs every process inside the lab's
namespaces, then deletes the veths, the namespaces and the bridge.

Needs root, ``ip`` (iproute2) and ``tc``; :func:`available` says why not where it cannot run.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

#: Every name a lab makes starts with this.
PREFIX = "stxt"
_PID_DIGITS = 5  # base 36: up to 60466175, above Linux's pid_max (4194304)
_LAB_DIGITS = 2
_HOST_DIGITS = 2
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_HOST_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
#: How long one ``ip``/``tc`` call may take.
_CMD_TIMEOUT = 20.0

_counter = itertools.count()
_open_labs: set[Lab] = set()
_open_lock = threading.Lock()


class LabError(RuntimeError):
    """An ``ip``/``tc`` command failed while building or changing a lab."""


def _b36(n: int, width: int) -> str:
    digits = []
    for _ in range(width):
        n, d = divmod(n, 36)
        digits.append(_ALPHABET[d])
    if n:
        raise ValueError(f"{n} does not fit in {width} base-36 digits")
    return "".join(reversed(digits))


def _sh(*argv: str, check: bool = True, timeout: float = _CMD_TIMEOUT) -> str:
    """Run one command, return its stdout; raise :class:`LabError` on failure when ``check``."""
    try:
        p = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise LabError(f"{' '.join(argv)}: {e}") from e
        return ""
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def _no_ipv6(iface: str) -> None:
    """Switch IPv6 off on a root-namespace interface: no address at all, not even fe80::."""
    conf = f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"
    with contextlib.suppress(FileNotFoundError):  # no IPv6 in this kernel
        Path(conf).write_text("1\n")


def _tbf(dev: str, rate: str, burst: str, latency: str, netns: str | None) -> None:
    argv = ["tc", "qdisc", "add", "dev", dev, "root", "tbf"]
    argv += ["rate", rate, "burst", burst, "latency", latency]
    _sh(*(["ip", "netns", "exec", netns, *argv] if netns else argv))


def _kill_netns_pids(netns: str, *, rounds: int = 50) -> None:
    """SIGKILL every process in a namespace until none is left (new ones may be forked meanwhile)."""
    for _ in range(rounds):
        pids = [int(p) for p in _sh("ip", "netns", "pids", netns, check=False).split()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


@functools.cache
def available() -> str | None:
    """None when labs can be built here, else why not (one line, for ``pytest.skip``).

    Tries, inside a throwaway namespace: a namespace, a veth pair, a bridge and a tbf qdisc.
    """
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "sysctl"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    ns = f"{PREFIX}{_b36(os.getpid(), _PID_DIGITS)}zz-probe"
    try:
        _sh("ip", "netns", "add", ns)
    except LabError as e:
        return f"cannot make a network namespace: {e}"
    try:
        steps = [
            ("veth", ["ip", "-n", ns, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb"]),
            ("bridge", ["ip", "-n", ns, "link", "add", "name", "pbr", "type", "bridge"]),
            ("link up", ["ip", "-n", ns, "link", "set", "pa", "up"]),
            ("tbf", ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "pa", "root", "tbf"]
             + ["rate", "10mbit", "burst", "64kb", "latency", "50ms"]),
        ]  # fmt: skip
        for what, argv in steps:
            try:
                _sh(*argv)
            except LabError as e:
                return f"{what} not usable: {e}"
        return None
    finally:
        _sh("ip", "netns", "del", ns, check=False)


@dataclass(eq=False)
class Host:
    """One host of a lab: a network namespace with one interface on the lab's bridge."""

    lab: Lab = field(repr=False)
    #: the name given to :meth:`Lab.add_host`
    name: str
    #: the network namespace (``ip netns`` name)
    ns: str
    #: the host's IPv4 address on the lab's /24
    addr: str
    #: the interface inside the namespace that carries ``addr``
    iface: str
    #: its veth peer, a port of the bridge in the root namespace
    peer: str
    #: tbf rates: egress (uplink) and ingress (downlink), None when not shaped
    rate: str | None = None
    rate_in: str | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command line that runs it inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace (``subprocess.Popen`` keywords); tracked, and
        killed when the lab closes or :meth:`kill_all` runs."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.cmd(argv), **kw)
        self.procs.append(p)
        return p

    def run(
        self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the namespace to its end (``subprocess.run`` semantics; killed
        when ``timeout`` passes, which raises ``subprocess.TimeoutExpired``)."""
        if kw.pop("capture_output", False):
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        data = kw.pop("input", None)
        if data is not None:
            kw["stdin"] = subprocess.PIPE
        p = self.popen(argv, **kw)
        try:
            out, err = p.communicate(data, timeout=timeout)
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.procs.remove(p)
        done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def pids(self) -> list[int]:
        """Ids of every process now inside the namespace (whoever started it)."""
        return [int(p) for p in _sh("ip", "netns", "pids", self.ns, check=False).split()]

    def kill_all(self) -> None:
        """SIGKILL every process inside the namespace (``ip netns pids``), and reap ours."""
        _kill_netns_pids(self.ns)
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs = [p for p in self.procs if p.returncode is None]

    def link_down(self) -> None:
        """Take the host's link down (its interface: it cannot send nor receive)."""
        _sh("ip", "-n", self.ns, "link", "set", self.iface, "down")

    def link_up(self) -> None:
        """Bring the host's link back up (address and route return with it)."""
        _sh("ip", "-n", self.ns, "link", "set", self.iface, "up")

    def qdisc_stats(self, *, ingress: bool = False) -> str:
        """``tc -s qdisc show`` of the egress interface, or of the bridge-side peer (ingress)."""
        if ingress:
            return _sh("tc", "-s", "qdisc", "show", "dev", self.peer)
        return _sh("ip", "netns", "exec", self.ns, "tc", "-s", "qdisc", "show", "dev", self.iface)


class Lab:
    """A bridge and the hosts on it; a context manager that always removes everything it made.

    ``subnet`` is the /24's first three octets; by default it is derived from the process id
    and the lab's number (the namespaces keep labs apart anyway: no address lives outside
    them, so two labs on one subnet would not see each other either).
    """

    def __init__(self, *, subnet: str | None = None, prefix: str = PREFIX) -> None:
        if available() is not None:
            raise LabError(f"network lab not available: {available()}")
        pid = os.getpid()
        n = next(_counter) % 36**_LAB_DIGITS
        self.tag = f"{prefix}{_b36(pid, _PID_DIGITS)}{_b36(n, _LAB_DIGITS)}"
        if len(self.tag) + 2 + _HOST_DIGITS > 15:
            raise ValueError(f"prefix {prefix!r} too long for interface names")
        if subnet is None:
            k = (pid * 37 + n) % (64 * 256)
            subnet = f"10.{160 + k // 256}.{k % 256}"
        self.subnet = subnet
        self.bridge = f"{self.tag}b"
        self.hosts: dict[str, Host] = {}
        self._pid = pid
        self._closed = False
        with _open_lock:
            _open_labs.add(self)
        try:
            _sh("ip", "link", "add", "name", self.bridge, "type", "bridge", "stp_state", "0")
            _no_ipv6(self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def add_host(
        self,
        name: str,
        *,
        rate: str | None = None,
        rate_in: str | None = None,
        burst: str = "256kb",
        latency: str = "50ms",
    ) -> Host:
        """A new host ``name`` (``[a-z0-9][a-z0-9_-]*``) with the next address of the lab.

        ``rate`` (tc syntax: ``"400mbit"``) shapes its uplink, ``rate_in`` its downlink, both with
        tbf of the given ``burst`` and ``latency``; None leaves that direction unshaped.
        """
        if self._closed:
            raise LabError("lab is closed")
        if not _HOST_NAME.fullmatch(name) or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r}")
        i = len(self.hosts)
        if i >= 250:
            raise ValueError("at most 250 hosts per lab")
        idx = _b36(i, _HOST_DIGITS)
        host = Host(
            lab=self,
            name=name,
            ns=f"{self.tag}-{name}",
            addr=f"{self.subnet}.{i + 1}",
            iface=f"{self.tag}v{idx}",
            peer=f"{self.tag}v{idx}p",
            rate=rate,
            rate_in=rate_in,
        )
        self.hosts[name] = host  # registered first: close() removes what exists of it
        ns, iface, peer = host.ns, host.iface, host.peer
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", "name", peer, "type", "veth", "peer", "name", iface, "netns", ns)
        _no_ipv6(peer)
        _sh("ip", "link", "set", peer, "master", self.bridge)
        _sh("ip", "link", "set", peer, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{host.addr}/24", "dev", iface)
        _sh("ip", "-n", ns, "link", "set", iface, "up")
        if rate is not None:
            _tbf(iface, rate, burst, latency, ns)
        if rate_in is not None:
            _tbf(peer, rate_in, burst, latency, None)
        return host

    def close(self) -> None:
        """Kill every process in the lab's namespaces, delete veths, namespaces and the bridge.
        Safe to call again; runs at interpreter exit for labs never closed."""
        if self._closed:
            return
        self._closed = True
        try:
            if os.getpid() != self._pid:
                return  # a forked child: the lab belongs to its parent
            for host in self.hosts.values():
                host.kill_all()
            for host in self.hosts.values():
                _sh("ip", "link", "del", host.peer, check=False)  # takes the inside end too
                _sh("ip", "netns", "del", host.ns, check=False)
            _sh("ip", "link", "del", self.bridge, check=False)
        finally:
            with _open_lock:
                _open_labs.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed


@atexit.register
def _close_open_labs() -> None:
    with _open_lock:
        labs = list(_open_labs)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lab_names(prefix: str = PREFIX) -> tuple[list[str], list[str]]:
    """The namespaces and the root-namespace links whose name starts with ``prefix``."""
    names = [line.split()[0] for line in _sh("ip", "netns", "list", check=False).splitlines()]
    links = []
    for line in _sh("ip", "-o", "link", "show", check=False).splitlines():
        parts = line.split(": ", 2)
        if len(parts) >= 2:
            links.append(parts[1].split("@", 1)[0])
    return (
        [n for n in names if n.startswith(prefix)],
        [n for n in links if n.startswith(prefix)],
    )


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces and links of labs whose owning process is gone (a crashed run, or one
    killed by a signal before its atexit ran); return what was removed. Live labs are left."""
    pat = re.compile(re.escape(prefix) + rf"([0-9a-z]{{{_PID_DIGITS}}})[0-9a-z]{{{_LAB_DIGITS}}}")

    def stale(name: str) -> bool:
        m = pat.match(name)
        return m is not None and not _pid_alive(int(m.group(1), 36))

    removed = []
    for ns in filter(stale, lab_names(prefix)[0]):
        _kill_netns_pids(ns)
        _sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    # veth peers first (each takes its inside end along), then bridges
    for link in sorted(filter(stale, lab_names(prefix)[1]), key=lambda n: n.endswith("b")):
        _sh("ip", "link", "del", link, check=False)
        removed.append(link)
    return removed


try:
    import pytest
except ImportError:  # perf scripts need no pytest
    pass
else:

    @pytest.fixture(name="netlab")
    def netlab_fixture() -> Iterator[Lab]:
        """``netlab``: a fresh :class:`Lab`, always closed; skips with the reason where labs
        cannot be built. Test modules use it with ``from netlab import netlab_fixture  # noqa:
        F401`` (the tests directory is on ``sys.path`` in the integration tests)."""
        reason = available()
        if reason is not None:
            pytest.skip(reason)
        cleanup_stale()
        with Lab() as lab:
            yield lab
