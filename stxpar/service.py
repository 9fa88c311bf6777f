"""A receiver run as a service: one JSON object per log line, and Prometheus metrics.

Theory of operation
-------------------
Both hang off the receiver's events (``Receiver(on_event=...)``: "listening", "accepted",
"received", "failed", "rejected", "dropped", "warning", "restarting", "worker_replaced",
"superseded"), so neither reaches into the session core.

``json_line(kind, fields, now)`` is the log line for one event: ``time`` (UTC, RFC 3339 with
milliseconds), ``event``, then ``peer``, ``file``, ``bytes``, ``seconds``, ``outcome`` and
``error_code`` (null where they do not apply), then the event's other fields. ``outcome`` says
how things went: "listening", "started", "ok", "failed", "refused", "warning", "info".
``error_code`` is the exit code a sender would see for the error (3 authentication, 4
connection, 5 integrity, 1 other; ``stxpar.errors``).

``Metrics`` counts the events into a private ``prometheus_client`` registry and serves it over
HTTP on the one address it is given (``start``). Counters: ``stx_received_bytes_total`` (data
bytes that arrived in completed transfers and in failed ones, resumed bytes not counted
again), ``stx_transfers_completed_total``, ``stx_transfers_failed_total{reason}``,
``stx_handshakes_refused_total{reason}`` (connections rejected or dropped before or at
authentication). Gauges, read when scraped: ``stx_active_sessions``, ``stx_active_streams``
(``Receiver.snapshot()``) and ``stx_partial_bytes`` (the bytes held in the destination's
partials, as ``stx recv --list-partial`` counts them; computed at most once every few seconds).
``prometheus_client`` is an optional dependency (``pip install 'stxpar[metrics]'``):
``Metrics`` raises UsageError without it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import UsageError

#: Fields every JSON log line carries (null when the event has none), after time and event.
CORE_FIELDS = ("peer", "file", "bytes", "seconds", "outcome", "error_code")
_OUTCOME = {
    "listening": "listening",
    "accepted": "started",
    "received": "ok",
    "failed": "failed",
    "rejected": "refused",
    "dropped": "refused",
    "warning": "warning",
}
#: How long a scrape may reuse the partial bytes it counted (the destination is walked).
PARTIALS_TTL_S = 5.0
METRICS_HINT = (
    "--metrics needs the prometheus_client package: pip install 'stxpar[metrics]'"
    " (or pip install prometheus_client)"
)


def _iso(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(kind: str, fields: dict[str, Any], now: float | None = None) -> str:
    """The JSON log line (no newline) for the receiver event ``kind`` with ``fields``."""
    record: dict[str, Any] = {"time": _iso(time.time() if now is None else now), "event": kind}
    for name in CORE_FIELDS:
        record[name] = fields.get(name)
    record["outcome"] = fields.get("outcome") or _OUTCOME.get(kind, "info")
    if kind in ("rejected", "dropped") and record["error_code"] is None:
        record["error_code"] = fields.get("code")
    for name, value in fields.items():
        if name not in record and name != "code":
            record[name] = value
    return json.dumps(record, sort_keys=False, default=str)


def failure_reason(code: int | None) -> str:
    """A metrics label for an error's exit code."""
    return {3: "auth", 4: "connect", 5: "integrity", 2: "usage"}.get(code or 1, "other")


class Metrics:
    """Prometheus metrics of one receiver: ``event`` counts its events; ``start`` serves them.

    ``snapshot`` returns the receiver's ``ReceiverSnapshot`` (sessions, streams); ``partials``
    returns the bytes its destination's partials hold."""

    def __init__(
        self, *, snapshot: Callable[[], Any], partials: Callable[[], int] | None = None
    ) -> None:
        try:
            import prometheus_client as prom
            from prometheus_client.core import GaugeMetricFamily
        except ImportError:
            raise UsageError(METRICS_HINT) from None
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.received_bytes = prom.Counter(
            "stx_received_bytes",
            "Bytes of file data received (resumed bytes are not counted again)",
            registry=self.registry,
        )
        self.completed = prom.Counter(
            "stx_transfers_completed",
            "Transfers (files or trees) completed",
            registry=self.registry,
        )
        self.failed = prom.Counter(
            "stx_transfers_failed",
            "Transfers that failed after they were accepted, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.refused = prom.Counter(
            "stx_handshakes_refused",
            "Connections refused or dropped before or at authentication, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._snapshot = snapshot
        self._partials = partials
        self._partial_cache: tuple[float, int] = (-1e9, 0)
        self._lock = threading.Lock()
        owner = self

        class _Gauges:
            def collect(self) -> Any:
                snap = owner._snapshot()
                yield GaugeMetricFamily(
                    "stx_active_sessions", "Transfers in progress", value=snap.sessions_active
                )
                yield GaugeMetricFamily(
                    "stx_active_streams", "Data streams being served", value=snap.streams_open
                )
                if owner._partials is not None:
                    yield GaugeMetricFamily(
                        "stx_partial_bytes",
                        "Bytes held in the destination's partial transfers, waiting for a resume",
                        value=owner.partial_bytes(),
                    )

        self.registry.register(_Gauges())
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def partial_bytes(self) -> int:
        assert self._partials is not None
        with self._lock:
            at, value = self._partial_cache
            now = time.monotonic()
            if now - at >= PARTIALS_TTL_S:
                try:
                    value = self._partials()
                except OSError:
                    pass
                self._partial_cache = (now, value)
            return value

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "received":
            self.completed.inc()
            self.received_bytes.inc(max(0, fields.get("bytes", 0) - fields.get("bytes_resumed", 0)))
        elif kind == "failed":
            self.failed.labels(failure_reason(fields.get("error_code"))).inc()
            got = fields.get("received_bytes")
            if got:
                self.received_bytes.inc(got)
        elif kind in ("rejected", "dropped"):
            self.refused.labels(
                failure_reason(fields.get("code")) if kind == "rejected" else "dropped"
            ).inc()

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Serve the metrics at ``http://HOST:PORT/metrics`` (bound to that address only); the
        address actually bound (port 0: one the system chose). UsageError if it cannot bind."""
        try:
            server, thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics {host}:{port}: cannot listen: {exc.strerror}") from None
        self._server, self._thread = server, thread
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
