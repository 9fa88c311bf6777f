"""The published known-answer file: the code must still produce it, and raw primitives agree.

The first test catches any change to the key schedule, framing or record layout. The others
re-derive values from docs/known-answers.json with ``cryptography``, ``hmac``, ``hashlib``,
``msgpack`` and ``zlib`` only, following the layouts documented in stxpar/keyschedule.py,
stxpar/handshake.py, stxpar/manifest.py and stxpar/records.py, so the file is not only the code checking itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from stxpar import kat

KAT_FILE = Path(__file__).resolve().parents[2] / "docs" / "known-answers.json"


@pytest.fixture(scope="module")
def published() -> dict[str, Any]:
    data = json.loads(KAT_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(obj, list):
        out = {}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def _hex(data: dict[str, Any], path: str) -> bytes:
    value = _flatten(data)[path]
    assert isinstance(value, str)
    return bytes.fromhex(value)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


# ---------------------------------------------------------------- the code reproduces the file


def test_code_reproduces_the_published_file_field_by_field(published: dict[str, Any]) -> None:
    want = _flatten(published)
    got = _flatten(kat.compute_known_answers())
    assert sorted(got) == sorted(want), "fields added or removed: regenerate the file"
    differ = [path for path in sorted(want) if got[path] != want[path]]
    assert not differ, f"values changed: {differ}"


def test_published_file_is_exactly_the_rendered_text() -> None:
    assert KAT_FILE.read_text() == kat.render()


def test_file_has_everything_promised(published: dict[str, Any]) -> None:
    assert "python -m stxpar.kat" in published["description"]
    assert [h["type"] for h in published["handshake"]] == [
        "INIT",
        "SERVER_HELLO",
        "CLIENT_HELLO",
        "CLIENT_AUTH",
        "SERVER_AUTH",
        "KEY_NEGOTIATION",
        "KEY_CONFIRMATION",
    ]
    for name in (
        "key_id",
        "client_auth_key",
        "server_auth_key",
        "master",
        "session_id",
        "server_finished_key",
        "control_c2s_key",
        "control_c2s_iv",
        "control_s2c_key",
        "control_s2c_iv",
        "stream0_secret",
        "stream0_data_key",
        "stream0_data_iv",
        "stream0_ack_key",
        "stream0_join_key",
        "stream0_epoch1_secret",
    ):
        assert bytes.fromhex(published["keys"][name])
    for name in ("frame", "crc32", "ciphertext", "tag", "nonce", "aad", "manifest_id"):
        assert bytes.fromhex(published["first_block"][name])
    for name in ("entry_encoding", "digest", "id"):
        assert bytes.fromhex(published["manifest"][name])
    assert published["protocol"]["version"] == "stx3"


# ---------------------------------------------------------------- independent re-derivation


def test_psk_keys_from_raw_hkdf(published: dict[str, Any]) -> None:
    psk = _hex(published, "inputs.psk")
    early = hmac256(b"stx1 psk", psk)  # HKDF-Extract(salt="stx1 psk", ikm=PSK)
    assert _hex(published, "keys.psk_early_secret") == early
    assert _hex(published, "keys.key_id") == hkdf_expand(early, b"stx1 key id", 8)
    assert _hex(published, "keys.client_auth_key") == hkdf_expand(
        early, b"stx1 client auth key", 32
    )
    assert _hex(published, "keys.server_auth_key") == hkdf_expand(
        early, b"stx1 server auth key", 32
    )


def test_handshake_frames_and_transcript_from_raw_primitives(published: dict[str, Any]) -> None:
    inputs = published["inputs"]
    keys = published["keys"]
    frames = [bytes.fromhex(h["frame"]) for h in published["handshake"]]
    ths = [bytes.fromhex(h["transcript_hash"]) for h in published["handshake"]]

    # Transcript hash: SHA-256 of every frame so far, header included.
    for i in range(len(frames)):
        assert ths[i] == hashlib.sha256(b"".join(frames[: i + 1])).digest()

    fields = []
    for i, frame in enumerate(frames):
        ftype, length = struct.unpack(">BI", frame[:5])
        assert ftype == i and length == len(frame) - 5  # INIT=0 ... KEY_CONFIRMATION=6
        fields.append(msgpack.unpackb(frame[5:], raw=False))

    suite = "x25519-hkdf-sha256-aes256gcm"
    eph_c = bytes.fromhex(inputs["client_ephemeral_public"])
    eph_s = bytes.fromhex(inputs["server_ephemeral_public"])
    assert eph_c == _x25519_public(bytes.fromhex(inputs["client_ephemeral_private"]))
    assert eph_s == _x25519_public(bytes.fromhex(inputs["server_ephemeral_private"]))
    c_auth = bytes.fromhex(keys["client_auth_key"])
    s_auth = bytes.fromhex(keys["server_auth_key"])
    fin = bytes.fromhex(keys["server_finished_key"])

    assert fields[0] == ["stx3"]
    assert fields[1] == [
        "stx3",
        suite,
        bytes.fromhex(inputs["server_nonce"]),
        inputs["server_time_ms"],
    ]
    assert fields[2] == [
        "stx3",
        suite,
        bytes.fromhex(keys["key_id"]),
        bytes.fromhex(inputs["client_nonce"]),
        inputs["client_time_ms"],
    ]
    assert fields[3] == [hmac256(c_auth, b"stx1 client auth\x00" + ths[2])]
    assert fields[4] == [hmac256(s_auth, b"stx1 server auth\x00" + ths[3])]
    assert fields[5] == [eph_c, hmac256(c_auth, b"stx1 client key share\x00" + ths[4] + eph_c)]
    assert fields[6] == [eph_s, hmac256(fin, b"stx1 server finished\x00" + ths[5] + eph_s)]


def _x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def test_session_keys_from_raw_primitives(published: dict[str, Any]) -> None:
    inputs = published["inputs"]
    keys = published["keys"]
    th_after_key_negotiation = bytes.fromhex(published["handshake"][5]["transcript_hash"])
    eph_s = bytes.fromhex(inputs["server_ephemeral_public"])

    client_private = X25519PrivateKey.from_private_bytes(
        bytes.fromhex(inputs["client_ephemeral_private"])
    )
    shared = client_private.exchange(X25519PublicKey.from_public_bytes(eph_s))
    assert _hex(published, "keys.x25519_shared_secret") == shared

    hs = hmac256(bytes.fromhex(keys["psk_early_secret"]), shared)  # HKDF-Extract(early, DH)
    master = hkdf_expand(hs, b"stx1 master" + th_after_key_negotiation + eph_s, 32)
    assert _hex(published, "keys.master") == master

    expected = {
        "session_id": (b"stx1 session id", 16),
        "server_finished_key": (b"stx1 server finished", 32),
        "control_c2s_key": (b"stx1 control key c2s", 32),
        "control_c2s_iv": (b"stx1 control iv c2s", 12),
        "control_s2c_key": (b"stx1 control key s2c", 32),
        "control_s2c_iv": (b"stx1 control iv s2c", 12),
    }
    for name, (info, length) in expected.items():
        assert _hex(published, f"keys.{name}") == hkdf_expand(master, info, length), name

    stream0 = hkdf_expand(master, b"stx1 stream" + struct.pack(">I", 0), 32)
    assert _hex(published, "keys.stream0_secret") == stream0
    for name, info, length in (
        ("stream0_data_key", b"stx1 data key", 32),
        ("stream0_data_iv", b"stx1 data iv", 12),
        ("stream0_ack_key", b"stx1 ack key", 32),
        ("stream0_join_key", b"stx1 join key", 32),
    ):
        assert _hex(published, f"keys.{name}") == hkdf_expand(stream0, info, length), name
    epoch1 = hkdf_expand(stream0, b"stx1 epoch ratchet", 32)
    assert _hex(published, "keys.stream0_epoch1_secret") == epoch1
    assert _hex(published, "keys.stream0_epoch1_data_key") == hkdf_expand(
        epoch1, b"stx1 data key", 32
    )
    join_key = bytes.fromhex(keys["stream0_join_key"])
    session_id = bytes.fromhex(keys["session_id"])
    assert _hex(published, "keys.stream0_join_mac") == hmac256(
        join_key, b"stx1 join\x00" + session_id + struct.pack(">I", 0)
    )


def test_manifest_digest_and_id_from_raw_msgpack_and_sha256(published: dict[str, Any]) -> None:
    man = published["manifest"]
    e = man["entry"]
    assert e["kind"] == "FILE" and e["size"] == 100 and e["extents"] == [0, 100]
    # The entry's canonical encoding: the msgpack array
    # [kind, path, size, mode, mtime_ns, link, extents, file_id] (kind FILE = 0, file_id as bin).
    encoding = msgpack.packb(
        [
            0,
            e["path"],
            e["size"],
            e["mode"],
            e["mtime_ns"],
            e["link"],
            e["extents"],
            bytes.fromhex(e["file_id"]),
        ],
        use_bin_type=True,
    )
    assert _hex(published, "manifest.entry_encoding") == encoding
    digest = hashlib.sha256(
        b"stx3 manifest" + struct.pack(">I", man["block_size"]) + encoding
    ).digest()
    assert _hex(published, "manifest.digest") == digest
    assert _hex(published, "manifest.id") == digest[:16]
    assert _hex(published, "first_block.manifest_id") == digest[:16]


def test_first_block_from_raw_aesgcm(published: dict[str, Any]) -> None:
    keys = published["keys"]
    blk = published["first_block"]
    plaintext = bytes.fromhex(blk["plaintext"])
    assert plaintext == bytes(range(100))
    assert blk["seq"] == 0 and blk["file_size"] == 100 and blk["block_size"] == 4096
    assert blk["entry"] == 0 and blk["offset"] == 0
    data_key = bytes.fromhex(keys["stream0_data_key"])
    data_iv = bytes.fromhex(keys["stream0_data_iv"])
    session_id = bytes.fromhex(keys["session_id"])
    manifest_id = bytes.fromhex(published["manifest"]["id"])

    nonce = data_iv  # record counter 0: iv XOR 0
    # AAD: "stx3 block" | session | stream | epoch | seq | size | total blocks | manifest id |
    # entry | offset of the block in its file.
    aad = b"stx3 block" + struct.pack(
        ">16sIIIIQ16sIQ", session_id, 0, 0, 0, 100, 1, manifest_id, 0, 0
    )
    assert _hex(published, "first_block.nonce") == nonce
    assert _hex(published, "first_block.aad") == aad
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, aad)
    assert _hex(published, "first_block.ciphertext") + _hex(published, "first_block.tag") == sealed

    # CRC-32 over everything in the BLOCK payload before it: seq | size | ct | tag.
    block_header = struct.pack(">II", 0, 100)
    crc = struct.pack(">I", zlib.crc32(block_header + sealed))
    assert _hex(published, "first_block.crc32") == crc
    assert crc != struct.pack(">I", zlib.crc32(sealed))  # not the old ct||tag-only CRC
    frame = struct.pack(">BI", 0x11, 8 + 100 + 16 + 4) + block_header + sealed + crc
    assert _hex(published, "first_block.frame") == frame
