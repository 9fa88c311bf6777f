"""What the command line shows: the live progress line, the sender's summary line and the
cluster events' lines. Text only (it formats what it is given; ``stxpar.cli`` prints it).
"""

from __future__ import annotations

import shutil
import time
from typing import Any, TextIO

from .config import TransferResult


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """One self-rewriting line on a terminal: done / total, percent, rate, ETA; with helpers
    (``stx send --cluster``), the worker processes per host. The line is kept within the
    terminal's width (the label is shortened): a line that wraps cannot be rewritten with
    ``\r``, and every update would scroll the terminal."""

    #: Hosts named on the line (the others are counted: ``+2``), and the longest name shown.
    HOSTS_SHOWN = 3
    HOST_NAME_MAX = 10

    def __init__(
        self, stream: TextIO, label: str, limit: int = 0, *, columns: int | None = None
    ) -> None:
        self.stream = stream
        self.label = label
        #: --limit-rate in force (bytes a second), shown beside the rate
        self.limit = limit
        self.start = time.monotonic()
        self.base: int | None = None
        self.shown = False
        self.files: tuple[int, int] | None = None
        #: the terminal's width (None: asked at each line, as it may change)
        self.columns = columns
        #: worker processes on this host, and (host name -> worker processes) the helpers'
        self.local = 0
        self.local_name = ""
        self.helpers: dict[str, int] = {}

    def file_count(self, done: int, total: int) -> None:
        """Files in place so far, shown on the next line drawn (a tree of several files)."""
        if total > 1:
            self.files = (done, total)

    def cluster_event(self, kind: str, fields: dict[str, Any]) -> None:
        """A helper joined (``helper_joined``: its host and worker processes) or was put aside
        (``helper_left``): the next line shows it."""
        host = str(fields.get("host", "?"))
        if kind == "helper_joined":
            self.helpers[host] = self.helpers.get(host, 0) + int(fields.get("workers", 0))
        elif kind == "helper_left":
            left = self.helpers.get(host, 0) - int(fields.get("workers", 0))
            if left > 0:
                self.helpers[host] = left
            else:
                self.helpers.pop(host, None)

    def hosts(self, names: int = HOSTS_SHOWN) -> str:
        """``  hosts local:4 dtn2:4 dtn3:4`` (worker processes per host, the first ``names``
        hosts named, ``+2`` for the others; ``  hosts 3`` with none) while helpers take part;
        else nothing."""
        if not self.helpers:
            return ""
        counts = dict(self.helpers)
        local = self.local + counts.pop(self.local_name, 0)  # a helper on this very host
        parts = [("local", local)] if local else []
        parts += sorted(counts.items())
        if names <= 0:
            return f"  hosts {len(parts)}"
        cap = self.HOST_NAME_MAX
        shown = " ".join(f"{_short_host(h, cap)}:{n}" for h, n in parts[:names])
        more = len(parts) - names
        return f"  hosts {shown}" + (f" +{more}" if more > 0 else "")

    def __call__(self, done: int, total: int) -> None:
        if self.base is None:  # what a resume found already there does not count as speed
            self.base = done
            self.start = time.monotonic()
        elapsed = max(1e-6, time.monotonic() - self.start)
        rate = (done - self.base) / elapsed
        pct = 100.0 * done / total if total else 100.0
        eta = (total - done) / rate if rate > 0 else 0.0
        files = f"  {self.files[0]}/{self.files[1]} files" if self.files else ""
        rest = (
            f": {_human(done)} / {_human(total)}  {pct:5.1f}%{files}  "
            f"{rate / 1e6:7.1f} MB/s{self._limit()}  ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        room = (self.columns or shutil.get_terminal_size((100, 24)).columns) - 1  # no auto-wrap
        keep = min(len(self.label), _LABEL_KEEP)
        hosts = ""
        for names in range(self.HOSTS_SHOWN, -1, -1):  # fewer names on a narrower terminal
            hosts = self.hosts(names)
            if len(rest) + len(hosts) + keep <= room:
                break
        else:
            hosts = ""  # too narrow even for that: the line without helpers
        label = _fit(self.label, room - len(rest) - len(hosts))
        self.stream.write(f"\r{label}{rest}{hosts}\x1b[K")
        self.stream.flush()
        self.shown = True

    def _limit(self) -> str:
        return f" (limit {_human(self.limit)}/s)" if self.limit else ""

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _short_host(name: str, limit: int) -> str:
    """A host name for the progress line: its first label (``dtn2`` of ``dtn2.example.org``;
    an address stays whole), at most ``limit`` characters."""
    short = name if name.replace(".", "").isdigit() or ":" in name else name.split(".", 1)[0]
    return short if len(short) <= limit else short[: limit - 1] + "~"


#: The progress line's label is not cut shorter than this, nor, to name more hosts, than that.
_LABEL_MIN = 12
_LABEL_KEEP = 15


def _fit(label: str, room: int) -> str:
    """``label`` in ``room`` characters (``...`` for what was cut; ``_LABEL_MIN`` at least)."""
    room = max(_LABEL_MIN, room)
    return label if len(label) <= room else label[: room - 3] + "..."


def _amount(size: int, held: int) -> str:
    """A transfer's size in a summary line, and how much of it a resume found already there
    (the rate beside it is of what this run moved)."""
    return _human(size) + (f", {_human(held)} of it already there" if held else "")


def send_summary(result: TransferResult) -> str:
    """The sender's last line. The rate is of what this run moved: a resumed transfer says how
    much was already there, so that size, time and rate add up."""
    extra = result.extra
    files = ""
    if extra.get("dirs") or extra.get("files", 1) != 1 or extra.get("symlinks"):
        files = f"{extra.get('files', 0)} files, "
        if extra.get("skipped"):
            files += f"{extra['skipped']} skipped, "
    hosts = extra.get("hosts")
    streams = f"{result.workers} stream{'' if result.workers == 1 else 's'}"
    if hosts:
        n = len(hosts)
        streams = (
            f"{n} host{'' if n == 1 else 's'}, {sum(hosts.values())} workers"
            f" ({extra.get('remote_workers', 0)} remote)"
        )
    return (
        f"sent {result.file}: {files}{_amount(result.bytes, result.bytes_resumed)} in"
        f" {result.seconds:.2f} s "
        f"({result.mb_per_s:.1f} MB/s, {streams}, digest {result.digest[:16]}...)"
    )


_CLUSTER_EVENTS = (
    "cluster_listening",
    "helper_joined",
    "helper_left",
    "cluster_short",
    "rerouted",
)


def cluster_line(kind: str, fields: dict[str, Any]) -> str:
    """The sender's line for a cluster port event."""
    if kind == "cluster_listening":
        return f"listening for helpers on {fields['address']}"
    if kind == "helper_joined":
        return f"helper {fields['host']} joined with {fields['workers']} workers"
    if kind == "helper_left":
        return f"helper {fields['host']} put aside: {fields['reason']}"
    if kind == "rerouted":
        where = ", ".join(f"{n} to {place}" for place, n in fields["streams"].items())
        return f"streams rerouted ({fields['reason']}: {fields['host']}): {where}"
    return (
        f"only {fields['got']} of {fields['want']} remote workers joined within"
        f" {fields['wait']:g} s; going on with them"
    )
