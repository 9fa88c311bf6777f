"""Key schedule: RFC 5869 vectors, MAC label separation, nonces, and key separation."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from stxpar import keyschedule as ks

# ---------------------------------------------------------------- RFC 5869 (HKDF-SHA256)

# Source: RFC 5869 "HMAC-based Extract-and-Expand Key Derivation Function (HKDF)",
# Appendix A, test cases A.1, A.2 and A.3 (the SHA-256 ones). Values copied as hex.
RFC5869_VECTORS = [
    pytest.param(
        "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        id="RFC5869-A.1",
    ),
    pytest.param(
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
        "404142434445464748494a4b4c4d4e4f",
        "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
        "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
        "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
        "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
        "d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
        "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
        82,
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        id="RFC5869-A.2",
    ),
    pytest.param(
        "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        "",
        "",
        42,
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        id="RFC5869-A.3",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "prk", "okm"), RFC5869_VECTORS)
def test_hkdf_rfc5869(ikm: str, salt: str, info: str, length: int, prk: str, okm: str) -> None:
    got_prk = ks.hkdf_extract(salt=bytes.fromhex(salt), ikm=bytes.fromhex(ikm))
    assert got_prk.hex() == prk
    got_okm = ks.hkdf_expand(prk=got_prk, info=bytes.fromhex(info), length=length)
    assert got_okm.hex() == okm


def test_hkdf_expand_length_limits() -> None:
    prk = bytes(32)
    assert len(ks.hkdf_expand(prk=prk, info=b"x", length=255 * 32)) == 255 * 32
    with pytest.raises(ValueError):
        ks.hkdf_expand(prk=prk, info=b"x", length=255 * 32 + 1)


def test_hkdf_expand_prefix_property() -> None:
    # Output blocks depend only on the previous block: a shorter output is a prefix of a longer.
    prk = os.urandom(32)
    long = ks.hkdf_expand(prk=prk, info=b"info", length=100)
    assert ks.hkdf_expand(prk=prk, info=b"info", length=33) == long[:33]
    assert ks.hkdf_expand(prk=prk, info=b"info2", length=33) != long[:33]


# ---------------------------------------------------------------- mac / verify_mac


def test_mac_is_hmac_sha256_over_label_nul_data() -> None:
    key, data = os.urandom(32), os.urandom(40)
    expected = hmac.new(key, b"stx1 client auth\x00" + data, hashlib.sha256).digest()
    assert ks.mac(key=key, label="client auth", data=data) == expected


def test_mac_label_separation() -> None:
    key, data = os.urandom(32), os.urandom(32)
    labels = ["client auth", "server auth", "client key share", "server finished", "ack", "join"]
    tags = {ks.mac(key=key, label=label, data=data) for label in labels}
    assert len(tags) == len(labels)


def test_mac_label_data_boundary_is_unambiguous() -> None:
    # Without the NUL separator, ("ab", "") and ("a", "b") would MAC the same bytes.
    key = os.urandom(32)
    assert ks.mac(key=key, label="ab", data=b"") != ks.mac(key=key, label="a", data=b"b")


def test_verify_mac_accepts_the_right_tag() -> None:
    key, data = os.urandom(32), os.urandom(32)
    tag = ks.mac(key=key, label="join", data=data)
    assert ks.verify_mac(key=key, label="join", data=data, tag=tag) is None


def test_verify_mac_rejects() -> None:
    key, data = os.urandom(32), os.urandom(32)
    tag = ks.mac(key=key, label="join", data=data)
    bad_cases = [
        dict(key=key, label="join", data=data, tag=bytes([tag[0] ^ 1]) + tag[1:]),
        dict(key=key, label="join", data=data, tag=tag[:-1]),
        dict(key=key, label="join", data=data, tag=b""),
        dict(key=key, label="ack", data=data, tag=tag),
        dict(key=os.urandom(32), label="join", data=data, tag=tag),
        dict(key=key, label="join", data=data + b"\x00", tag=tag),
    ]
    for case in bad_cases:
        with pytest.raises(ValueError):
            ks.verify_mac(**case)


# ---------------------------------------------------------------- nonce


def test_nonce_is_iv_xor_counter() -> None:
    iv = bytes.fromhex("000102030405060708090a0b")
    assert ks.nonce(iv=iv, counter=0) == iv
    assert ks.nonce(iv=iv, counter=1).hex() == "000102030405060708090a0a"
    assert ks.nonce(iv=iv, counter=0x0100).hex() == "000102030405060708090b0b"
    top = ks.nonce(iv=iv, counter=(1 << 64) - 1)
    assert top[:4] == iv[:4]  # the counter never reaches the top 32 bits
    assert top[4:] == bytes(b ^ 0xFF for b in iv[4:])


def test_nonce_distinct_for_distinct_counters() -> None:
    iv = os.urandom(12)
    nonces = {ks.nonce(iv=iv, counter=n) for n in range(2000)}
    assert len(nonces) == 2000
    assert all(len(n) == 12 for n in nonces)


@pytest.mark.parametrize("counter", [-1, 1 << 64, (1 << 96)])
def test_nonce_counter_out_of_range(counter: int) -> None:
    with pytest.raises(ValueError):
        ks.nonce(iv=bytes(12), counter=counter)


# ---------------------------------------------------------------- key separation


def _all_keys(psk: bytes, shared: bytes, th: bytes, eph_s: bytes) -> dict[str, bytes]:
    p = ks.derive_psk_keys(psk=psk)
    master = ks.derive_master(early=p.early, shared=shared, transcript_hash=th, eph_s=eph_s)
    s = ks.derive_session_keys(master=master)
    out = {
        "early": p.early,
        "client_auth": p.client_auth,
        "server_auth": p.server_auth,
        "master": master,
        "server_finished": s.server_finished,
        "ctl_c2s_key": s.ctl_c2s_key,
        "ctl_s2c_key": s.ctl_s2c_key,
    }
    for stream in (0, 1):
        secret = s.stream_secret(stream)
        keys = ks.derive_stream_keys(stream_secret=secret)
        out[f"stream{stream}"] = secret
        out[f"stream{stream}_data"] = keys.data_key
        out[f"stream{stream}_ack"] = keys.ack_key
        out[f"stream{stream}_join"] = ks.derive_join_key(stream_secret=secret)
        out[f"stream{stream}_epoch1"] = ks.ratchet(stream_secret=secret)
    return out


def test_every_derived_key_is_distinct(psk: bytes) -> None:
    keys = _all_keys(psk, os.urandom(32), os.urandom(32), os.urandom(32))
    assert all(len(v) == 32 for v in keys.values())
    assert len(set(keys.values())) == len(keys)
    p = ks.derive_psk_keys(psk=psk)
    s = ks.derive_session_keys(master=keys["master"])
    short = [p.key_id, s.session_id, s.ctl_c2s_iv, s.ctl_s2c_iv]
    assert [len(x) for x in short] == [8, 16, 12, 12]
    assert len(set(short)) == 4
    # No short output is a prefix of another key either (labels, not lengths, separate them).
    for value in short:
        assert not any(k.startswith(value) for k in keys.values())


def test_derivations_are_deterministic(psk: bytes) -> None:
    args = (psk, os.urandom(32), os.urandom(32), os.urandom(32))
    assert _all_keys(*args) == _all_keys(*args)


@pytest.mark.parametrize("which", range(4))
def test_every_input_changes_every_session_key(psk: bytes, which: int) -> None:
    args = [psk, os.urandom(32), os.urandom(32), os.urandom(32)]
    base = _all_keys(*args)
    args[which] = bytes([args[which][0] ^ 1]) + args[which][1:]
    changed = _all_keys(*args)
    assert base["master"] != changed["master"]
    for name in base:
        if name in ("early", "client_auth", "server_auth") and which != 0:
            assert base[name] == changed[name]  # PSK-only keys do not depend on the DH
        else:
            assert base[name] != changed[name], name


def test_key_id_depends_on_psk_only() -> None:
    a, b = os.urandom(32), os.urandom(32)
    assert ks.derive_psk_keys(psk=a).key_id == ks.derive_psk_keys(psk=a).key_id
    assert ks.derive_psk_keys(psk=a).key_id != ks.derive_psk_keys(psk=b).key_id


def test_stream_secrets_differ_per_stream() -> None:
    master = os.urandom(32)
    secrets = [ks.derive_stream_secret(master=master, stream=s) for s in range(256)]
    assert len(set(secrets)) == 256
    session = ks.derive_session_keys(master=master)
    assert session.stream_secret(7) == secrets[7]
    other = ks.derive_session_keys(master=os.urandom(32))
    assert other.stream_secret(7) != secrets[7]


def test_ratchet_differs_per_epoch() -> None:
    secret = os.urandom(32)
    chain = [secret]
    for _ in range(50):
        chain.append(ks.ratchet(stream_secret=chain[-1]))
    assert len(set(chain)) == len(chain)
    data_keys = {ks.derive_stream_keys(stream_secret=s).data_key for s in chain}
    data_ivs = {ks.derive_stream_keys(stream_secret=s).data_iv for s in chain}
    assert len(data_keys) == len(chain)
    assert len(data_ivs) == len(chain)
    assert ks.ratchet(stream_secret=secret) == chain[1]


def test_reprs_do_not_leak_secrets(psk: bytes) -> None:
    p = ks.derive_psk_keys(psk=psk)
    s = ks.derive_session_keys(master=os.urandom(32))
    sk = ks.derive_stream_keys(stream_secret=os.urandom(32))
    for obj, secrets in (
        (p, [p.early, p.client_auth, p.server_auth, psk]),
        (s, [s.master, s.server_finished, s.ctl_c2s_key, s.ctl_s2c_key]),
        (sk, [sk.data_key, sk.ack_key, sk.data_iv]),
    ):
        text = repr(obj) + str(obj)
        for secret in secrets:
            assert secret.hex() not in text
            assert repr(secret) not in text
