"""Whole-file digest built from per-block digests that the workers compute in parallel.

``block_digest = XXH3-128(plaintext block)`` (16 bytes, big-endian canonical form);
``file_digest = SHA-256("stx1 file digest" || u32 block_size || u64 size || block_digest_0 ||
... || block_digest_{n-1})``. Each block's digest is stored at its index, so the file digest
never serialises the pipeline and survives a resume.

Why XXH3 per block: the block digests are an end-to-end check of the pipeline (the bytes that
landed are the bytes that were read), computed independently on both sides; authenticity comes
from AES-GCM on every block under keys only the two ends hold. XXH3-128 costs ~0.05 s per GB
on one core here against ~0.17 s for BLAKE3, and the digest is computed twice per byte (the
choice rsync made for its default transfer checksum, xxh128). The file digest over the block
digests is a collision-resistant hash, but it is no stronger than the block digests it covers:
it is not a content address for adversarially crafted files (threat-model.md).
"""

from __future__ import annotations

import hashlib
import struct

from xxhash import xxh3_128_digest

from .wire import BLOCK_DIGEST_LEN, DIGEST_LEN

__all__ = ["BLOCK_DIGEST_LEN", "FILE_DIGEST_LEN", "block_digest", "file_digest"]

FILE_DIGEST_LEN = DIGEST_LEN
_LABEL = b"stx1 file digest"


def block_digest(data: bytes | memoryview | bytearray) -> bytes:
    return xxh3_128_digest(data)


def file_digest(
    *, block_digests: bytes | bytearray | memoryview, block_size: int, size: int
) -> bytes:
    h = hashlib.sha256(file_digest_prefix(block_size, size))
    h.update(block_digests)
    return h.digest()


def file_digest_prefix(block_size: int, size: int) -> bytes:
    """What ``file_digest`` hashes before the block digests (a tree hashes ten thousand small
    files' digests in one call each: ``Manifest.tree_digest``)."""
    return _LABEL + _SIZES.pack(block_size, size)


_SIZES = struct.Struct(">IQ")
