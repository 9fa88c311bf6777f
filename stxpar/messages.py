"""The coordinator/worker protocol: one frozen dataclass per message, versioned, strictly decoded.

Theory of operation
-------------------
Coordinators and their workers exchange small messages: the sender's workers ask for work
(``Hello``, ``Get``) and are answered (``Setup``, ``Blocks``, ``Done``); they report what the
receiver acknowledged (``Acked``, ``Sent``, ``Retransmit``, ``WorkerError``) and
that they live (``Alive``). The receiver
hands a verified data stream to a worker (``StreamJob``, the socket itself travels beside it
by SCM_RIGHTS), cancels a session's streams (``Cancel``), and hears what landed (``Landed``,
``StreamFailed``, ``StreamClosed``) and that a worker lives (``Ready``, ``Beat``).

On the wire of a channel a message is the msgpack array ``[VERSION, TAG, field, ...]`` in the
dataclass's field order: only plain values (ints, floats, strings, bytes, bools, arrays) cross
the codec boundary; nested records (dataclasses) travel as arrays of their fields. ``decode``
is the one boundary where foreign input becomes a message: size and msgpack limits first,
then the version, the tag (only the kinds the caller expects), the number of fields and each
field's type; anything else is a ProtocolError, never another exception. The channel a
message crosses is another module's business (``stxpar.channel``): today a ZeroMQ ``ipc://``
socket in a private directory, later an authenticated and encrypted network channel; the
messages do not change with it.

Secrets: ``Setup.secret`` and ``StreamJob.secret`` are the stream secrets of one stream each
(never the PSK or the session's master secret): a worker holds the keys of its own streams
only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from .errors import ProtocolError
from .fileref import FileRef as FileRef

#: The protocol's version; a message of another version is refused.
VERSION = 1
#: The largest encoded message accepted (also ZeroMQ's MAXMSGSIZE on these sockets).
MAX_MESSAGE = 16 << 20
#: The most elements in any one array of a message (an ``Acked`` batch, a ``Blocks`` batch).
MAX_ARRAY = 1 << 20
#: The longest string (a path, an error message) and the longest byte string in a message.
MAX_STR = 64 << 10
MAX_BIN = 64 << 10


class Message:
    """Base of every message; ``TAG`` names the kind on the wire."""

    TAG: ClassVar[str] = ""


M = TypeVar("M", bound=Message)
_KINDS: dict[str, type[Message]] = {}


def message(tag: str) -> Callable[[type[M]], type[M]]:
    """Class decorator (over ``@dataclass(frozen=True)``): register a message kind as ``tag``."""

    def register(cls: type[M]) -> type[M]:
        if tag in _KINDS or not dataclasses.is_dataclass(cls):
            raise TypeError(f"message {tag!r}: a frozen dataclass, registered once")
        cls.TAG = tag
        _KINDS[tag] = cls
        return cls

    return register


# ``FileRef`` (``stxpar.fileref``) is the layout's row of a source file, not a message; it
# is named here too for the modules that know it from here.


# ------------------------------------------------------------------ sender coordinator <-> worker


@message("hello")
@dataclass(frozen=True)
class Hello(Message):
    """Worker -> coordinator, once: ready; asks for its ``Setup``."""

    slot: int


@message("get")
@dataclass(frozen=True)
class Get(Message):
    """Worker -> coordinator: the next batch of blocks, please."""

    slot: int


@message("setup")
@dataclass(frozen=True)
class Setup(Message):
    """Coordinator -> worker: the stream this worker drives and the files it reads.

    ``layout``: the path of the transfer's layout file (``stxpar.layout``) in the coordinator's
    private directory: the block space and, per entry, the source file (a ``FileRef``) its
    blocks are read from. ``manifest_id`` goes into every block's AAD."""

    stream: int
    secret: bytes = field(repr=False)  # a stream secret: never in a repr or a log
    session_id: bytes
    host: str
    port: int
    layout: str
    manifest_id: bytes
    rekey_records: int
    rekey_bytes: int
    connect_timeout: float


@message("blocks")
@dataclass(frozen=True)
class Blocks(Message):
    """Coordinator -> worker: send these blocks (then ask again); ``pace``: the bytes a second
    this worker's stream may send from now on (``--limit-rate``; 0: no limit)."""

    blocks: tuple[int, ...]
    pace: int = 0


@message("done")
@dataclass(frozen=True)
class Done(Message):
    """Coordinator -> worker: nothing more to send; finish the stream and exit."""


@message("acked")
@dataclass(frozen=True)
class Acked(Message):
    """Worker -> coordinator: the receiver acknowledged these blocks as durable, with the
    worker's digest of each (``b""`` for a block this worker never sent); ``sent``: the
    worker's running count of blocks sent."""

    slot: int
    blocks: tuple[tuple[int, bytes], ...]
    sent: int


@message("sent")
@dataclass(frozen=True)
class Sent(Message):
    """Worker -> coordinator, its last words: how many blocks it sent in all."""

    slot: int
    count: int


@message("retransmit")
@dataclass(frozen=True)
class Retransmit(Message):
    """Worker -> coordinator: the receiver asked for this block again (damaged in transit)."""

    slot: int
    seq: int


@message("error")
@dataclass(frozen=True)
class WorkerError(Message):
    """Worker -> coordinator: the worker's stream failed with this error (wire code)."""

    slot: int
    code: int
    message: str


@message("alive")
@dataclass(frozen=True)
class Alive(Message):
    """Worker -> coordinator, every half second on its report channel: this worker still runs
    (a worker silent for longer than the coordinator's limit is replaced like a dead one)."""

    slot: int


# ------------------------------------------------------------------ receiver coordinator <-> worker


@message("stream")
@dataclass(frozen=True)
class StreamJob(Message):
    """Coordinator -> worker, with the stream's socket (SCM_RIGHTS): land this stream's
    blocks in ``path``, but only if it is the inode ``inode`` (``None``: nothing to write,
    the transfer is already complete). ``tree``: ``path`` is a tree's staging directory and
    each entry's blocks go to the partial the layout names there; else ``path`` is the one
    file's partial. ``layout``: the transfer's layout file (``stxpar.layout``) in the
    receiver's private directory; ``manifest_id`` goes into every block's AAD."""

    session_id: bytes
    stream: int
    secret: bytes = field(repr=False)  # a stream secret: never in a repr or a log
    path: str
    tree: bool
    layout: str
    manifest_id: bytes
    rekey_records: int
    rekey_bytes: int
    sync_bytes: int
    streams: int
    inode: tuple[int, int] | None


@message("cancel")
@dataclass(frozen=True)
class Cancel(Message):
    """Coordinator -> worker: end every stream of this session now."""

    session_id: bytes


@message("prepare")
@dataclass(frozen=True)
class Prepare(Message):
    """Coordinator -> receiver worker: a session was admitted and its first streams come
    here: read its layout (``layout``, the file) now, before they arrive."""

    session_id: bytes
    layout: str


@message("pace")
@dataclass(frozen=True)
class Pace(Message):
    """Coordinator -> receiver worker: take in at most ``rate`` bytes a second over all its
    streams together (its share of ``stx recv --limit-rate``; 0: no limit)."""

    rate: int


@message("ready")
@dataclass(frozen=True)
class Ready(Message):
    """Worker -> coordinator, once: started."""


@message("beat")
@dataclass(frozen=True)
class Beat(Message):
    """Worker -> coordinator, every half second: this process still runs."""


@message("landed")
@dataclass(frozen=True)
class Landed(Message):
    """Worker -> coordinator: these blocks of the session are durable (index, digest)."""

    session_id: bytes
    stream: int
    blocks: tuple[tuple[int, bytes], ...]


@message("failed")
@dataclass(frozen=True)
class StreamFailed(Message):
    """Worker -> coordinator: the stream ended with this error (wire code)."""

    session_id: bytes
    stream: int
    code: int
    message: str


@message("closed")
@dataclass(frozen=True)
class StreamClosed(Message):
    """Worker -> coordinator: the stream ended cleanly (the sender closed it)."""

    session_id: bytes
    stream: int


# ------------------------------------------------------------------ cluster port (coordinator <-> helper)
# A helper (``stx worker --join``) relays between its own local workers and a coordinator on
# another host, over the CurveZMQ channel of ``stxpar.cluster_auth``; every message stays under
# ``MAX_CLUSTER``. A local worker's request or report travels whole, as its encoded bytes.


@message("c.join")
@dataclass(frozen=True)
class Join(Message):
    """Helper -> coordinator, first after the handshake: who it is and what it offers."""

    version: int
    host: str
    workers: int
    data_listen: str


@message("c.welcome")
@dataclass(frozen=True)
class Welcome(Message):
    """Coordinator -> helper: accepted, as a helper of this side (``"send"``; ``"recv"`` later)."""

    role: str


@message("c.layout")
@dataclass(frozen=True)
class LayoutPart(Message):
    """Coordinator -> helper: part ``index`` of the session's layout file (``index`` 0 starts a
    new one; ``last`` ends it)."""

    index: int
    last: bool
    data: bytes


@message("c.assign")
@dataclass(frozen=True)
class Assign(Message):
    """Coordinator -> helper, after a whole layout: start one worker for each of these slots."""

    slots: tuple[int, ...]


@message("c.stop")
@dataclass(frozen=True)
class Stop(Message):
    """Coordinator -> helper: stop the workers of these slots (SIGTERM)."""

    slots: tuple[int, ...]


@message("c.down")
@dataclass(frozen=True)
class Down(Message):
    """Coordinator -> helper: the answer (``encode``d ``Setup``/``Blocks``/``Done``) to the
    helper's local worker ``ident``."""

    ident: bytes
    body: bytes


@message("c.release")
@dataclass(frozen=True)
class Release(Message):
    """Coordinator -> helper: the transfer is over (stop every worker, wait for the next)."""


@message("c.up")
@dataclass(frozen=True)
class Up(Message):
    """Helper -> coordinator: a local worker's request (``Hello``/``Get``), ``ident`` its
    identity on the helper's own ROUTER."""

    ident: bytes
    body: bytes


@message("c.report")
@dataclass(frozen=True)
class Report(Message):
    """Helper -> coordinator: a local worker's report (``Acked``/``Sent``/``Alive``/...)."""

    body: bytes


@message("c.exited")
@dataclass(frozen=True)
class Exited(Message):
    """Helper -> coordinator: the worker of ``slot`` exited with ``status``."""

    slot: int
    status: int


@message("c.refuse")
@dataclass(frozen=True)
class Refuse(Message):
    """Helper -> coordinator: it cannot serve the assignment (why, in one line)."""

    reason: str


@message("c.bye")
@dataclass(frozen=True)
class Bye(Message):
    """Helper -> coordinator: leaving (its workers are stopped)."""


@message("c.beat")
@dataclass(frozen=True)
class HelperBeat(Message):
    """Helper -> coordinator, every ``cluster.BEAT_S``: still there."""


# A receiving helper (``Welcome("recv")``) accepts data streams on its own port: it gets, per
# session, the layout and the stream secrets of the streams routed to it, and relays its
# workers' reports (``Report``) whole.


@message("c.slayout")
@dataclass(frozen=True)
class SessionLayout(Message):
    """Receiver coordinator -> helper: part ``index`` of a session's layout file (``index`` 0
    starts it, ``last`` ends it)."""

    session_id: bytes
    index: int
    last: bool
    data: bytes


@message("c.offer")
@dataclass(frozen=True)
class StreamOffer(Message):
    """Receiver coordinator -> helper, after the session's layout: these streams of the session
    are routed to it, with their stream secrets (one each, in the order of ``streams``), and
    where their blocks land (``StreamJob``'s fields: ``path`` as the coordinator's host sees
    it, ``inode`` with its ``st_dev``, which the helper replaces with its own after checking
    the inode number)."""

    session_id: bytes
    streams: tuple[int, ...]
    secrets: tuple[bytes, ...] = field(repr=False)  # stream secrets: never in a repr or a log
    path: str
    tree: bool
    manifest_id: bytes
    rekey_records: int
    rekey_bytes: int
    sync_bytes: int
    nstreams: int
    inode: tuple[int, int] | None


@message("c.offered")
@dataclass(frozen=True)
class Offered(Message):
    """Receiving helper -> coordinator: the session's offer is in place (``ok``), or it cannot
    serve it (``reason``: the destination is not visible here)."""

    session_id: bytes
    ok: bool
    reason: str


@message("c.cancel")
@dataclass(frozen=True)
class RecvCancel(Message):
    """Receiver coordinator -> helper: the session is over; end its streams, forget its
    secrets."""

    session_id: bytes


#: The cluster port's messages, each way.
CLUSTER_UP: tuple[type[Message], ...] = (
    Join,
    Up,
    Report,
    Exited,
    Refuse,
    Bye,
    HelperBeat,
    Offered,
)
CLUSTER_DOWN: tuple[type[Message], ...] = (
    Welcome,
    LayoutPart,
    Assign,
    Stop,
    Down,
    Release,
    SessionLayout,
    StreamOffer,
    RecvCancel,
)
#: Largest cluster message (``cluster_auth.MAX_CLUSTER_MESSAGE``, 1 MiB; kept here so that the
#: codec does not import ZeroMQ); the byte strings inside may use nearly all of it.
MAX_CLUSTER = 1 << 20
#: Bytes of a layout file per ``LayoutPart``.
LAYOUT_PART = 512 << 10


#: What each side of each channel may receive.
SENDER_REQUESTS: tuple[type[Message], ...] = (Hello, Get)
SENDER_REPLIES: tuple[type[Message], ...] = (Setup, Blocks, Done)
SENDER_REPORTS: tuple[type[Message], ...] = (Acked, Sent, Retransmit, WorkerError, Alive)
RECEIVER_JOBS: tuple[type[Message], ...] = (StreamJob, Cancel, Pace, Prepare)
RECEIVER_REPORTS: tuple[type[Message], ...] = (Landed, StreamFailed, StreamClosed)
RECEIVER_LIVENESS: tuple[type[Message], ...] = (Ready, Beat)


# ------------------------------------------------------------------ codec


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_plain(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def encode(msg: Message) -> bytes:
    """The bytes of ``msg`` on a channel."""
    kind = _KINDS.get(msg.TAG)
    if kind is None or type(msg) is not kind:
        raise TypeError(f"not a registered message: {type(msg).__name__}")
    # msgpack packs tuples as arrays itself: only fields that hold records need _plain (a
    # report's batch of blocks is packed as it is, no Python object made per block).
    values = [
        _plain(getattr(msg, name)) if deep else getattr(msg, name) for name, deep in _layout(kind)
    ]
    return msgpack.packb([VERSION, msg.TAG, *values], use_bin_type=True)


_LAYOUTS: dict[type, tuple[tuple[str, bool], ...]] = {}


def _layout(cls: type) -> tuple[tuple[str, bool], ...]:
    """Each field's name, and whether its value may hold a record (a dataclass)."""
    got = _LAYOUTS.get(cls)
    if got is None:
        hints = _hints(cls)
        got = _LAYOUTS[cls] = tuple(
            (f.name, _holds_record(hints[f.name])) for f in dataclasses.fields(cls)
        )
    return got


def _holds_record(hint: Any) -> bool:
    if dataclasses.is_dataclass(hint):
        return True
    return any(_holds_record(a) for a in typing.get_args(hint) if a is not Ellipsis)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    got = _HINTS.get(cls)
    if got is None:
        got = _HINTS[cls] = typing.get_type_hints(cls)
    return got


def _build(cls: type, values: list[Any], what: str) -> Any:
    fields = dataclasses.fields(cls)
    if len(values) != len(fields):
        raise ProtocolError(f"{what}: {len(values)} fields, {len(fields)} expected")
    hints = _hints(cls)
    return cls(
        **{
            f.name: _convert(v, hints[f.name], f"{what}.{f.name}")
            for f, v in zip(fields, values, strict=True)
        }
    )


def _convert(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, option, what)
            except ProtocolError:
                pass
        raise ProtocolError(f"{what}: unexpected {type(value).__name__}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ProtocolError(f"{what}: an array expected")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            flat = _flat_record(args[0])
            if flat is not None:
                return _flat_records(value, flat, what)
            return tuple(_convert(v, args[0], f"{what}[]") for v in value)
        if len(value) != len(args):
            raise ProtocolError(f"{what}: {len(value)} elements, {len(args)} expected")
        return tuple(_convert(v, a, f"{what}[]") for v, a in zip(value, args, strict=True))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, list):
            raise ProtocolError(f"{what}: an array expected")
        return _build(hint, value, what)  # type: ignore[arg-type]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{what}: a number expected")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{what}: an integer expected")
        return value
    if hint in (str, bytes, bool):
        if type(value) is not hint:
            raise ProtocolError(f"{what}: {hint.__name__} expected")
        return value
    raise TypeError(f"{what}: unsupported field type {hint!r}")


def _flat_record(hint: Any) -> tuple[type, ...] | None:
    """The element types of a fixed tuple of ints, bytes and strings (a block and its
    digest), checked by ``_flat_records`` without a call per element; else None."""
    if typing.get_origin(hint) is not tuple:
        return None
    args = typing.get_args(hint)
    if not args or not all(a in (int, bytes, str) for a in args):
        return None
    return args


def _flat_records(value: list[Any], types: tuple[type, ...], what: str) -> tuple[Any, ...]:
    n = len(types)
    out = []
    for v in value:
        # type() is: exactly these types (a bool is no int here, as in _convert)
        if type(v) is not list or len(v) != n or any(map(_wrong_type, v, types)):
            names = ", ".join(t.__name__ for t in types)
            raise ProtocolError(f"{what}[]: an array of ({names}) expected")
        out.append(tuple(v))
    return tuple(out)


def _wrong_type(value: Any, kind: type) -> bool:
    return type(value) is not kind


def decode(
    data: bytes,
    *,
    expect: tuple[type[M], ...],
    max_size: int = MAX_MESSAGE,
    max_bin: int = MAX_BIN,
) -> M:
    """The message in ``data``, which must be one of the kinds in ``expect``; ProtocolError
    for anything else (too large, not msgpack, another version, an unexpected kind, wrong
    fields). ``max_size``/``max_bin``: the caps of another channel (``decode_cluster``)."""
    if len(data) > max_size:
        raise ProtocolError(f"worker message of {len(data)} bytes (at most {max_size})")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR,
            max_bin_len=max_bin,
            max_array_len=MAX_ARRAY,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception:  # msgpack raises many kinds; all mean the same here
        raise ProtocolError("malformed worker message") from None
    if not isinstance(obj, list) or len(obj) < 2:
        raise ProtocolError("malformed worker message")
    version, tag = obj[0], obj[1]
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(f"worker message of version {version!r} (this is {VERSION})")
    kind = _KINDS.get(tag) if isinstance(tag, str) else None
    if kind is None or kind not in expect:
        raise ProtocolError(f"unexpected worker message {tag!r}")
    return typing.cast(M, _build(kind, obj[2:], tag))


def decode_cluster(data: bytes, *, expect: tuple[type[M], ...]) -> M:
    """A cluster-port message (``CLUSTER_UP``/``CLUSTER_DOWN``): at most ``MAX_CLUSTER`` bytes."""
    return decode(data, expect=expect, max_size=MAX_CLUSTER, max_bin=MAX_CLUSTER)
