"""STX framing (version ``stx3``) and message codecs: bytes <-> frozen dataclasses, no I/O.

Every message on a TCP stream is one frame::

    u8  type
    u32 length            (big-endian, payload bytes that follow; checked against a cap
                           chosen by the receiving state *before* anything is allocated)
    ... payload

Handshake and control payloads are msgpack arrays with a fixed field order; msgpack sees only
plain tuples at this boundary and is decoded with hard limits. A BLOCK frame's payload is the
seed's fixed layout: ``u32 seq | u32 size | ciphertext[size] | tag[16] | crc32[4]``.
See docs/protocol.md for every layout.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ProtocolError, VersionError

#: Protocol version string, first field of INIT and SERVER_HELLO. "stx3": a transfer is a
#: manifest of entries (files, directories, symlinks) sent in MANIFEST chunks after METADATA, and
#: every block's AAD binds the manifest and the block's entry and offset; "stx2" sent one file
#: (16-byte XXH3-128 block digests; 1 had 32-byte BLAKE3). The key-schedule labels keep their
#: "stx1 " prefix (a namespace, not a version). A peer of another version fails at INIT with
#: "unsupported protocol version".
VERSION = "stx3"
#: The only cipher suite of this protocol version (no negotiation, nothing to downgrade).
SUITE = "x25519-hkdf-sha256-aes256gcm"

HEADER = struct.Struct(">BI")
BLOCK_HEADER = struct.Struct(">II")
CRC = struct.Struct(">I")
TAG_LEN = 16
NONCE_LEN = 32
PUBKEY_LEN = 32
MAC_LEN = 32
DIGEST_LEN = 32  # the whole-file digest (END, RECEIPT)
BLOCK_DIGEST_LEN = 16  # one block's digest (METADATA_ACK, the state log)

#: Caps on payload length, enforced before allocation.
MAX_HANDSHAKE_PAYLOAD = 512
MAX_CONTROL_PAYLOAD = 72 << 20  # METADATA_ACK: bitmap + 16 bytes per held block
MAX_ACK_PAYLOAD = 64 << 10
MAX_NAME_BYTES = 1024
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 64 << 20
MAX_STREAMS = 4096
#: Blocks per file. Bounds the per-transfer memory of each side's block ledger (17 bytes a
#: block: a have byte and a 16-byte digest, ``blocks.BlockLedger``) and the METADATA_ACK
#: (bitmap + 16-byte digest per held block): 4 Mi blocks = 16 TiB at 4 MiB blocks.
MAX_BLOCKS = 1 << 22


class FrameType(enum.IntEnum):
    INIT = 0x00
    SERVER_HELLO = 0x01
    CLIENT_HELLO = 0x02
    CLIENT_AUTH = 0x03
    SERVER_AUTH = 0x04
    KEY_NEGOTIATION = 0x05
    KEY_CONFIRMATION = 0x06
    METADATA = 0x07
    METADATA_ACK = 0x08
    END = 0x09
    RECEIPT = 0x0A
    MANIFEST = 0x0B
    ROUTES = 0x0C
    ERROR = 0x0F
    JOIN = 0x10
    BLOCK = 0x11
    ACK = 0x12


def encode_frame(ftype: FrameType, payload: bytes) -> bytes:
    return HEADER.pack(ftype, len(payload)) + payload


def parse_header(
    header: bytes | memoryview, *, cap: Callable[[FrameType], int]
) -> tuple[FrameType, int]:
    """Decode a 5-byte frame header; reject unknown types and lengths above ``cap(type)``."""
    raw_type, length = HEADER.unpack(header)
    try:
        ftype = FrameType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown frame type 0x{raw_type:02x}") from None
    limit = cap(ftype)
    if length > limit:
        raise ProtocolError(f"{ftype.name} frame of {length} bytes exceeds the limit of {limit}")
    return ftype, length


class FrameBuffer:
    """Sans-IO frame reassembly: ``feed`` bytes, then take whole frames with ``next_frame``."""

    def __init__(self, *, cap: Callable[[FrameType], int]) -> None:
        self._buf = bytearray()
        self._cap = cap

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> tuple[FrameType, bytes] | None:
        if len(self._buf) < HEADER.size:
            return None
        ftype, length = parse_header(bytes(self._buf[: HEADER.size]), cap=self._cap)
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size : end])
        del self._buf[:end]
        return ftype, payload

    @property
    def pending(self) -> int:
        return len(self._buf)


# ---------------------------------------------------------------- field checks


def _unpack(payload: bytes, n: int, what: str) -> list[Any]:
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_CONTROL_PAYLOAD,
            max_bin_len=MAX_CONTROL_PAYLOAD,
            max_array_len=1 << 20,
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError...
        raise ProtocolError(f"malformed {what} message") from exc
    if not isinstance(obj, list) or len(obj) != n:
        raise ProtocolError(f"malformed {what} message")
    return obj


def _pack(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def _bin(value: Any, what: str, *, size: int | None = None, max_size: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{what}: expected bytes")
    if size is not None and len(value) != size:
        raise ProtocolError(f"{what}: expected {size} bytes")
    if max_size is not None and len(value) > max_size:
        raise ProtocolError(f"{what}: too long")
    return value


def _int(value: Any, what: str, *, lo: int = 0, hi: int = (1 << 64) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"{what}: out of range")
    return value


def _str(value: Any, what: str, *, max_len: int) -> str:
    if not isinstance(value, str) or len(value.encode()) > max_len:
        raise ProtocolError(f"{what}: bad string")
    return value


def _expect(value: Any, expected: str, what: str) -> None:
    if value != expected:
        if what == "protocol version" and isinstance(value, str) and len(value) <= 16:
            raise VersionError(
                f"unsupported protocol version {printable(value)!r}: this side speaks"
                f" {expected}; upgrade stxpar on the older side"
            )
        raise ProtocolError(f"unsupported {what}")


# ---------------------------------------------------------------- handshake messages


@dataclass(frozen=True)
class Init:
    """The seed's "Init Connection": the client speaks first on every TCP stream."""

    def encode(self) -> bytes:
        return _pack(VERSION)

    @classmethod
    def decode(cls, payload: bytes) -> Init:
        (v,) = _unpack(payload, 1, "Init")
        _expect(v, VERSION, "protocol version")
        return cls()


@dataclass(frozen=True)
class ServerHello:
    nonce: bytes
    time_ms: int

    def encode(self) -> bytes:
        return _pack(VERSION, SUITE, self.nonce, self.time_ms)

    @classmethod
    def decode(cls, payload: bytes) -> ServerHello:
        v, suite, nonce, t = _unpack(payload, 4, "ServerHello")
        _expect(v, VERSION, "protocol version")
        _expect(suite, SUITE, "cipher suite")
        return cls(_bin(nonce, "nonce", size=NONCE_LEN), _int(t, "time"))


@dataclass(frozen=True)
class ClientHello:
    key_id: bytes
    nonce: bytes
    time_ms: int

    def encode(self) -> bytes:
        return _pack(VERSION, SUITE, self.key_id, self.nonce, self.time_ms)

    @classmethod
    def decode(cls, payload: bytes) -> ClientHello:
        v, suite, key_id, nonce, t = _unpack(payload, 5, "ClientHello")
        _expect(v, VERSION, "protocol version")
        _expect(suite, SUITE, "cipher suite")
        return cls(
            _bin(key_id, "key id", size=8), _bin(nonce, "nonce", size=NONCE_LEN), _int(t, "time")
        )


@dataclass(frozen=True)
class MacOnly:
    """ClientAuth and ServerAuth: a single MAC over the transcript hash."""

    mac: bytes

    def encode(self) -> bytes:
        return _pack(self.mac)

    @classmethod
    def decode(cls, payload: bytes) -> MacOnly:
        (m,) = _unpack(payload, 1, "Auth")
        return cls(_bin(m, "mac", size=MAC_LEN))


@dataclass(frozen=True)
class KeyShare:
    """KeyNegotiation (client's ephemeral) and KeyConfirmation (server's): a public key + MAC."""

    public: bytes
    mac: bytes

    def encode(self) -> bytes:
        return _pack(self.public, self.mac)

    @classmethod
    def decode(cls, payload: bytes) -> KeyShare:
        pub, m = _unpack(payload, 2, "KeyShare")
        return cls(_bin(pub, "public key", size=PUBKEY_LEN), _bin(m, "mac", size=MAC_LEN))


@dataclass(frozen=True)
class ErrorMsg:
    """An ERROR frame. Unauthenticated: it can only make a peer give up, never succeed."""

    code: int
    message: str

    def encode(self) -> bytes:
        return _pack(self.code, self.message.encode()[:300].decode(errors="ignore"))

    @classmethod
    def decode(cls, payload: bytes) -> ErrorMsg:
        code, message = _unpack(payload, 2, "Error")
        text = printable(_str(message, "message", max_len=800))
        return cls(_int(code, "code", hi=255), text)


# ---------------------------------------------------------------- control messages (sealed)


@dataclass(frozen=True)
class MetadataAck:
    """The receiver's answer: the bitmap of blocks it already holds durably (bit i of byte
    i // 8, least significant first) and their digests, in block order."""

    have: bytes
    digests: bytes = b""

    def encode(self) -> bytes:
        return _pack(self.have, self.digests)

    @classmethod
    def decode(cls, payload: bytes) -> MetadataAck:
        have, digests = _unpack(payload, 2, "MetadataAck")
        return cls(
            _bin(have, "bitmap", max_size=(MAX_BLOCKS + 7) // 8),
            _bin(digests, "digests", max_size=MAX_CONTROL_PAYLOAD),
        )

    def held(self, total_blocks: int) -> list[int]:
        """Indices of the blocks the receiver holds; ProtocolError if inconsistent."""
        if len(self.have) != (total_blocks + 7) // 8:
            raise ProtocolError("resume bitmap has the wrong length")
        held = [i for i in range(total_blocks) if self.have[i // 8] >> (i % 8) & 1]
        if total_blocks % 8 and self.have[-1] >> (total_blocks % 8):
            raise ProtocolError("resume bitmap marks blocks past the end")
        if len(self.digests) != BLOCK_DIGEST_LEN * len(held):
            raise ProtocolError("resume digests do not match the bitmap")
        return held


def bitmap(have: bytearray | bytes) -> bytes:
    """One byte per block (0/1) -> packed bitmap, least significant bit first."""
    out = bytearray((len(have) + 7) // 8)
    for i, v in enumerate(have):
        if v:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


@dataclass(frozen=True)
class End:
    """Sender: every block was acknowledged; this is the whole-file digest."""

    total_blocks: int
    digest: bytes

    def encode(self) -> bytes:
        return _pack(self.total_blocks, self.digest)

    @classmethod
    def decode(cls, payload: bytes) -> End:
        n, d = _unpack(payload, 2, "End")
        return cls(_int(n, "blocks", hi=MAX_BLOCKS), _bin(d, "digest", size=DIGEST_LEN))


@dataclass(frozen=True)
class Receipt:
    """Receiver: the file is complete, durable, verified and renamed to its final name."""

    digest: bytes
    size: int

    def encode(self) -> bytes:
        return _pack(self.digest, self.size)

    @classmethod
    def decode(cls, payload: bytes) -> Receipt:
        d, size = _unpack(payload, 2, "Receipt")
        return cls(_bin(d, "digest", size=DIGEST_LEN), _int(size, "size", hi=1 << 62))


# ---------------------------------------------------------------- data stream messages


@dataclass(frozen=True)
class Join:
    """First frame on a data stream: which session and stream, and proof of the stream key."""

    session_id: bytes
    stream: int
    mac: bytes

    def encode(self) -> bytes:
        return _pack(VERSION, self.session_id, self.stream, self.mac)

    @classmethod
    def decode(cls, payload: bytes) -> Join:
        v, sid, stream, m = _unpack(payload, 4, "Join")
        _expect(v, VERSION, "protocol version")
        return cls(
            _bin(sid, "session id", size=16),
            _int(stream, "stream", hi=MAX_STREAMS - 1),
            _bin(m, "mac", size=MAC_LEN),
        )


#: The most helper addresses one ROUTES names, and the longest ``host:port`` among them.
MAX_ROUTE_PLACES = 255
MAX_ROUTE_ADDRESS = 300
#: ROUTES' cap: every place and a table entry for every stream id.
MAX_ROUTES_PAYLOAD = 128 << 10


def _route_address(value: Any) -> str:
    """A place of ROUTES: ``host:port`` (``[v6]:port``), port 1-65535."""
    text = _str(value, "route", max_len=MAX_ROUTE_ADDRESS)
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError("Routes: a place is not host:port")
    if any(not c.isprintable() or c.isspace() for c in host):
        raise ProtocolError("Routes: a place is not host:port")
    return text


@dataclass(frozen=True)
class Routes:
    """Receiver -> sender, sealed on the control connection: where each data stream goes.

    ``table[s]`` is 0 for stream ``s`` going to the receiver's own address (the one the
    control connection reached) or ``k`` for ``places[k - 1]`` (a receiving helper's
    ``host:port``); a stream id beyond the table goes to the receiver's own address."""

    places: tuple[str, ...]
    table: bytes

    def encode(self) -> bytes:
        return _pack(list(self.places), self.table)

    @classmethod
    def decode(cls, payload: bytes) -> Routes:
        places, table = _unpack(payload, 2, "Routes")
        if not isinstance(places, list) or len(places) > MAX_ROUTE_PLACES:
            raise ProtocolError("Routes: bad places")
        got = tuple(_route_address(p) for p in places)
        table = _bin(table, "route table", max_size=MAX_STREAMS)
        if any(k > len(got) for k in table):
            raise ProtocolError("Routes: a stream routed to no place")
        return cls(got, table)

    def place(self, stream: int) -> str | None:
        """Where stream ``stream`` goes: a ``host:port``, or None for the receiver itself."""
        if 0 <= stream < len(self.table) and self.table[stream]:
            return self.places[self.table[stream] - 1]
        return None


@dataclass(frozen=True)
class Ack:
    """Receiver worker -> sender worker: blocks now durable, and blocks to send again (CRC)."""

    durable: tuple[int, ...]
    resend: tuple[int, ...]

    def encode(self) -> bytes:
        return _pack(list(self.durable), list(self.resend))

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        durable, resend = _unpack(payload, 2, "Ack")
        if not isinstance(durable, list) or not isinstance(resend, list):
            raise ProtocolError("malformed Ack message")
        return cls(
            tuple(_int(x, "block", hi=MAX_BLOCKS) for x in durable),
            tuple(_int(x, "block", hi=MAX_BLOCKS) for x in resend),
        )


def printable(text: str) -> str:
    """Peer-supplied text made safe for a terminal or a log line (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def blocks_for(size: int, block_size: int) -> int:
    """Number of blocks of a file; an empty file still has zero blocks."""
    return (size + block_size - 1) // block_size


def block_len(*, index: int, size: int, block_size: int) -> int:
    return min(block_size, size - index * block_size)


def held_bytes(held: bytes | bytearray, *, size: int, block_size: int) -> int:
    """Bytes covered by the blocks marked (non-zero) in a one-byte-per-block map."""
    count = len(held) - bytes(held).count(0)
    if count and held[-1]:  # the last block may be short
        return (count - 1) * block_size + block_len(
            index=len(held) - 1, size=size, block_size=block_size
        )
    return count * block_size
