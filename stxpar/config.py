"""Typed, validated configuration and results (no globals)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import keyschedule as ks
from .errors import UsageError
from .handshake import DEFAULT_WINDOW_MS
from .manifest import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES
from .netio import Backoff, parse_hostport
from .wire import MAX_BLOCK_SIZE, MAX_STREAMS, MIN_BLOCK_SIZE

#: Default block size; see docs/tuning.md for the sweep that chose it.
DEFAULT_BLOCK_SIZE = 4 << 20
#: Default time a transfer may go without any progress before it counts as stalled.
DEFAULT_STALL_TIMEOUT = 60.0
#: Default retries after the first attempt: with ``Backoff()``'s equal jitter the waits before
#: giving up add up to between ``Backoff().min_total(9)`` = 60.75 s and 121.5 s.
DEFAULT_MAX_RETRIES = 9
#: A receiver worker makes landed blocks durable (``fdatasync``) and acknowledges them at the
#: latest after this many bytes.
DEFAULT_SYNC_BYTES = 64 << 20
#: Data streams a receiver serves at once, over all its sessions: each is a thread in a worker
#: with a block-sized buffer or two.
DEFAULT_MAX_STREAMS = 256
#: Data streams one receiver worker process serves at once.
DEFAULT_MAX_WORKER_STREAMS = 128
#: A receiver worker not heard from (its heartbeat) for this many seconds is killed and
#: replaced.
WORKER_TIMEOUT = 5.0


def default_workers(*, peer_on_this_machine: bool = False) -> int:
    """One worker per CPU this process may run on, between 2 and 8 (see docs/tuning.md).

    ``sched_getaffinity`` counts the CPUs of a cpuset or ``taskset``, not all of the machine's.
    With ``peer_on_this_machine`` (a sender whose receiver listens on a loopback address) both
    sides run on these CPUs: half of them each, between 1 and 8. Measured with both sides on
    one machine: 1 worker beat 2 on 2 cores, 8 beat 4 and 16 on 16 cores (docs/tuning.md).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if peer_on_this_machine:
        return max(1, min(8, cpus // 2))
    return max(2, min(8, cpus))


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): the peer is this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_size(text: str) -> int:
    """``4M``, ``512K``, ``1G``, ``4096`` -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise UsageError(
            f"bad size {text!r}: expected a number with an optional K, M, G or T"
        ) from None
    if value < 0 or value != int(value):
        raise UsageError(f"bad size {text!r}")
    return int(value)


def check_workers(n: int | None) -> int:
    if n is None:
        return default_workers()
    if not isinstance(n, int) or not 1 <= n <= MAX_STREAMS:
        raise UsageError(f"--workers must be between 1 and {MAX_STREAMS} (got {n})")
    return n


def check_block_size(n: int | None) -> int:
    if n is None:
        return DEFAULT_BLOCK_SIZE
    if not MIN_BLOCK_SIZE <= n <= MAX_BLOCK_SIZE:
        raise UsageError(
            f"--block-size must be between {MIN_BLOCK_SIZE >> 10} KiB and {MAX_BLOCK_SIZE >> 20} MiB"
        )
    return n


def check_to(subdir: str) -> None:
    """UsageError unless ``subdir`` may be ``stx send --to``: a relative path with no empty,
    ``.`` or ``..`` component, no control character, no reserved ``.stx...`` name."""
    from .errors import ProtocolError
    from .manifest import check_subdir

    if subdir.startswith("/"):
        raise UsageError(
            f"--to {subdir!r}: an absolute path; give a directory relative to the receiver's --dest"
        )
    try:
        check_subdir(subdir)
    except ProtocolError as exc:
        why = str(exc).split(": ", 1)[-1]
        raise UsageError(f"--to {subdir!r}: {why}; give a relative directory") from None


@dataclass(frozen=True)
class SendOptions:
    """How a sender behaves. Every field has a safe default."""

    #: Worker processes, one TCP stream each (default: see ``default_workers``).
    workers: int | None = None
    #: Bytes per block: the unit of encryption, acknowledgement and resume.
    block_size: int | None = None
    #: Failed attempts in a row (connects, or sessions that made no progress) tolerated after
    #: the first before giving up (exit 4); progress resets the count. With the default
    #: ``backoff`` the waits between them add up to 61-122 s (``DEFAULT_MAX_RETRIES``), so a
    #: minute-long outage is ridden out even when every attempt fails at once.
    max_retries: int = DEFAULT_MAX_RETRIES
    #: Seconds for one TCP connect attempt.
    connect_timeout: float = 10.0
    #: Seconds the whole handshake may take.
    handshake_timeout: float = 30.0
    #: Seconds without any acknowledged progress before the transfer counts as stalled.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    #: Records / ciphertext bytes per stream key before ratcheting to a new epoch.
    rekey_records: int = ks.MAX_RECORDS_PER_KEY
    rekey_bytes: int = ks.MAX_BYTES_PER_KEY
    #: Give up (exit 4) when the whole transfer takes longer than this many seconds (0: never).
    deadline: float = 0.0
    #: Delays between connection attempts.
    backoff: Backoff = field(default_factory=Backoff)
    #: ``--to SUBDIR``: land in this relative directory of the receiver's destination (made
    #: as needed there); None: the destination itself.
    to: str | None = None
    #: ``--as NAME``: the one PATH arrives under this name instead of its own.
    as_name: str | None = None
    #: ``--limit-rate``: bytes a second for the whole transfer, over all its streams (local
    #: and helpers'), each stream paced by the kernel at its share; 0: no limit.
    limit_rate: int = 0
    #: ``HOST:PORT`` where this sender also listens for helpers (``stx worker --join``) whose
    #: worker processes join its data phase (docs/cluster.md); None: no cluster port.
    cluster: str | None = None
    #: Remote worker processes to wait for before the first data phase (0: do not wait).
    cluster_workers: int = 0
    #: Seconds to wait for them; the transfer goes on with what joined by then.
    cluster_wait: float = 30.0

    def resolved(self) -> SendOptions:
        if self.max_retries < 0:
            raise UsageError("--max-retries must be 0 or more")
        if self.limit_rate < 0:
            raise UsageError("--limit-rate must be 0 (no limit) or more")
        if self.to is not None:
            check_to(self.to)
        if self.as_name is not None:
            from .scan import check_top_name

            check_top_name(f"--as {self.as_name!r}", self.as_name)
            if not self.as_name or "/" in self.as_name or self.as_name in (".", ".."):
                raise UsageError(f"--as {self.as_name!r}: a name, not a path")
        if not 1 <= self.rekey_records <= ks.MAX_RECORDS_PER_KEY:
            raise UsageError("rekey_records out of range")
        if not 1 <= self.rekey_bytes <= ks.MAX_BYTES_PER_KEY:
            raise UsageError("rekey_bytes out of range")
        if self.deadline < 0 or self.stall_timeout <= 0:
            raise UsageError("--deadline and --stall-timeout must be positive")
        if self.cluster is not None:
            parse_hostport(self.cluster)  # UsageError for a bad address
        if self.cluster_workers < 0 or self.cluster_wait < 0:
            raise UsageError("--cluster-workers and --cluster-wait must be 0 or more")
        if self.cluster_workers and self.cluster is None:
            raise UsageError("--cluster-workers needs --cluster HOST:PORT")
        if self.workers == 0 and self.cluster is not None:
            workers = 0  # every worker on helper hosts
        elif self.workers == 0:
            raise UsageError("--workers 0 needs --cluster HOST:PORT (helpers do the sending)")
        else:
            workers = check_workers(self.workers)
        return replace(
            self,
            workers=workers,
            block_size=check_block_size(self.block_size),
        )


@dataclass
class TransferResult:
    """What one completed transfer did; ``as_json()`` is what ``--json`` prints."""

    file: str
    bytes: int
    seconds: float
    workers: int
    block_size: int
    blocks_total: int
    blocks_sent: int = 0
    blocks_resumed: int = 0
    retransmits: int = 0
    reconnects: int = 0
    digest: str = ""
    #: Bytes the receiver already held when this run started (not sent again).
    bytes_resumed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        """Rate of what this run moved (resumed bytes excluded)."""
        moved = self.bytes - self.bytes_resumed
        return moved / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["mb_per_s"] = round(self.mb_per_s, 1)
        d["seconds"] = round(self.seconds, 3)
        d.update(extra)
        return d


@dataclass(frozen=True)
class RecvOptions:
    """How a receiver behaves (``Receiver(dest, psk=..., options=...)``, ``stx recv``). Every
    field has a safe default; ``resolved()`` checks them all and fills in what is automatic."""

    #: Worker processes that land blocks (None: one per CPU, see ``default_workers``).
    workers: int | None = None
    #: Stop after the first completed transfer (``Receiver.wait()`` returns then).
    once: bool = False
    #: Refuse transfers sent with ``--to SUBDIR`` or ``--as NAME`` (``stx recv --no-subdirs``):
    #: everything lands directly in the destination under its sender's own name.
    no_subdirs: bool = False
    #: ``stx recv --limit-rate``: bytes a second taken in over every transfer and stream
    #: together (0: no limit).
    limit_rate: int = 0
    #: Seconds from accept until a connection must have authenticated, and then until its
    #: METADATA arrives.
    handshake_timeout: float = 10.0
    #: How far a sender's clock may be from this one's, in milliseconds (``stx recv
    #: --clock-window`` in seconds); a sender outside it fails with "clock skew".
    window_ms: int = DEFAULT_WINDOW_MS
    #: Handshakes started (INIT) per second from everyone, bursts of twice as many.
    max_handshakes_per_s: float = 50.0
    #: ... and from one source address (None: half of ``max_handshakes_per_s``, at least 2).
    max_handshakes_per_ip_per_s: float | None = None
    #: Connections that have not authenticated yet, in all: past it, the oldest idle one is
    #: evicted for a newcomer.
    max_pending: int = 256
    #: ... and per source address (an IPv6 /64 counts as one).
    max_pending_per_ip: int = 32
    #: Authenticated control connections (transfers) served at once; past it a sender is told
    #: "receiver busy" and retries.
    max_sessions: int = 64
    #: Descriptors kept free below RLIMIT_NOFILE (None: a quarter of the limit, at most 32,
    #: judged against the limit in force when it is checked).
    fd_reserve: int | None = None
    #: Data streams served at once over all sessions; past it a stream is refused with a
    #: retryable "receiver busy".
    max_streams: int = DEFAULT_MAX_STREAMS
    #: Data streams one worker serves at once.
    max_worker_streams: int = DEFAULT_MAX_WORKER_STREAMS
    #: Seconds a worker may go without a heartbeat before it is killed and replaced.
    worker_timeout: float = WORKER_TIMEOUT
    #: Seconds a session may go without a landed block and without a control frame before it
    #: is ended (its partial kept for a resume): a stopped sender must not hold the file's
    #: name forever.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    #: Accept a destination other users can write into (with a "warning" event); refused
    #: otherwise: such a user can plant, swap or delete files there.
    allow_shared_dest: bool = False
    #: Bytes a worker lands before it makes them durable and acknowledges them.
    sync_bytes: int = DEFAULT_SYNC_BYTES
    #: Entries (files, directories, symlinks) one transfer may have; a manifest with more is
    #: refused before anything is created.
    max_files: int = DEFAULT_MAX_FILES
    #: Bytes of data one transfer may bring (holes of sparse files not counted).
    max_bytes: int = DEFAULT_MAX_BYTES
    #: ``HOST:PORT`` where this receiver also listens for helpers (``stx worker --join ...
    #: --data-listen ...``) that take data streams on their own hosts (docs/cluster.md);
    #: None: no cluster port.
    cluster: str | None = None
    #: Remote worker processes to wait for before a transfer is admitted (0: do not wait).
    cluster_workers: int = 0
    #: Seconds to wait for them; the transfer goes on with what joined by then.
    cluster_wait: float = 30.0

    def resolved(self) -> ResolvedRecvOptions:
        """These options checked (UsageError for the first bad one) and made concrete."""
        if self.max_streams < 1 or self.max_worker_streams < 1 or not self.worker_timeout > 0:
            raise UsageError("max_streams, max_worker_streams and worker_timeout must be positive")
        workers = check_workers(self.workers)
        if self.window_ms <= 0 or self.handshake_timeout <= 0 or self.max_handshakes_per_s <= 0:
            raise UsageError("window, handshake timeout and handshake rate must be positive")
        if min(self.max_pending, self.max_pending_per_ip, self.max_sessions) < 1:
            raise UsageError("connection and session caps must be at least 1")
        per_ip = (
            min(self.max_handshakes_per_s, max(2.0, self.max_handshakes_per_s / 2))
            if self.max_handshakes_per_ip_per_s is None
            else self.max_handshakes_per_ip_per_s
        )
        if per_ip <= 0:
            raise UsageError("the per-address handshake rate must be positive")
        if self.max_files < 1 or self.max_bytes < 0:
            raise UsageError("max_files must be at least 1 and max_bytes not negative")
        if not self.stall_timeout > 0:
            raise UsageError("the stall timeout must be a positive number of seconds")
        if self.limit_rate < 0:
            raise UsageError("--limit-rate must be 0 (no limit) or more")
        if self.cluster is not None:
            parse_hostport(self.cluster)  # UsageError for a bad address
        if self.cluster_workers < 0 or self.cluster_wait < 0:
            raise UsageError("--cluster-workers and --cluster-wait must be 0 or more")
        if self.cluster_workers and self.cluster is None:
            raise UsageError("--cluster-workers needs --cluster HOST:PORT")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(RecvOptions)}
        fields.update(
            workers=workers,
            max_handshakes_per_ip_per_s=float(per_ip),
            stall_timeout=float(self.stall_timeout),
        )
        return ResolvedRecvOptions(**fields)


@dataclass(frozen=True)
class ResolvedRecvOptions(RecvOptions):
    """``RecvOptions.resolved()``: every automatic value filled in."""

    workers: int = 1
    max_handshakes_per_ip_per_s: float = 1.0
