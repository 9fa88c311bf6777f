"""Whole-file digest built from per-block digests that the workers compute in parallel.

``block_digest = BLAKE3(plaintext block)``;
``file_digest = BLAKE3(derive_key_context="stx1 file digest", u32 block_size || u64 size ||
block_digest_0 || ... || block_digest_{n-1})``. Order-independent to compute (each block's
digest is stored at its index), so it never serialises the pipeline and survives a resume.
"""

from __future__ import annotations

import struct

from blake3 import blake3

DIGEST_LEN = 32
_CONTEXT = "stx1 file digest"


def block_digest(data: bytes | memoryview) -> bytes:
    return blake3(data).digest()


def file_digest(*, block_digests: bytes | bytearray, block_size: int, size: int) -> bytes:
    h = blake3(derive_key_context=_CONTEXT)
    h.update(struct.pack(">IQ", block_size, size))
    h.update(block_digests)
    return h.digest()
