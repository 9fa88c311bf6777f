"""Test-only nonce probe for tests/adversarial/test_nonce_uniqueness.py. NOT part of stxpar.

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has one, so a
process started with ``PYTHONPATH=<this directory>`` loads this file before anything else. Every
stxpar process of a transfer gets there: the CLI or driver, and the worker processes, which are
started as ``python -P -m stxpar.workers...`` (``-P`` drops the script directory from
``sys.path`` but still honours ``PYTHONPATH``) with the parent's environment.

When ``STX_NONCE_LOG`` names a file, the probe replaces
``cryptography.hazmat.primitives.ciphers.aead.AESGCM`` with a proxy class, before stxpar
imports it. The proxy forwards every call to the real AESGCM unchanged; ``encrypt`` and
``encrypt_into`` first append one line to the log::

    <sha256(key)[:16] hex> <nonce hex> <pid> <role>\\n

with ``os.write`` on an ``O_APPEND`` descriptor, so lines from concurrent processes never
interleave. The key itself is kept only as that hash; it never reaches the log. Without
``STX_NONCE_LOG`` the probe does nothing at all.
"""

from __future__ import annotations

import os


def _install(log_path: str) -> None:
    import hashlib
    import sys
    import threading

    from cryptography.hazmat.primitives.ciphers import aead

    real = aead.AESGCM
    if getattr(real, "stx_nonce_probe", False):
        return
    state: dict[str, int] = {}
    lock = threading.Lock()

    def role() -> str:
        argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "?"
        return "/".join(argv0.replace("\\", "/").split("/")[-2:]).replace(" ", "_") or "?"

    def record(key_hash: str, nonce: bytes | bytearray | memoryview) -> None:
        line = f"{key_hash} {bytes(nonce).hex()} {os.getpid()} {role()}\n".encode()
        with lock:
            fd = state.get("fd")
            if fd is None:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                fd = state["fd"] = os.open(log_path, flags, 0o600)
        os.write(fd, line)

    class AESGCM:
        """Observing proxy around cryptography's AESGCM (which cannot be subclassed)."""

        stx_nonce_probe = True
        generate_key = staticmethod(real.generate_key)

        def __init__(self, key: bytes) -> None:
            self._real = real(key)
            self._key_hash = hashlib.sha256(bytes(key)).hexdigest()[:32]

        def encrypt(self, nonce, data, associated_data):  # type: ignore[no-untyped-def]
            record(self._key_hash, nonce)
            return self._real.encrypt(nonce, data, associated_data)

        def encrypt_into(self, nonce, data, associated_data, buf):  # type: ignore[no-untyped-def]
            record(self._key_hash, nonce)
            return self._real.encrypt_into(nonce, data, associated_data, buf)

        def decrypt(self, nonce, data, associated_data):  # type: ignore[no-untyped-def]
            return self._real.decrypt(nonce, data, associated_data)

        def decrypt_into(self, nonce, data, associated_data, buf):  # type: ignore[no-untyped-def]
            return self._real.decrypt_into(nonce, data, associated_data, buf)

    aead.AESGCM = AESGCM  # type: ignore[misc]


if os.environ.get("STX_NONCE_LOG"):
    _install(os.environ["STX_NONCE_LOG"])
