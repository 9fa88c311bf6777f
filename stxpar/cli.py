"""The ``stx`` command (and ``stx-send`` / ``stx-recv``): argument parsing, progress, exit codes.

Every StxError becomes one line on stderr and its exit code; a traceback is shown only for a
bug, and only with STX_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .config import (
    DEFAULT_BLOCK_SIZE,
    RecvOptions,
    SendOptions,
    default_workers,
    is_loopback,
    parse_size,
)
from .errors import EXIT_OTHER, StxError, UsageError
from .launch import EarlyWalk
from .netio import parse_hostport
from .progress import _CLUSTER_EVENTS, Progress, _amount, _human, cluster_line
from .progress import send_summary as send_summary
from .psk import load_key_file, write_key_file

if TYPE_CHECKING:
    from .prescan import Prescan

EXIT_CODES = """exit codes:
  0  success
  1  any other error (internal error, peer broke the protocol, receiver refused)
  2  usage error or bad local input (options, files, addresses, key file)
  3  authentication failure (wrong key, forged or altered data); "clock skew: ..." when
     the key is right but the two clocks differ by more than the receiver allows
     ('stx recv --clock-window', default 300 s): set the clocks right (NTP)
  4  connection failed after the retries
  5  integrity or verification failure (digest mismatch, blocks damaged repeatedly, the
     source file changed or was replaced during the transfer)
  130  interrupted (Ctrl-C); 143  terminated (SIGTERM); 129  hung up (SIGHUP). 'stx recv'
       stops cleanly on any of them and exits 0"""

KEY_HELP = (
    "file holding the pre-shared key (made by 'stx keygen'; must be yours or root's and not "
    "readable by group or others; a symlink is followed and the file it leads to is checked)."
    " Default: $STX_PSK_FILE. The key is never accepted on the command line."
)


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _join_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _progress_for(args: argparse.Namespace, label: str) -> Progress | None:
    if args.quiet or not sys.stderr.isatty():
        return None
    return Progress(sys.stderr, label, getattr(args, "limit_rate", 0) or 0)


def _key_paths(given: str | list[str] | None) -> list[str]:
    """The key files: ``--psk-file`` (one, or a receiver's several), else $STX_PSK_FILE."""
    paths = [given] if isinstance(given, str) else list(given or ())
    if not paths and os.environ.get("STX_PSK_FILE"):
        paths = [os.environ["STX_PSK_FILE"]]
    if not paths:
        raise UsageError(
            "no key: pass --psk-file FILE or set STX_PSK_FILE (make a key with 'stx keygen')"
        )
    return paths


def _key(args: argparse.Namespace) -> bytes:
    return load_key_file(_key_paths(args.psk_file)[0])


def _recv_keys(args: argparse.Namespace) -> list[bytes]:
    """The receiver's keys: every --psk-file (a rotation accepts old and new)."""
    return [load_key_file(p) for p in _key_paths(args.psk_file)]


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- subcommands


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.output:
        path = write_key_file(args.output, force=args.force)
        print(
            f"wrote a new 256-bit key to {path} (mode 0600); copy it to the other side securely",
            file=sys.stderr,
        )
    else:
        from .psk import format_key, generate

        sys.stdout.write(format_key(generate()))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from .prescan import start as prescan

    def warn(text: str) -> None:
        if not args.quiet:
            print(f"warning: {text}", file=sys.stderr)

    # A tree is walked by a child process while this one imports the rest (stxpar.prescan);
    # ``stx send`` started it before its own imports (stxpar.launch) unless it could not.
    walk = getattr(args, "prescan", None) or prescan(args.paths, warn)
    try:
        return _send(args, warn, walk)
    finally:
        if walk is not None:
            walk.close()


def _send(args: argparse.Namespace, warn: Callable[[str], None], walk: Prescan | None) -> int:
    from .cluster import local_host
    from .ipc import freeze_heap
    from .sender import prestart_workers, send

    host, port = args.address
    opts = SendOptions(
        workers=args.workers,
        block_size=args.block_size,
        max_retries=args.max_retries,
        stall_timeout=args.stall_timeout,
        deadline=args.deadline,
        to=args.to,
        as_name=args.as_name,
        limit_rate=args.limit_rate,
        cluster=args.cluster,
        cluster_workers=args.cluster_workers,
        cluster_wait=args.cluster_wait,
    )
    if args.workers == 0 and args.cluster is None:
        raise UsageError("--workers 0 needs --cluster HOST:PORT (helpers do the sending)")
    # The workers first, forked while this process holds no key (a worker must never hold it).
    paths = args.paths
    if walk is not None:
        # While the walk's child finishes and hands its result over: the first X25519 key of
        # a process costs some milliseconds the handshake would pay otherwise.
        from .handshake import warm_up

        warm_up()
    pool = prestart_workers(paths, host, options=opts, warn=warn, scanned=walk)
    freeze_heap()  # the walk's entries live until the end too
    try:
        key = _key(args)
        label = os.path.basename(os.path.normpath(paths[0]))
        progress = _progress_for(args, label if len(paths) == 1 else f"{label} (+{len(paths) - 1})")

        if progress is not None and args.cluster is not None:
            progress.local = _local_workers(args, host, pool)
            progress.local_name = local_host()

        def on_event(kind: str, fields: dict[str, Any]) -> None:
            if kind in _CLUSTER_EVENTS:
                if progress is not None:
                    progress.cluster_event(kind, fields)
                if not args.quiet:
                    if progress is not None and progress.shown:
                        sys.stderr.write("\n")
                    print(cluster_line(kind, fields), file=sys.stderr, flush=True)
                return
            if progress is None:  # notes go with the progress line: a terminal, not --quiet
                return
            if progress.shown:
                sys.stderr.write("\n")
            if kind == "resuming":
                print(
                    f"resuming: {_human(fields['have_bytes'])} of {_human(fields['bytes'])}"
                    " already there",
                    file=sys.stderr,
                )
            elif kind == "reconnecting":
                print(
                    f"connection problem ({fields['reason']}); reconnecting in"
                    f" {fields['delay']:.1f} s (attempt {fields['attempt']} of {args.max_retries})",
                    file=sys.stderr,
                )

        try:
            result = send(
                paths,
                host,
                port,
                psk=key,
                progress=progress,
                options=opts,
                on_event=on_event,
                pool=pool,
                file_progress=progress.file_count if progress is not None else None,
                warn=warn,
            )
        finally:
            if progress is not None:
                progress.close()
    finally:
        if pool is not None:
            pool.close()
    if args.json:
        _print_json(result.as_json())
    elif not args.quiet:
        print(send_summary(result), file=sys.stderr)
    return 0


def _local_workers(args: argparse.Namespace, host: str, pool: Any) -> int:
    """The sender's worker processes on this host, for the progress line."""
    if pool is not None:
        return len(pool.workers)
    if args.workers is not None:
        return int(args.workers)
    return default_workers(peer_on_this_machine=is_loopback(host))


def cmd_worker(args: argparse.Namespace) -> int:
    from .helper import prestart_spares, serve_helper

    host, port = args.join
    # The worker processes first, forked while this process holds no key.
    spares = prestart_spares(args.workers, data_listen=args.data_listen or "")
    try:
        key = _key(args)
    except BaseException:
        if spares is not None:
            spares.close()
        raise
    serve_helper(
        join=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        psk=key,
        workers=args.workers,
        data_listen=args.data_listen or "",
        once=args.once,
        spares=spares,
    )
    return 0


#: The defaults the options' fields carry, shown in ``--help`` (``stxpar.config`` imports no
#: ZeroMQ: ``stx --help`` stays quick).
_SEND = SendOptions()
_RECV = RecvOptions()


def _stall_timeout(text: str) -> float:
    value = _age(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"bad stall timeout {text!r}: must be above 0")
    return value


def _age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    unit = t[-1] if t and t[-1] in units else "s"
    try:
        value = float(t.rstrip("smhd")) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad age {text!r}: expected e.g. 90s, 30m, 12h, 7d"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"bad age {text!r}")
    return value


def _partials(args: argparse.Namespace) -> int:
    from .receiver import list_partials, purge_partials

    if args.purge_partial is not None:
        items = purge_partials(args.dest, older_than_s=args.purge_partial)
        verb = "removed"
    else:
        items = list_partials(args.dest)
        verb = "partial"
    for p in items:
        if args.json:
            _print_json(
                {
                    "name": p.name,
                    "bytes": p.size,
                    "have_bytes": p.have_bytes,
                    "blocks_have": p.blocks_have,
                    "blocks_total": p.blocks_total,
                    "age_s": round(p.age_s, 1),
                    "action": verb,
                    "tree": p.tree,
                }
            )
        elif p.tree:
            print(
                f"{verb} tree {p.name}: {_human(p.have_bytes)} held ({p.blocks_have} blocks),"
                f" untouched for {p.age_s / 3600:.1f} h"
            )
        else:
            print(
                f"{verb} {p.name}: {_human(p.have_bytes)} of {_human(p.size)}"
                f" ({p.blocks_have}/{p.blocks_total} blocks), untouched for {p.age_s / 3600:.1f} h"
            )
    if not items and not args.json:
        print(
            "no partial transfers" if verb == "partial" else "nothing old enough to remove",
            file=sys.stderr,
        )
    return 0


def cmd_recv(args: argparse.Namespace) -> int:
    from .receiver import Receiver, list_partials

    if args.list_partial or args.purge_partial is not None:
        return _partials(args)
    if args.listen is None:
        raise UsageError("--listen HOST:PORT is required to receive")
    host, port = args.listen
    keys = _recv_keys(args)
    from .gatekeeper import LogLimiter

    # A flood of refused connections must not become a flood of log lines.
    refusals = LogLimiter()

    def refused(line: str) -> None:
        if refusals.allow():
            print(line, file=sys.stderr)

    metrics = None
    if args.metrics is not None:
        from .service import Metrics

        metrics = Metrics(
            snapshot=lambda: receiver.snapshot(),
            partials=lambda: sum(p.have_bytes for p in list_partials(args.dest)),
        )

    def on_event(kind: str, fields: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.event(kind, fields)
        if args.log_format == "json":
            json_event(kind, fields)
        else:
            text_event(kind, fields)

    def json_event(kind: str, fields: dict[str, Any]) -> None:
        from .service import json_line

        if kind == "received" and args.json:
            _print_json(fields)
        if kind in ("rejected", "dropped"):
            if args.quiet or not refusals.allow():
                return
        elif args.quiet and kind != "warning":
            return
        print(json_line(kind, fields), file=sys.stderr, flush=True)

    def text_event(kind: str, fields: dict[str, Any]) -> None:
        if kind == "received":
            if args.json:
                _print_json(fields)
            if not args.quiet:
                held = fields.get("bytes_resumed", 0)
                mbps = (
                    (fields["bytes"] - held) / fields["seconds"] / 1e6 if fields["seconds"] else 0.0
                )
                tree = fields.get("dirs") or fields.get("symlinks") or fields.get("files", 1) != 1
                files = f"{fields.get('files', 0)} files, " if tree else ""
                print(
                    f"received {fields['file']}: {files}{_amount(fields['bytes'], held)} in"
                    f" {fields['seconds']:.2f} s ({mbps:.1f} MB/s)",
                    file=sys.stderr,
                )
        elif kind == "listening" and not args.quiet:
            also = "".join(f" and {a}" for a in fields.get("also") or ())
            limit = f", at most {_human(args.limit_rate)}/s" if args.limit_rate else ""
            print(
                f"listening on {fields['host']}:{fields['port']}{also} with"
                f" {fields['workers']} workers, writing to {args.dest}{limit}",
                file=sys.stderr,
            )
        elif kind == "rejected" and not args.quiet:
            refused(f"rejected {fields['peer']}: {fields['error']}")
        elif kind == "dropped" and not args.quiet:
            refused(f"dropped {fields['peer']}: {fields['reason']}")
        elif kind == "failed" and not args.quiet:
            partial = fields.get("partial", "kept" if fields.get("kept") else "discarded")
            if partial == "kept":
                note = (
                    f"; partial kept for a resume ({_human(fields['have_bytes'])} of"
                    f" {_human(fields['bytes'])})"
                )
            elif partial == "gone":
                note = "; nothing kept (the partial file was deleted or replaced meanwhile)"
            else:
                note = "; partial discarded"
            print(f"failed {fields['file']}: {fields['error']}{note}", file=sys.stderr)
        elif kind == "warning":  # shown even with --quiet: it is about the receiver's safety
            print(f"WARNING: {fields['message']}", file=sys.stderr)
        elif kind == "accepted" and not args.quiet:
            resumed = fields.get("resumed_blocks") or 0
            note = f", resuming with {resumed} blocks already there" if resumed else ""
            print(
                f"receiving {fields['file']} ({_human(fields['bytes'])}) from {fields['peer']}{note}",
                file=sys.stderr,
            )
        elif kind == "restarting" and not args.quiet:
            print(f"starting {fields['file']} over: {fields['reason']}", file=sys.stderr)
        elif kind == "keys_reloaded" and not args.quiet:
            print(f"keys reloaded: {fields['keys']} key file(s)", file=sys.stderr)
        elif kind == "worker_replaced" and not args.quiet:
            print(f"replaced receiver worker {fields['pid']}: {fields['reason']}", file=sys.stderr)
        elif kind in _CLUSTER_EVENTS and not args.quiet:
            print(cluster_line(kind, fields), file=sys.stderr, flush=True)

    options = RecvOptions(
        workers=args.workers,
        once=args.once,
        window_ms=int(args.clock_window * 1000),
        max_streams=args.max_streams,
        stall_timeout=args.stall_timeout,
        allow_shared_dest=args.allow_shared_dest,
        max_files=args.max_files,
        max_bytes=args.max_bytes,
        no_subdirs=args.no_subdirs,
        limit_rate=args.limit_rate,
        cluster=args.cluster,
        cluster_workers=args.cluster_workers,
        cluster_wait=args.cluster_wait,
    )
    receiver = Receiver(
        args.dest, psk=keys, options=options, host=host, port=port, on_event=on_event
    )
    reload_asked = threading.Event()
    signal.signal(signal.SIGUSR1, lambda signum, frame: reload_asked.set())
    receiver.start()
    try:
        if metrics is not None:
            mhost, mport = metrics.start(*args.metrics)
            if args.log_format == "json":
                on_event("metrics", {"host": mhost, "port": mport, "outcome": "listening"})
            elif not args.quiet:
                print(f"metrics on http://{_join_host(mhost, mport)}/metrics", file=sys.stderr)
    except BaseException:
        receiver.stop()
        raise

    def summary(force: bool = False) -> None:
        line = refusals.flush(force=force)
        if not line or args.quiet:
            return
        if args.log_format == "json":
            from .service import json_line

            print(json_line("refusals", {"summary": line, "outcome": "refused"}), file=sys.stderr)
        else:
            print(f"(rejected/dropped connections: {line})", file=sys.stderr)

    def reload_keys() -> None:
        """SIGUSR1: read every key file again; new connections need one of those keys, the
        transfers in progress go on. A key file that cannot be read keeps the old keys."""
        reload_asked.clear()
        try:
            receiver.set_keys(_recv_keys(args))
        except StxError as exc:
            on_event("warning", {"message": f"keys not reloaded, the old ones stay: {exc}"})
        else:
            on_event("keys_reloaded", {"keys": len(args.psk_file or [1]), "outcome": "info"})

    try:
        while not receiver.wait(0.5):
            if reload_asked.is_set():
                reload_keys()
            summary()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
        if metrics is not None:
            metrics.stop()
        summary(force=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        size=args.size,
        workers=args.workers,
        block_size=args.block_size,
        directory=args.dir,
        as_json=args.json,
        quiet=args.quiet,
    )


# ---------------------------------------------------------------- parser


def _add_send_args(p: argparse.ArgumentParser) -> None:
    if isinstance(p, _Parser):
        p.intermixed = True  # PATH... HOST:PORT with options anywhere among them
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="files and directories to send; a directory D arrives as DEST/D with its whole"
        " tree (files, directories, symlinks as symlinks, permission bits, modification times,"
        " sparse files' holes; FIFOs, sockets and devices are skipped with a warning; hard"
        " links, owners and extended attributes are not kept). One PATH that is a file arrives"
        " as DEST/NAME with the receiver's default mode",
    )
    p.add_argument("address", type=_hostport, metavar="HOST:PORT", help="where 'stx recv' listens")
    p.add_argument("--psk-file", metavar="FILE", help=KEY_HELP)
    p.add_argument(
        "--workers",
        type=_nonneg_int,
        metavar="N",
        help="worker processes on this host, one TCP stream each; 0 only with --cluster"
        " (helpers do all the sending) (default here: "
        f"{default_workers()}, one per CPU between 2 and 8; "
        f"{default_workers(peer_on_this_machine=True)} when HOST is a loopback address, where"
        " the receiver shares these CPUs)",
    )
    p.add_argument(
        "--block-size",
        type=_size,
        metavar="SIZE",
        help=f"block size, e.g. 1M, 4M, 16M (default {DEFAULT_BLOCK_SIZE >> 20}M; 4K-64M)",
    )
    p.add_argument(
        "--max-retries",
        type=_nonneg_int,
        default=_SEND.max_retries,
        metavar="N",
        help="consecutive failed connection attempts (or reconnects without progress) after the"
        " first before giving up with exit 4; 0: no retry. The wait before retry n is random"
        " between half and all of min(30, 0.5 * 2^(n-1)) s (0.25-0.5 s, 0.5-1 s, 1-2 s, ...),"
        " also when attempts fail at once; with the default"
        f" ({_SEND.max_retries}) the waits add up to"
        f" {_SEND.backoff.min_total(_SEND.max_retries):.0f}-"
        f"{_SEND.backoff.max_total(_SEND.max_retries):.0f} s, riding out a minute-long"
        " outage. Progress resets the count",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=_SEND.stall_timeout,
        metavar="SECONDS",
        help=f"reconnect when nothing is acknowledged for this long (default {_SEND.stall_timeout:g})",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=_SEND.deadline,
        metavar="SECONDS",
        help="give up with exit 4 when the whole transfer takes longer than this, or as soon as"
        " the next retry's wait would end past it (default: no limit); with a large"
        " --max-retries it bounds how long a receiver outage is waited out",
    )
    p.add_argument(
        "--limit-rate",
        type=_size,
        default=0,
        metavar="RATE",
        help="send at most RATE bytes a second over all streams together, helpers' included"
        " (e.g. 50M, 1G; binary units: M = 2^20; 0 = no limit, the default); each stream is"
        " paced by the kernel at its share, so there are no bursts (docs/tuning.md)",
    )
    p.add_argument(
        "--to",
        metavar="SUBDIR",
        help="land in DEST/SUBDIR on the receiver (made as needed; a relative path: no '..',"
        " no absolute path; the receiver refuses a symlink or a file on the way, and a"
        " receiver started with --no-subdirs refuses it)",
    )
    p.add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="with one PATH: it arrives as NAME instead of its own name (a file, or a"
        " directory's top-level name)",
    )
    p.add_argument(
        "--cluster",
        type=_hostport_text,
        metavar="HOST:PORT",
        help="also listen here for helpers ('stx worker --join HOST:PORT' on other hosts that"
        " see the same files, e.g. on a shared file system): their worker processes join the"
        " transfer, each with a stream of its own; helpers that join later are put to work at"
        " once, and the blocks of one that leaves or dies are sent again by the others. The"
        " channel is CurveZMQ with keys derived from the key file (docs/cluster.md)",
    )
    p.add_argument(
        "--cluster-workers",
        type=_nonneg_int,
        default=_SEND.cluster_workers,
        metavar="K",
        help="with --cluster: wait until helpers offer K worker processes before sending"
        " (at most --cluster-wait seconds; then go on with what joined)",
    )
    p.add_argument(
        "--cluster-wait",
        type=float,
        default=_SEND.cluster_wait,
        metavar="S",
        help=f"seconds to wait for --cluster-workers (default {_SEND.cluster_wait:g}); with"
        " --workers 0, how long to wait for the first helper",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary line on stdout at the end (bytes, seconds, blocks, digest;"
        " files, dirs, symlinks, skipped and bytes_sparse: holes of sparse files not sent;"
        " with --cluster: hosts (worker processes per host), remote_workers, helpers)",
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress line and no summary on stderr"
    )
    p.set_defaults(func=cmd_send)


def _hostport_text(text: str) -> str:
    _hostport(text)
    return text


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--join",
        type=_hostport,
        required=True,
        metavar="HOST:PORT",
        help="the coordinator's cluster port ('stx send --cluster HOST:PORT' or 'stx recv"
        " --cluster HOST:PORT'); tried again with backoff until it answers, so a helper may"
        " start first",
    )
    p.add_argument("--psk-file", metavar="FILE", help=KEY_HELP)
    p.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help=f"worker processes to run here (default here: {default_workers()}, one per CPU"
        " between 2 and 8)",
    )
    p.add_argument(
        "--data-listen",
        metavar="HOST:PORT",
        type=_hostport_text,
        help="needed to help a receiver: accept this host's own data streams here (port 0:"
        " any free port; a wildcard host is given to the sender as this host's name) and"
        " write them into the destination as this host sees it (the same path, e.g. a shared"
        " file system); a sender's helper ignores it (it connects out)",
    )
    p.add_argument(
        "--once", action="store_true", help="exit after one transfer that gave this helper work"
    )
    p.set_defaults(func=cmd_worker)


def _clock_window(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 1 <= value <= 86400 * 365:
        raise argparse.ArgumentTypeError(f"must be 1 s to a year, got {text}")
    return value


def _add_recv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        type=_hostport,
        metavar="HOST:PORT",
        help="address to listen on; every stream of a transfer connects to this one port",
    )
    p.add_argument(
        "--psk-file",
        metavar="FILE",
        action="append",
        help=KEY_HELP
        + " Give it twice to accept two keys while senders move from one to the other; SIGUSR1"
        " reads the key files again without stopping transfers in progress (docs/service.md).",
    )
    p.add_argument(
        "--dest", required=True, metavar="DIR", help="directory the files are written into"
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help=f"receiver worker processes (default here: {default_workers()})",
    )
    p.add_argument("--once", action="store_true", help="exit after one completed transfer")
    p.add_argument(
        "--clock-window",
        type=_clock_window,
        default=_RECV.window_ms / 1000,
        metavar="SECONDS",
        help="how far a sender's clock may be from this one's"
        f" (default {_RECV.window_ms / 1000:g}); a sender outside"
        " it fails with exit 3 and 'clock skew: ...'",
    )
    p.add_argument(
        "--max-streams",
        type=_positive_int,
        default=_RECV.max_streams,
        metavar="N",
        help="data streams served at once over all transfers; more are refused and retried"
        f" by their senders (default {_RECV.max_streams})",
    )
    p.add_argument(
        "--max-files",
        type=_positive_int,
        default=_RECV.max_files,
        metavar="N",
        help="entries (files, directories, symlinks) one transfer may bring; a larger tree is"
        f" refused before anything is created (default {_RECV.max_files})",
    )
    p.add_argument(
        "--max-bytes",
        type=_size,
        default=_RECV.max_bytes,
        metavar="SIZE",
        help="bytes of data one transfer may bring (e.g. 500G, 2T; holes of sparse files do"
        f" not count; default {_human(_RECV.max_bytes)}); the free space is checked too",
    )
    p.add_argument(
        "--stall-timeout",
        type=_stall_timeout,
        default=_RECV.stall_timeout,
        metavar="S",
        help="end a transfer whose sender sent no block and no control message for S seconds"
        " (e.g. 90, 2m; its partial is kept for a resume, and the name is free again for a new"
        f" sender; default {_RECV.stall_timeout:g}); raise it for very slow links with big"
        " blocks",
    )
    p.add_argument(
        "--allow-shared-dest",
        action="store_true",
        help="accept a --dest that other users can write into (group- or world-writable, /tmp,"
        " or owned by another user), with a warning. Refused by default: such a user can plant"
        " links, FIFOs or directories at the names the receiver uses, and swap, read or delete"
        " what arrives",
    )
    p.add_argument(
        "--list-partial",
        action="store_true",
        help="list the partial transfers in --dest (resumable by sending the same file again) and exit",
    )
    p.add_argument(
        "--purge-partial",
        type=_age,
        metavar="AGE",
        help="remove partial transfers in --dest untouched for AGE (e.g. 30m, 12h, 7d) and exit",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line on stdout per received file or tree (with files, dirs and"
        " symlinks for a tree; with --cluster: hosts, data streams served per host)",
    )
    p.add_argument(
        "--cluster",
        type=_hostport_text,
        metavar="HOST:PORT",
        help="also listen here for helpers ('stx worker --join HOST:PORT --data-listen"
        " HOST:PORT' on other hosts that see --dest at the same path, e.g. a shared file"
        " system): each takes data streams on its own port and writes their blocks into the"
        " destination; the receiver tells the sender where each stream goes (ROUTES). The"
        " channel is CurveZMQ with keys derived from the (first) key file (docs/cluster.md)",
    )
    p.add_argument(
        "--cluster-workers",
        type=_nonneg_int,
        default=_RECV.cluster_workers,
        metavar="K",
        help="with --cluster: admit a transfer only once helpers offer K worker processes"
        " (at most --cluster-wait seconds; then go on with what joined)",
    )
    p.add_argument(
        "--cluster-wait",
        type=float,
        default=_RECV.cluster_wait,
        metavar="S",
        help=f"seconds to wait for --cluster-workers (default {_RECV.cluster_wait:g})",
    )
    p.add_argument(
        "--limit-rate",
        type=_size,
        default=0,
        metavar="RATE",
        help="take in at most RATE bytes a second over every transfer and stream together"
        " (e.g. 100M, 1G; binary units; 0 = no limit, the default); the senders are held back"
        " by TCP's flow control (docs/tuning.md)",
    )
    p.add_argument(
        "--no-subdirs",
        action="store_true",
        help="refuse transfers sent with --to SUBDIR or --as NAME: everything lands directly"
        " in --dest under its sender's own name",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr as text (default) or one JSON object per line for log"
        " shippers: time, event, peer, file, bytes, seconds, outcome, error_code, and the"
        " event's other fields (docs/service.md)",
    )
    p.add_argument(
        "--metrics",
        type=_hostport,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, bound to that address only"
        " (stx_received_bytes_total, stx_transfers_completed_total, stx_transfers_failed_total,"
        " stx_handshakes_refused_total, stx_active_sessions, stx_active_streams,"
        " stx_partial_bytes); needs pip install 'stxpar[metrics]'. Off by default",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no log lines on stderr")
    p.set_defaults(func=cmd_recv)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2), like every other error; and with
    ``intermixed`` (``stx send``), options and positionals in any order, as ``scp`` and
    ``rsync`` take them: ``stx send A B --psk-file K HOST:PORT``. Plain argparse takes the
    positionals in runs between options, so there B became HOST:PORT."""

    intermixed = False
    _mixing = False

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = sys.argv[1:] if args is None else list(args)
        # After "--" (a PATH that starts with "-") the positionals are one run anyway, and
        # Python 3.11's intermixed parse loses them there.
        if not self.intermixed or self._mixing or "--" in args:
            return super().parse_known_args(args, namespace)
        self._mixing = True  # (the intermixed parse calls this twice itself)
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def build_parser(prog: str = "stx") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Secure, parallel, resumable transfer of very large files (STX protocol).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stxpar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    kg = sub.add_parser(
        "keygen",
        help="make a new random 256-bit key",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kg.add_argument(
        "-o", "--output", metavar="FILE", help="write the key to FILE (mode 0600) instead of stdout"
    )
    kg.add_argument(
        "--force",
        action="store_true",
        help="replace FILE if it exists (the key is written to a new file that is then renamed"
        " over FILE: a symlink at FILE is replaced, never written through)",
    )
    kg.set_defaults(func=cmd_keygen)

    _add_send_args(
        sub.add_parser(
            "send",
            help="send a file to a receiver",
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    _add_recv_args(
        sub.add_parser(
            "recv",
            help="receive files",
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )

    _add_worker_args(
        sub.add_parser(
            "worker",
            help="serve as worker processes of a coordinator on another host",
            description="Join the coordinator at --join (an 'stx send --cluster' or 'stx recv"
            " --cluster') and serve as --workers worker processes of it, transfer after"
            " transfer, until stopped. A sender's helper reads the blocks it sends from the"
            " same path as the sender, so the files must be visible here (a shared file"
            " system). A receiver's helper (--data-listen) takes data streams on its own port"
            " and writes them into the destination at the same path as the receiver sees it."
            " It logs one line per event on stderr; a wrong key is exit 3.",
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )

    demo = sub.add_parser(
        "demo",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="send a generated test file to a local receiver and verify it",
        description="Make a random test file, start a receiver on 127.0.0.1 on a free port, send the file "
        "over parallel encrypted streams, verify the copy, print a summary and clean up.",
    )
    demo.add_argument(
        "--size", type=_size, default=1 << 30, metavar="SIZE", help="test file size (default 1G)"
    )
    demo.add_argument(
        "--workers", type=_positive_int, metavar="N", help="workers on each side (default: auto)"
    )
    demo.add_argument("--block-size", type=_size, metavar="SIZE", help="block size (default 4M)")
    demo.add_argument(
        "--dir",
        metavar="DIR",
        help="scratch directory (default: /dev/shm if it has room, else the temp dir)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON summary line on stdout")
    demo.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    demo.set_defaults(func=cmd_demo)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every clean-up that Ctrl-C runs runs (workers
    stopped, private directories removed, a partial kept for a resume), then exits 128 + the
    signal's number (143, 129)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _on_stop_signal(signum: int, frame: object) -> None:
    for sig in _STOP_SIGNALS:  # once: a second one must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def run(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser, early: EarlyWalk | None = None
) -> int:
    """``early``: a walk ``stxpar.launch`` started before this module was imported; kept for
    ``stx send`` if it walks what the parsed command line names, else stopped."""
    try:
        args = parser.parse_args(argv)
    except BaseException:
        if early is not None:
            early.walk.close()
        raise
    if early is not None:
        if (
            getattr(args, "func", None) is cmd_send
            and [os.fspath(p) for p in args.paths] == early.paths
            and args.quiet == early.quiet
        ):
            args.prescan = early.walk
        else:
            early.walk.close()
    from .ipc import freeze_heap, harden_process

    harden_process()
    freeze_heap()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    try:
        return int(args.func(args))
    except StxError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated as exc:
        print(f"{parser.prog}: terminated ({signal.Signals(exc.signum).name})", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line unless STX_DEBUG asks for the traceback
        if os.environ.get("STX_DEBUG"):
            raise
        print(
            f"{parser.prog}: internal error: {type(exc).__name__}: {exc} (set STX_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return EXIT_OTHER


def main(argv: Sequence[str] | None = None, early: EarlyWalk | None = None) -> int:
    return run(argv, build_parser(), early)


def _alias(
    command: str,
    adder: Callable[[argparse.ArgumentParser], None],
    prog: str,
    early: EarlyWalk | None = None,
) -> int:
    parser = _Parser(
        prog=prog,
        description=f"Same as 'stx {command}'.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    adder(parser)
    return run(None, parser, early)


def send_main(early: EarlyWalk | None = None) -> int:
    return _alias("send", _add_send_args, "stx-send", early)


def recv_main() -> int:
    return _alias("recv", _add_recv_args, "stx-recv")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
