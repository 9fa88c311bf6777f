"""Cluster CURVE keys from the PSK: deterministic, label-separated, pinned, never shown."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
import zmq
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from zmq.utils import z85

from stxpar import cluster_auth as ca

pytestmark = pytest.mark.timeout(30)

# Known answer for PSK = bytes(range(32)). Computed once, independently of stxpar, with
#   prk = hmac.new(b"stx1 cluster", psk, sha256).digest()               # HKDF-Extract
#   sec = hmac.new(prk, label + b"\x01", sha256).digest()               # HKDF-Expand, 32 bytes
#   pub = X25519PrivateKey.from_private_bytes(sec).public_key()         # pyca/cryptography
# and Z85 of each (libzmq's curve_public gave the same public keys).
KAT_PSK = bytes(range(32))
KAT_COORDINATOR_SECRET = "ba19a003dd631e142cbae638e3544c21016eeb8b852a1609455a92c716efd80e"
KAT_COORDINATOR_PUBLIC = "758f2ba09b21487883f8fdf7021f3c44e153afe8ad2f4675fa7bda708e5ec761"
KAT_COORDINATOR_PUBLIC_Z85 = b"B=O5CN&$sEGztAt0V%J)&zV@zTUid^}G{}nJ:x+m"
KAT_HELPER_SECRET = "0432f0889d5dc1c40278f7927aa0bfda857b7caf510660b29d390dc3ba5d3f07"
KAT_HELPER_PUBLIC = "1463717b00edad5cf64f62168f483ea094b1ad1a6ad4202f4243509453237e6d"
KAT_HELPER_PUBLIC_Z85 = b"6K#cf0pu)[{d]ckK4qEcL^dteysBvVlpjOlqZl:d"


def _x25519_public(secret_z85: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(z85.decode(secret_z85))
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_known_answer() -> None:
    keys = ca.derive_cluster_keys(psk=KAT_PSK)
    assert z85.decode(keys.coordinator_secret).hex() == KAT_COORDINATOR_SECRET
    assert z85.decode(keys.coordinator_public).hex() == KAT_COORDINATOR_PUBLIC
    assert keys.coordinator_public == KAT_COORDINATOR_PUBLIC_Z85
    assert z85.decode(keys.helper_secret).hex() == KAT_HELPER_SECRET
    assert z85.decode(keys.helper_public).hex() == KAT_HELPER_PUBLIC
    assert keys.helper_public == KAT_HELPER_PUBLIC_Z85


def test_matches_an_independent_hkdf() -> None:
    psk = os.urandom(48)
    keys = ca.derive_cluster_keys(psk=psk)
    prk = hmac.new(b"stx1 cluster", psk, hashlib.sha256).digest()
    for label, secret in (
        (b"stx1 cluster coordinator curve key", keys.coordinator_secret),
        (b"stx1 cluster helper curve key", keys.helper_secret),
    ):
        assert z85.decode(secret) == hmac.new(prk, label + b"\x01", hashlib.sha256).digest()


def test_deterministic() -> None:
    psk = os.urandom(32)
    assert ca.derive_cluster_keys(psk=psk) == ca.derive_cluster_keys(psk=psk)


def test_labels_and_psks_separate_keys() -> None:
    a = ca.derive_cluster_keys(psk=b"\x01" * 32)
    b = ca.derive_cluster_keys(psk=b"\x01" * 31 + b"\x02")
    assert a.coordinator_secret != a.helper_secret
    assert a.coordinator_public != a.helper_public
    secrets = {a.coordinator_secret, a.helper_secret, b.coordinator_secret, b.helper_secret}
    assert len(secrets) == 4
    assert a.coordinator_public != b.coordinator_public
    assert a.helper_public != b.helper_public


def test_public_keys_are_the_secrets_public_keys() -> None:
    keys = ca.derive_cluster_keys(psk=os.urandom(32))
    for public, secret in (
        (keys.coordinator_public, keys.coordinator_secret),
        (keys.helper_public, keys.helper_secret),
    ):
        assert len(public) == len(secret) == 40
        assert public == zmq.curve_public(secret)
        assert z85.decode(public) == _x25519_public(secret)


def test_repr_and_str_hold_no_secret() -> None:
    psk = os.urandom(32)
    keys = ca.derive_cluster_keys(psk=psk)
    shown = repr(keys) + str(keys) + f"{keys}" + repr([keys])
    forms = [psk.hex()]
    for secret in (keys.coordinator_secret, keys.helper_secret):
        forms += [secret.decode(), z85.decode(secret).hex()]
    leaked = any(form in shown for form in forms)  # a bool: a failure must not print a key
    assert not leaked, "a secret in the repr"
    assert keys.coordinator_public.decode() in shown  # public keys are what it shows


def test_short_psk_is_refused_without_showing_it() -> None:
    with pytest.raises(ValueError) as info:
        ca.derive_cluster_keys(psk=b"k" * 31)
    assert "kkkk" not in str(info.value)
