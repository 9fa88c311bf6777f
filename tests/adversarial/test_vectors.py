"""Published test vectors run through stxpar's own crypto entry points.

* HKDF-SHA256: Wycheproof ``hkdf_sha256_test.json`` through ``keyschedule.hkdf_extract`` and
  ``keyschedule.hkdf_expand`` (the functions every STX key comes from).
* HMAC-SHA256: RFC 4231 test cases 1-4, 6 and 7 (case 5 is a truncated 128-bit tag, which STX
  never uses) and Wycheproof ``hmac_sha256_test.json``, both through
  ``keyschedule.hkdf_extract``: RFC 5869 defines HKDF-Extract(salt, IKM) as
  HMAC-Hash(salt, IKM), and our implementation is exactly ``hmac.new(salt, ikm, sha256)``, the
  same HMAC path that ``keyschedule.mac`` and ``hkdf_expand`` use. So
  ``hkdf_extract(salt=key, ikm=data)`` must equal HMAC-SHA256(key, data).
* AES-256-GCM: Wycheproof ``aes_gcm_test.json``, only the groups STX can use (256-bit key,
  96-bit IV, 128-bit tag), through the very calls ``records.BlockSealer``/``BlockOpener`` make:
  ``AESGCM.encrypt_into`` into a slice of a reused buffer, ``AESGCM.decrypt_into`` out of one.
* X25519: Wycheproof ``x25519_test.json`` through ``handshake.x25519_shared``: every case with
  a non-zero expected secret must give that secret, every low-order point (expected shared
  secret all zero) must be refused with ``AuthError``.
* Our own known-answer file ``docs/known-answers.json`` must equal what
  ``stxpar.kat.compute_known_answers()`` computes now.

The Wycheproof files are read from ``../shared/vectors/wycheproof/`` next to the repository
(never copied into it); a clone without that folder skips those tests with a reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stxpar import kat
from stxpar import keyschedule as ks
from stxpar.errors import AuthError
from stxpar.handshake import x25519_shared

# the AESGCM name exactly as records.py sees it (one class, one import path)
from stxpar.records import AESGCM

REPO = Path(__file__).resolve().parents[2]
WYCHEPROOF = REPO.parent / "shared" / "vectors" / "wycheproof"
KAT_FILE = REPO / "docs" / "known-answers.json"

pytestmark = pytest.mark.timeout(60)


def _wycheproof_params(name: str, *, keep: Any = None, skip: Any = None) -> list[Any]:
    """One pytest.param per Wycheproof test case of ``name`` (id ``tcN``), with its group.

    ``keep(group)`` drops groups outside what STX uses (not collected at all); ``skip(group)``
    returns a reason to collect a group's cases as skipped. When the vector folder (or file) is
    absent, a single skipped placeholder says so.
    """
    path = WYCHEPROOF / name
    if not path.is_file():
        return [
            pytest.param(
                None,
                None,
                id="vectors-missing",
                marks=pytest.mark.skip(
                    reason=f"Wycheproof vectors not found at {path} (a clone without ../shared)"
                ),
            )
        ]
    data = json.loads(path.read_text())
    params = []
    for group in data["testGroups"]:
        if keep is not None and not keep(group):
            continue
        reason = skip(group) if skip is not None else None
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        for case in group["tests"]:
            params.append(pytest.param(group, case, id=f"tc{case['tcId']}", marks=marks))
    assert params, f"{path} has no test cases"
    return params


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


# ---------------------------------------------------------------- HKDF-SHA256


@pytest.mark.parametrize(("group", "case"), _wycheproof_params("hkdf_sha256_test.json"))
def test_wycheproof_hkdf_sha256(group: dict[str, Any], case: dict[str, Any]) -> None:
    def derive() -> bytes:
        prk = ks.hkdf_extract(salt=_h(case["salt"]), ikm=_h(case["ikm"]))
        return ks.hkdf_expand(prk=prk, info=_h(case["info"]), length=case["size"])

    if case["result"] == "valid":
        assert derive().hex() == case["okm"], case["comment"]
    else:
        assert case["flags"] == ["SizeTooLarge"], "an invalid case this test does not know"
        with pytest.raises(ValueError):
            derive()


# ---------------------------------------------------------------- HMAC-SHA256

# RFC 4231 "Identifiers and Test Vectors for HMAC-SHA-224, HMAC-SHA-256, HMAC-SHA-384, and
# HMAC-SHA-512", section 4, the HMAC-SHA-256 results of test cases 1-4, 6 and 7 (case 5
# truncates the output to 128 bits, which STX never does). Keys and data in hex.
RFC4231 = {
    1: (
        "0b" * 20,
        "4869205468657265",  # "Hi There"
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    ),
    2: (
        "4a656665",  # "Jefe"
        "7768617420646f2079612077616e7420666f72206e6f7468696e673f",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    3: (
        "aa" * 20,
        "dd" * 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
    ),
    4: (
        "0102030405060708090a0b0c0d0e0f10111213141516171819",
        "cd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    6: (
        "aa" * 131,
        # "Test Using Larger Than Block-Size Key - Hash Key First"
        "54657374205573696e67204c6172676572205468616e20426c6f636b2d53697a65204b6579202d20"
        "48617368204b6579204669727374",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    7: (
        "aa" * 131,
        # "This is a test using a larger than block-size key and a larger than block-size
        # data. The key needs to be hashed before being used by the HMAC algorithm."
        "5468697320697320612074657374207573696e672061206c6172676572207468616e20626c6f636b"
        "2d73697a65206b657920616e642061206c6172676572207468616e20626c6f636b2d73697a652064"
        "6174612e20546865206b6579206e6565647320746f20626520686173686564206265666f72652062"
        "65696e6720757365642062792074686520484d414320616c676f726974686d2e",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
}


@pytest.mark.parametrize("number", sorted(RFC4231), ids=lambda n: f"case{n}")
def test_rfc4231_hmac_sha256_through_hkdf_extract(number: int) -> None:
    key, data, tag = RFC4231[number]
    # HKDF-Extract(salt, IKM) = HMAC-SHA256(salt, IKM) (RFC 5869 section 2.2): the salt is the
    # HMAC key. Our hkdf_extract is that HMAC, so it must reproduce RFC 4231.
    assert ks.hkdf_extract(salt=_h(key), ikm=_h(data)).hex() == tag


def _hmac_truncated(group: dict[str, Any]) -> str | None:
    if group["tagSize"] != 8 * ks.HASH_LEN:
        return (
            f"{group['tagSize']}-bit truncated tag: stxpar only ever uses and compares full "
            "256-bit HMAC-SHA256 tags, and hkdf_extract has no truncation"
        )
    return None


@pytest.mark.parametrize(
    ("group", "case"), _wycheproof_params("hmac_sha256_test.json", skip=_hmac_truncated)
)
def test_wycheproof_hmac_sha256_through_hkdf_extract(
    group: dict[str, Any], case: dict[str, Any]
) -> None:
    # HKDF-Extract is HMAC with the salt as key (see the RFC 4231 test above).
    tag = ks.hkdf_extract(salt=_h(case["key"]), ikm=_h(case["msg"]))
    if case["result"] == "valid":
        assert tag.hex() == case["tag"], case["comment"]
    else:
        assert tag.hex() != case["tag"], case["comment"]


# ---------------------------------------------------------------- AES-256-GCM


def _stx_gcm(group: dict[str, Any]) -> bool:
    """STX's one suite (version stx2): AES-256-GCM, 96-bit nonces, 128-bit tags."""
    return group["keySize"] == 256 and group["ivSize"] == 96 and group["tagSize"] == 128


@pytest.mark.parametrize(("group", "case"), _wycheproof_params("aes_gcm_test.json", keep=_stx_gcm))
def test_wycheproof_aes256_gcm_as_records_uses_it(
    group: dict[str, Any], case: dict[str, Any]
) -> None:
    key, iv, aad = _h(case["key"]), _h(case["iv"]), _h(case["aad"])
    msg, ct, tag = _h(case["msg"]), _h(case["ct"]), _h(case["tag"])
    aead = AESGCM(key)
    # Open, as BlockOpener does: decrypt_into a slice of a reused plaintext buffer.
    plain = bytearray(len(ct) + 8)
    sealed = memoryview(bytearray(ct + tag))
    if case["result"] == "valid":
        # Seal, as BlockSealer does: encrypt_into a slice of a reused frame buffer.
        frame = bytearray(5 + len(msg) + 16 + 4)
        view = memoryview(frame)
        aead.encrypt_into(iv, msg, aad, view[5 : 5 + len(msg) + 16])
        assert bytes(view[5 : 5 + len(msg)]).hex() == case["ct"], case["comment"]
        assert bytes(view[5 + len(msg) : 5 + len(msg) + 16]).hex() == case["tag"]
        aead.decrypt_into(iv, sealed, aad, memoryview(plain)[: len(ct)])
        assert bytes(plain[: len(ct)]) == msg
    else:
        with pytest.raises(InvalidTag):
            aead.decrypt_into(iv, sealed, aad, memoryview(plain)[: len(ct)])


# ---------------------------------------------------------------- X25519


@pytest.mark.parametrize(("group", "case"), _wycheproof_params("x25519_test.json"))
def test_wycheproof_x25519_through_x25519_shared(
    group: dict[str, Any], case: dict[str, Any]
) -> None:
    assert group["curve"] == "curve25519"
    private = X25519PrivateKey.from_private_bytes(_h(case["private"]))
    public = _h(case["public"])
    if case["shared"] == "00" * 32:
        # A low-order point: its shared secret is all zero; the handshake must refuse it.
        assert "ZeroSharedSecret" in case["flags"]
        with pytest.raises(AuthError):
            x25519_shared(private, public)
        return
    # "valid" and "acceptable" (twist points, non-canonical encodings...) alike: RFC 7748
    # X25519 has one defined answer for each, and STX must compute it.
    assert case["result"] in ("valid", "acceptable")
    assert x25519_shared(private, public).hex() == case["shared"], case["comment"]


# ---------------------------------------------------------------- our known answers


def test_known_answer_file_is_what_the_code_computes() -> None:
    published = json.loads(KAT_FILE.read_text())
    assert kat.compute_known_answers() == published
