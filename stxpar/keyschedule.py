"""The STX key schedule (version ``stx2``): pure, keyword-only functions from secrets to keys.

Theory of operation
-------------------
Everything hangs off two inputs: the pre-shared key (PSK, >= 32 bytes) and the X25519 shared
secret of the two ephemeral keys exchanged in the handshake. Every HKDF output carries a label
starting with ``stx1 `` so no two purposes can ever share a key.

::

    early       = HKDF-Extract(salt="stx1 psk", ikm=PSK)
    key_id      = HKDF-Expand(early, "stx1 key id", 8)          # lets a receiver pick the PSK
    c_auth      = HKDF-Expand(early, "stx1 client auth key", 32) # client's MACs in the handshake
    s_auth      = HKDF-Expand(early, "stx1 server auth key", 32) # server's MACs (role separation)
    hs          = HKDF-Extract(salt=early, ikm=X25519(eph_c, eph_s))
    master      = HKDF-Expand(hs, "stx1 master" || TH || eph_s, 32)  # TH: transcript hash
    finished    = HKDF-Expand(master, "stx1 server finished", 32)
    session_id  = HKDF-Expand(master, "stx1 session id", 16)
    ctl c2s/s2c = HKDF-Expand(master, "stx1 control key c2s" ...)  # + "... iv ..." 12 bytes
    stream[s,0] = HKDF-Expand(master, "stx1 stream" || u32(s), 32)
    stream[s,e+1] = HKDF-Expand(stream[s,e], "stx1 epoch ratchet", 32)
    per stream epoch: data key, data IV; per stream, from stream[s,0]: ack key, join key

A worker process only ever sees its own ``stream[s,0]``; it cannot derive other streams' keys,
the control keys or the PSK. The AES-GCM nonce of record ``n`` under a data key is
``data_iv XOR n`` (96-bit big-endian), with ``n`` counting records on that key from 0; a key
never seals more than ``rekey_records`` records or ``rekey_bytes`` bytes before both sides
ratchet to the next epoch.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

LABEL = b"stx1 "
HASH_LEN = 32
KEY_LEN = 32
IV_LEN = 12
SESSION_ID_LEN = 16
KEY_ID_LEN = 8

#: Upper bounds from draft-irtf-cfrg-aead-limits / SECURITY.md; both ends ratchet before them.
MAX_RECORDS_PER_KEY = 1 << 24
MAX_BYTES_PER_KEY = 1 << 36


def hkdf_extract(*, salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 HKDF-Extract with SHA-256."""
    return hmac.new(salt or b"\x00" * HASH_LEN, ikm, hashlib.sha256).digest()


def hkdf_expand(*, prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-Expand with SHA-256."""
    if length > 255 * HASH_LEN:
        raise ValueError("HKDF-Expand length too large")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _expand(prk: bytes, label: str, length: int, context: bytes = b"") -> bytes:
    return hkdf_expand(prk=prk, info=LABEL + label.encode() + context, length=length)


def mac(*, key: bytes, label: str, data: bytes) -> bytes:
    """HMAC-SHA256 over a purpose label and data."""
    return hmac.new(key, LABEL + label.encode() + b"\x00" + data, hashlib.sha256).digest()


def verify_mac(*, key: bytes, label: str, data: bytes, tag: bytes) -> None:
    """Raise ``ValueError`` unless ``tag`` is the MAC of ``data``; constant-time compare."""
    if not hmac.compare_digest(mac(key=key, label=label, data=data), tag):
        raise ValueError("MAC mismatch")


@dataclass(frozen=True, repr=False)
class PskKeys:
    """Everything derived from the PSK alone (before the Diffie-Hellman)."""

    early: bytes
    key_id: bytes
    client_auth: bytes
    server_auth: bytes

    def __repr__(self) -> str:
        return f"PskKeys(key_id={self.key_id.hex()})"


def derive_psk_keys(*, psk: bytes) -> PskKeys:
    early = hkdf_extract(salt=LABEL + b"psk", ikm=psk)
    return PskKeys(
        early=early,
        key_id=_expand(early, "key id", KEY_ID_LEN),
        client_auth=_expand(early, "client auth key", KEY_LEN),
        server_auth=_expand(early, "server auth key", KEY_LEN),
    )


def derive_master(*, early: bytes, shared: bytes, transcript_hash: bytes, eph_s: bytes) -> bytes:
    hs = hkdf_extract(salt=early, ikm=shared)
    return _expand(hs, "master", KEY_LEN, transcript_hash + eph_s)


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """The established session's secrets. Only the coordinators hold this object."""

    master: bytes
    session_id: bytes
    server_finished: bytes
    ctl_c2s_key: bytes
    ctl_c2s_iv: bytes
    ctl_s2c_key: bytes
    ctl_s2c_iv: bytes

    def __repr__(self) -> str:
        return f"SessionKeys(session_id={self.session_id.hex()})"

    def stream_secret(self, stream: int) -> bytes:
        """Epoch-0 secret of data stream ``stream`` (what one worker receives)."""
        return derive_stream_secret(master=self.master, stream=stream)


def derive_session_keys(*, master: bytes) -> SessionKeys:
    return SessionKeys(
        master=master,
        session_id=_expand(master, "session id", SESSION_ID_LEN),
        server_finished=_expand(master, "server finished", KEY_LEN),
        ctl_c2s_key=_expand(master, "control key c2s", KEY_LEN),
        ctl_c2s_iv=_expand(master, "control iv c2s", IV_LEN),
        ctl_s2c_key=_expand(master, "control key s2c", KEY_LEN),
        ctl_s2c_iv=_expand(master, "control iv s2c", IV_LEN),
    )


def derive_stream_secret(*, master: bytes, stream: int) -> bytes:
    return _expand(master, "stream", KEY_LEN, struct.pack(">I", stream))


def ratchet(*, stream_secret: bytes) -> bytes:
    """The next epoch's stream secret; the old one can then be forgotten."""
    return _expand(stream_secret, "epoch ratchet", KEY_LEN)


@dataclass(frozen=True, repr=False)
class StreamKeys:
    """Keys of one (stream, epoch): data AEAD key and IV, ack MAC key."""

    data_key: bytes
    data_iv: bytes
    ack_key: bytes

    def __repr__(self) -> str:
        return "StreamKeys(<secret>)"


def derive_stream_keys(*, stream_secret: bytes) -> StreamKeys:
    return StreamKeys(
        data_key=_expand(stream_secret, "data key", KEY_LEN),
        data_iv=_expand(stream_secret, "data iv", IV_LEN),
        ack_key=_expand(stream_secret, "ack key", KEY_LEN),
    )


def derive_join_key(*, stream_secret: bytes) -> bytes:
    """Key with which a worker proves it holds its stream's epoch-0 secret."""
    return _expand(stream_secret, "join key", KEY_LEN)


def nonce(*, iv: bytes, counter: int) -> bytes:
    """96-bit AES-GCM nonce: base IV XOR the big-endian record counter."""
    if not 0 <= counter < (1 << 64):
        raise ValueError("nonce counter out of range")
    return (int.from_bytes(iv, "big") ^ counter).to_bytes(IV_LEN, "big")
