"""Record protection after the handshake: sealed control messages, data blocks, acks, joins.

Theory of operation
-------------------
Each direction of each channel has its own key and an implicit record counter that both ends
advance in lockstep (TCP is ordered), so nonces never travel and never repeat: the nonce of
record ``n`` is ``iv XOR n``. A dropped, replayed, reordered or moved record therefore fails its
tag. Data streams ratchet to a new epoch key after ``rekey_records`` records or
``rekey_bytes`` ciphertext bytes; both ends count the same records and switch together.

A data block on the wire is ``BLOCK | u32 seq | u32 size | ct | tag | crc32(seq..tag)``. The
AAD binds the version, session, stream, epoch, block index, block length, total blocks, the
manifest's id, and the entry and file offset the block belongs to. The CRC (over the block header, ciphertext and tag, so it says nothing about the plaintext)
separates damage in transit (CRC wrong: ask again, or drop the stream if the header itself is
damaged) from forgery (CRC right, tag wrong: end the session).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import keyschedule as ks
from .blocks import BlockRef, BlockSpace
from .errors import AuthError, ProtocolError
from .wire import BLOCK_HEADER, CRC, HEADER, TAG_LEN, FrameType, encode_frame

try:  # ISA-L's CRC-32: identical results to zlib.crc32, several times faster
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # pragma: no cover - platforms without an isal wheel
    _fast_crc32 = zlib.crc32

crc32 = _fast_crc32

#: Bytes in front of the ciphertext in a BLOCK frame (frame header + block header).
BLOCK_PREFIX = HEADER.size + BLOCK_HEADER.size
#: Bytes after the ciphertext (tag + CRC).
BLOCK_SUFFIX = TAG_LEN + CRC.size

_AAD_BLOCK = struct.Struct(">16sIIIIQ16sIQ")


class CrcMismatch(Exception):
    """The block was damaged in transit (not an attack): ask for it again."""

    def __init__(self, seq: int) -> None:
        super().__init__(f"CRC mismatch on block {seq}")
        self.seq = seq


@dataclass(frozen=True)
class BlockContext:
    """What a data stream's records are bound to (goes into every block's AAD)."""

    session_id: bytes
    stream: int
    #: the transfer's blocks (``blocks.BlockSpace`` of its manifest)
    space: BlockSpace
    #: the manifest's id (``manifest.Manifest.id``, 16 bytes)
    manifest_id: bytes
    rekey_records: int = ks.MAX_RECORDS_PER_KEY
    rekey_bytes: int = ks.MAX_BYTES_PER_KEY

    @property
    def block_size(self) -> int:
        return self.space.block_size

    @property
    def total_blocks(self) -> int:
        return self.space.total


class _EpochKeys:
    """Current epoch's AEAD and counters for one stream direction; ratchets at the limits."""

    def __init__(self, *, stream_secret: bytes, ctx: BlockContext) -> None:
        self._secret = stream_secret
        self._ctx = ctx
        self.epoch = 0
        self._load()

    def _load(self) -> None:
        keys = ks.derive_stream_keys(stream_secret=self._secret)
        self.aead = AESGCM(keys.data_key)
        self.iv = keys.data_iv
        self.records = 0
        self.bytes = 0

    def next_nonce(self, ct_len: int) -> bytes:
        """Nonce for the next record, ratcheting first if this record would pass a limit."""
        ctx = self._ctx
        if self.records >= ctx.rekey_records or (
            self.records and self.bytes + ct_len > ctx.rekey_bytes
        ):
            self._secret = ks.ratchet(stream_secret=self._secret)
            self.epoch += 1
            self._load()
        n = ks.nonce(iv=self.iv, counter=self.records)
        self.records += 1
        self.bytes += ct_len
        return n

    def aad(self, seq: int, size: int, entry: int, offset: int) -> bytes:
        ctx = self._ctx
        return b"stx3 block" + _AAD_BLOCK.pack(
            ctx.session_id,
            ctx.stream,
            self.epoch,
            seq,
            size,
            ctx.total_blocks,
            ctx.manifest_id,
            entry,
            offset,
        )


class BlockSealer:
    """Sender side of one data stream: seals blocks into a reused output buffer."""

    def __init__(self, *, stream_secret: bytes, ctx: BlockContext) -> None:
        self._keys = _EpochKeys(stream_secret=stream_secret, ctx=ctx)
        self._ctx = ctx
        self.out = bytearray(BLOCK_PREFIX + ctx.block_size + BLOCK_SUFFIX)
        self._view = memoryview(self.out)

    @property
    def epoch(self) -> int:
        return self._keys.epoch

    def seal(
        self, seq: int, plaintext: memoryview | bytes, *, entry: int | None = None, offset: int = 0
    ) -> memoryview:
        """Return a view of the whole BLOCK frame for block ``seq`` (valid until the next call);
        ``entry`` and ``offset``: where the block lies (``BlockSpace.locate``), if known."""
        size = len(plaintext)
        if size > self._ctx.block_size:
            raise ValueError("block larger than the block size")
        if entry is None:
            where = self._ctx.space.locate(seq)
            entry, offset = where.entry, where.offset
        keys = self._keys
        nonce = keys.next_nonce(size + TAG_LEN)
        end_ct = BLOCK_PREFIX + size + TAG_LEN
        HEADER.pack_into(self.out, 0, FrameType.BLOCK, BLOCK_HEADER.size + size + BLOCK_SUFFIX)
        BLOCK_HEADER.pack_into(self.out, HEADER.size, seq, size)
        sealed = self._view[BLOCK_PREFIX:end_ct]
        keys.aead.encrypt_into(nonce, plaintext, keys.aad(seq, size, entry, offset), sealed)
        CRC.pack_into(self.out, end_ct, crc32(self._view[HEADER.size : end_ct]))
        return self._view[: end_ct + CRC.size]


class BlockOpener:
    """Receiver side of one data stream: checks CRC, then tag, decrypting into a reused buffer."""

    def __init__(self, *, stream_secret: bytes, ctx: BlockContext) -> None:
        self._keys = _EpochKeys(stream_secret=stream_secret, ctx=ctx)
        self._ctx = ctx
        self.plain = bytearray(ctx.block_size)
        self._plain_view = memoryview(self.plain)

    @property
    def epoch(self) -> int:
        return self._keys.epoch

    def _check_header(self, seq: int, size: int, body_len: int) -> BlockRef | None:
        if seq >= self._ctx.total_blocks:
            return None
        where = self._ctx.space.locate(seq)
        if size == where.length and body_len == BLOCK_HEADER.size + size + BLOCK_SUFFIX:
            return where
        return None

    def open(self, body: memoryview) -> tuple[BlockRef, memoryview]:
        """``body`` is a BLOCK payload: ``seq | size | ct | tag | crc``. Returns (where the block
        lies, plaintext view valid until the next call).

        The CRC covers everything before it. Raises CrcMismatch when it fails on a block whose
        header is still plausible (damage: ask for that block again), ProtocolError when the
        frame is damaged beyond that or malformed (the stream is dropped and replaced), and
        AuthError when the CRC is right but the tag is not (forgery: end the session). The
        record counter advances in every case, as it did on the sender.
        """
        if len(body) < BLOCK_HEADER.size + BLOCK_SUFFIX:
            raise ProtocolError("short BLOCK frame")
        seq, size = BLOCK_HEADER.unpack_from(body)
        plausible = self._check_header(seq, size, len(body))
        keys = self._keys
        nonce = keys.next_nonce(max(0, len(body) - BLOCK_HEADER.size - CRC.size))
        (crc,) = CRC.unpack_from(body, len(body) - CRC.size)
        if crc32(body[: len(body) - CRC.size]) != crc:
            if plausible is not None:
                raise CrcMismatch(seq)
            raise ProtocolError("damaged BLOCK frame header")
        if plausible is None:
            raise ProtocolError(f"block {seq} has a bad index or length")
        sealed = body[BLOCK_HEADER.size : BLOCK_HEADER.size + size + TAG_LEN]
        out = self._plain_view[:size]
        aad = keys.aad(seq, size, plausible.entry, plausible.offset)
        try:
            keys.aead.decrypt_into(nonce, sealed, aad, out)
        except InvalidTag:
            raise AuthError(f"block {seq} failed authentication (forged or altered data)") from None
        return plausible, out


class AckChannel:
    """MAC'd acks from the receiver worker to the sender worker, with an implicit counter."""

    def __init__(self, *, stream_secret: bytes, ctx: BlockContext) -> None:
        self._key = ks.derive_stream_keys(stream_secret=stream_secret).ack_key
        self._prefix = ctx.session_id + struct.pack(">I", ctx.stream)
        self._counter = 0

    def _data(self, body: bytes) -> bytes:
        data = self._prefix + struct.pack(">Q", self._counter) + body
        self._counter += 1
        return data

    def seal(self, body: bytes) -> bytes:
        return encode_frame(
            FrameType.ACK, body + ks.mac(key=self._key, label="ack", data=self._data(body))
        )

    def open(self, payload: bytes) -> bytes:
        if len(payload) < ks.HASH_LEN:
            raise ProtocolError("short ACK frame")
        body, tag = payload[: -ks.HASH_LEN], payload[-ks.HASH_LEN :]
        try:
            ks.verify_mac(key=self._key, label="ack", data=self._data(body), tag=tag)
        except ValueError:
            raise AuthError("forged or replayed acknowledgement") from None
        return body


def join_mac(*, stream_secret: bytes, session_id: bytes, stream: int) -> bytes:
    key = ks.derive_join_key(stream_secret=stream_secret)
    return ks.mac(key=key, label="join", data=session_id + struct.pack(">I", stream))


def verify_join(*, stream_secret: bytes, session_id: bytes, stream: int, tag: bytes) -> None:
    key = ks.derive_join_key(stream_secret=stream_secret)
    try:
        ks.verify_mac(key=key, label="join", data=session_id + struct.pack(">I", stream), tag=tag)
    except ValueError:
        raise AuthError("data stream failed to prove its key") from None


class ControlChannel:
    """Sealed control messages (metadata, end, receipt) in one direction pair."""

    def __init__(self, *, session: ks.SessionKeys, client: bool) -> None:
        c2s = (AESGCM(session.ctl_c2s_key), session.ctl_c2s_iv)
        s2c = (AESGCM(session.ctl_s2c_key), session.ctl_s2c_iv)
        self._send, self._recv = (c2s, s2c) if client else (s2c, c2s)
        self._sid = session.session_id
        self._sent = 0
        self._received = 0

    def _aad(self, ftype: FrameType) -> bytes:
        return b"stx1 control" + self._sid + bytes([ftype])

    def seal(self, ftype: FrameType, body: bytes) -> bytes:
        aead, iv = self._send
        ct = aead.encrypt(ks.nonce(iv=iv, counter=self._sent), body, self._aad(ftype))
        self._sent += 1
        return encode_frame(ftype, ct)

    def open(self, ftype: FrameType, payload: bytes) -> bytes:
        aead, iv = self._recv
        try:
            body = aead.decrypt(ks.nonce(iv=iv, counter=self._received), payload, self._aad(ftype))
        except InvalidTag:
            raise AuthError(f"{ftype.name} failed authentication") from None
        self._received += 1
        return body
