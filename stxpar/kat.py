"""Known-answer vectors for STX (version ``stx3``): one complete handshake, a one-file manifest and
its first data block, fixed inputs.

``python -m stxpar.kat > docs/known-answers.json`` regenerates the published file;
``tests/unit/test_kat.py`` checks that the code still produces it, and re-derives some values
with raw ``cryptography``/``hmac`` primitives. Every input is fixed (PSK, both nonces, both
X25519 ephemeral private keys, both clocks, the manifest's one entry and the plaintext), so the output is
fully deterministic. The key material here is public test data: never use it for a transfer.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import keyschedule as ks
from .blocks import BlockSpace
from .handshake import ClientHandshake, ServerHandshake, State, keyring_for, x25519_shared
from .manifest import Entry, Kind, Manifest
from .records import BLOCK_PREFIX, BLOCK_SUFFIX, BlockContext, BlockSealer, join_mac
from .wire import BLOCK_HEADER, HEADER, SUITE, VERSION, FrameType

DESCRIPTION = (
    "STX stx3 known-answer vectors: a complete in-memory handshake between ClientHandshake and "
    "ServerHandshake with fixed inputs (PSK, client and server nonces, X25519 ephemeral private "
    "keys, timestamps), every handshake frame as sent (5-byte header + msgpack payload) with the "
    "transcript hash (SHA-256 of all frames so far) after it, every derived key, a manifest of "
    "one FILE entry (its canonical msgpack encoding, digest = SHA-256('stx3 manifest' || u32 "
    "block size || entries) and id = digest[:16]), and the first sealed BLOCK frame of stream 0 "
    "(epoch 0, record counter 0; its AAD binds the manifest id, entry 0 and file offset 0; its "
    "CRC-32 covers the block header, ciphertext and tag), and the block space of a small "
    "tree's data extents with small files packed (per block: first entry, entries, offset in "
    "the entry's file, length). Byte strings are lowercase "
    "hex. Test data only: never use these keys. Regenerate with "
    "'python -m stxpar.kat > docs/known-answers.json'; tests/unit/test_kat.py checks that the "
    "code still produces exactly this file."
)

PSK = bytes(range(0x00, 0x20))
CLIENT_NONCE = bytes(range(0x20, 0x40))
SERVER_NONCE = bytes(range(0x40, 0x60))
CLIENT_EPHEMERAL = bytes(range(0x60, 0x80))
SERVER_EPHEMERAL = bytes(range(0x80, 0xA0))
CLIENT_TIME_MS = 1_700_000_000_000
SERVER_TIME_MS = 1_700_000_000_250
STREAM = 0
FILE_ID = bytes(range(0xA0, 0xB0))
FILE_NAME = "known-answer.bin"
FILE_SIZE = 100
FILE_MODE = 0o644
FILE_MTIME_NS = 1_700_000_000_000_000_000
BLOCK_SIZE = 4096
BLOCK_SEQ = 0
PLAINTEXT = bytes(range(FILE_SIZE))

_DIRECTION = {
    FrameType.INIT: "client->server",
    FrameType.SERVER_HELLO: "server->client",
    FrameType.CLIENT_HELLO: "client->server",
    FrameType.CLIENT_AUTH: "client->server",
    FrameType.SERVER_AUTH: "server->client",
    FrameType.KEY_NEGOTIATION: "client->server",
    FrameType.KEY_CONFIRMATION: "server->client",
}


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _run_handshake() -> tuple[list[bytes], ks.SessionKeys]:
    """Both machines in memory; returns every frame in wire order and the shared session."""
    client = ClientHandshake(
        psk=PSK, now_ms=CLIENT_TIME_MS, nonce=CLIENT_NONCE, ephemeral=CLIENT_EPHEMERAL
    )
    server = ServerHandshake(
        keyring=keyring_for([PSK]),
        now_ms=SERVER_TIME_MS,
        nonce=SERVER_NONCE,
        ephemeral=SERVER_EPHEMERAL,
    )
    frames: list[bytes] = []
    pending: list[tuple[ClientHandshake | ServerHandshake, bytes]] = [
        (server, f) for f in client.start()
    ]
    while pending:
        receiver, frame = pending.pop(0)
        frames.append(frame)
        ftype, length = HEADER.unpack_from(frame)
        if length != len(frame) - HEADER.size:
            raise RuntimeError("handshake produced a malformed frame")
        peer = client if receiver is server else server
        out = receiver.receive(FrameType(ftype), frame[HEADER.size :], now_ms=SERVER_TIME_MS)
        pending.extend((peer, f) for f in out)
    if client.state is not State.ESTABLISHED or server.state is not State.ESTABLISHED:
        raise RuntimeError("known-answer handshake did not complete")
    if client.session != server.session or client.session is None:
        raise RuntimeError("known-answer handshake gave the two sides different keys")
    if client.transcript_hash != server.transcript_hash:
        raise RuntimeError("known-answer handshake gave the two sides different transcripts")
    return frames, client.session


def compute_known_answers() -> dict[str, Any]:
    """Run the fixed handshake and first block; return every value as hex (ints as ints)."""
    frames, session = _run_handshake()

    handshake = []
    th = hashlib.sha256()
    for frame in frames:
        th.update(frame)
        ftype = FrameType(frame[0])
        handshake.append(
            {
                "type": ftype.name,
                "direction": _DIRECTION[ftype],
                "frame": frame.hex(),
                "transcript_hash": th.hexdigest(),
            }
        )

    psk_keys = ks.derive_psk_keys(psk=PSK)
    shared = x25519_shared(
        X25519PrivateKey.from_private_bytes(CLIENT_EPHEMERAL), _public(SERVER_EPHEMERAL)
    )
    stream_secret = session.stream_secret(STREAM)
    stream_keys = ks.derive_stream_keys(stream_secret=stream_secret)
    epoch1 = ks.ratchet(stream_secret=stream_secret)
    epoch1_keys = ks.derive_stream_keys(stream_secret=epoch1)

    entry = Entry(
        Kind.FILE,
        FILE_NAME,
        FILE_SIZE,
        FILE_MODE,
        FILE_MTIME_NS,
        extents=(0, FILE_SIZE),
        file_id=FILE_ID,
    )
    manifest = Manifest([entry], block_size=BLOCK_SIZE)
    where = manifest.space.locate(BLOCK_SEQ)
    ctx = BlockContext(
        session_id=session.session_id,
        stream=STREAM,
        space=manifest.space,
        manifest_id=manifest.id,
    )
    frame = bytes(BlockSealer(stream_secret=stream_secret, ctx=ctx).seal(BLOCK_SEQ, PLAINTEXT))
    sealed = frame[BLOCK_PREFIX : len(frame) - 4]
    tag_len = BLOCK_SUFFIX - 4
    # The AAD as documented in stxpar/records.py (version label, session, stream, epoch,
    # index, length, total blocks, manifest id, entry, offset in the file); checked against the
    # sealed block below.
    aad = b"stx3 block" + struct.pack(
        ">16sIIIIQ16sIQ",
        session.session_id,
        STREAM,
        0,
        BLOCK_SEQ,
        FILE_SIZE,
        ctx.total_blocks,
        manifest.id,
        where.entry,
        where.offset,
    )
    block_nonce = ks.nonce(iv=stream_keys.data_iv, counter=0)
    if AESGCM(stream_keys.data_key).decrypt(block_nonce, sealed, aad) != PLAINTEXT:
        raise RuntimeError("first block does not match its documented nonce and AAD")
    # The CRC-32 as documented: over the block header, ciphertext and tag (seq | size | ct | tag).
    crc_input = BLOCK_HEADER.pack(BLOCK_SEQ, FILE_SIZE) + sealed
    if struct.pack(">I", zlib.crc32(crc_input)) != frame[-4:]:
        raise RuntimeError("first block's CRC does not cover its documented bytes")

    return {
        "description": DESCRIPTION,
        "protocol": {"version": VERSION, "suite": SUITE},
        "inputs": {
            "psk": PSK.hex(),
            "client_nonce": CLIENT_NONCE.hex(),
            "server_nonce": SERVER_NONCE.hex(),
            "client_ephemeral_private": CLIENT_EPHEMERAL.hex(),
            "server_ephemeral_private": SERVER_EPHEMERAL.hex(),
            "client_ephemeral_public": _public(CLIENT_EPHEMERAL).hex(),
            "server_ephemeral_public": _public(SERVER_EPHEMERAL).hex(),
            "client_time_ms": CLIENT_TIME_MS,
            "server_time_ms": SERVER_TIME_MS,
        },
        "handshake": handshake,
        "manifest": {
            "block_size": BLOCK_SIZE,
            "entry": {
                "kind": "FILE",
                "path": FILE_NAME,
                "size": FILE_SIZE,
                "mode": FILE_MODE,
                "mtime_ns": FILE_MTIME_NS,
                "link": "",
                "extents": [0, FILE_SIZE],
                "file_id": FILE_ID.hex(),
            },
            "entry_encoding": entry.canonical().hex(),
            "digest": manifest.digest.hex(),
            "id": manifest.id.hex(),
        },
        "keys": {
            "psk_early_secret": psk_keys.early.hex(),
            "key_id": psk_keys.key_id.hex(),
            "client_auth_key": psk_keys.client_auth.hex(),
            "server_auth_key": psk_keys.server_auth.hex(),
            "x25519_shared_secret": shared.hex(),
            "master": session.master.hex(),
            "session_id": session.session_id.hex(),
            "server_finished_key": session.server_finished.hex(),
            "control_c2s_key": session.ctl_c2s_key.hex(),
            "control_c2s_iv": session.ctl_c2s_iv.hex(),
            "control_s2c_key": session.ctl_s2c_key.hex(),
            "control_s2c_iv": session.ctl_s2c_iv.hex(),
            "stream0_secret": stream_secret.hex(),
            "stream0_data_key": stream_keys.data_key.hex(),
            "stream0_data_iv": stream_keys.data_iv.hex(),
            "stream0_ack_key": stream_keys.ack_key.hex(),
            "stream0_join_key": ks.derive_join_key(stream_secret=stream_secret).hex(),
            "stream0_join_mac": join_mac(
                stream_secret=stream_secret, session_id=session.session_id, stream=STREAM
            ).hex(),
            "stream0_epoch1_secret": epoch1.hex(),
            "stream0_epoch1_data_key": epoch1_keys.data_key.hex(),
            "stream0_epoch1_data_iv": epoch1_keys.data_iv.hex(),
        },
        "block_space": _block_space(),
        "first_block": {
            "stream": STREAM,
            "epoch": 0,
            "record_counter": 0,
            "seq": BLOCK_SEQ,
            "file_size": FILE_SIZE,
            "block_size": BLOCK_SIZE,
            "total_blocks": ctx.total_blocks,
            "manifest_id": manifest.id.hex(),
            "entry": where.entry,
            "offset": where.offset,
            "plaintext": PLAINTEXT.hex(),
            "nonce": block_nonce.hex(),
            "aad": aad.hex(),
            "ciphertext": sealed[:-tag_len].hex(),
            "tag": sealed[-tag_len:].hex(),
            "crc32": frame[-4:].hex(),
            "frame": frame.hex(),
        },
    }


#: A small tree's FILE extents in manifest order (() for a directory or an empty file), at a
#: 64 KiB block size: files of at most 8 KiB whole are packed, up to 64 KiB a block.
PACK_BLOCK_SIZE = 64 << 10
PACK_EXTENTS: tuple[tuple[int, ...], ...] = (
    (),
    (0, 8192),
    (0, 8192),
    (0, 8193),
    (0, 100),
    (0, 200),
    (),
    (0, 1),
    (0, 70000),
    (4096, 10, 200000, 5),
    (0, 5000),
)


def _block_space() -> dict[str, Any]:
    space = BlockSpace.of_extents(PACK_EXTENTS, block_size=PACK_BLOCK_SIZE, pack=True)
    blocks = [space.locate(b) for b in range(space.total)]
    return {
        "block_size": PACK_BLOCK_SIZE,
        "extents": [list(e) for e in PACK_EXTENTS],
        "blocks": [[r.entry, r.count, r.offset, r.length] for r in blocks],
    }


def render() -> str:
    """The known-answer file's exact text."""
    return json.dumps(compute_known_answers(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
