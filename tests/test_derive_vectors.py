"""The software half of the derivation (docs/derivation.md) pinned by fixed vectors: a contract.

The vectors were computed once by this implementation and cross-checked here against independent
implementations (cryptography's HKDF-Expand and RFC 3394 key wrap), so a change to either side fails.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from luks_tpm import derive
from luks_tpm.secret import Secret

from .test_app_key_vectors import PRK as APP_PRK
from .test_app_key_vectors import VECTORS as APP_VECTORS
from .test_app_key_vectors import message as app_message

UUID = "6a0e2f44-51c8-4d2b-9b3e-7c1f0d9a8e21"
PRK = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
OKM_64 = bytes.fromhex(
    "2f1bd0d40ea7841a2d2226711f2904f919bfb49ef52a9ab9fd37b56ef1057a01"
    "523a5393e53863aa954ecde04c278d96fbf2e3ea84e90e8009609b1c5206ac78"
)
KEK_32 = bytes.fromhex("1df2b11f8e37d5ede5b4fe1c283f56132a90d1c8b6455ff7bfc9971c4a1b3872")
VOLUME_KEY = bytes(range(0x40, 0x80))
WRAPPED = bytes.fromhex(
    "06c5dc34ccdf3d1240fa8c4e45f5d3ebf4d063a59576fd5a6684acb08f6e61710a9ff072ebd9c4a2"
    "600ef4844dd9da3fbe85b27cad81adb91d60a12730abc83bcb3c617a6e43036b"
)


def secret(data: bytes) -> Secret:
    return Secret.copy_of(bytearray(data), zero_source=True)


def test_hmac_message_layout() -> None:
    salt = bytes(range(32))
    assert derive.hmac_message(UUID, salt) == b"luks-tpm/v1\x00" + UUID.encode() + b"\x00" + salt


def test_hkdf_expand_vectors() -> None:
    for length, expected in ((64, OKM_64), (32, KEK_32)):
        okm = derive.expand(secret(PRK), UUID, length)
        assert bytes(okm.view()) == expected
        info = b"luks-tpm volume key\x00" + UUID.encode() + length.to_bytes(2, "big")
        assert HKDFExpand(hashes.SHA256(), length, info).derive(PRK) == expected


def test_expand_depends_on_uuid_and_length() -> None:
    a = derive.expand(secret(PRK), UUID, 32)
    b = derive.expand(secret(PRK), UUID.replace("6a", "6b", 1), 32)
    c = derive.expand(secret(PRK), UUID, 64)
    assert not a.equals(b)
    assert bytes(c.view())[:32] != bytes(a.view())  # L is part of info, so not a prefix


def test_aes_key_wrap_vector_and_round_trip() -> None:
    kek, key = secret(KEK_32), secret(VOLUME_KEY)
    assert derive.wrap(kek, key) == WRAPPED == aes_key_wrap(KEK_32, VOLUME_KEY)
    unwrapped = derive.unwrap(kek, WRAPPED)
    assert unwrapped is not None and bytes(unwrapped.view()) == VOLUME_KEY
    assert aes_key_unwrap(KEK_32, WRAPPED) == VOLUME_KEY


def test_rfc3394_vector() -> None:
    """RFC 3394 §4.6: 256-bit key data with a 256-bit KEK."""
    kek = secret(bytes.fromhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F"))
    data = secret(bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F"))
    assert derive.wrap(kek, data).hex().upper() == (
        "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
    )


def test_unwrap_rejects_wrong_kek_and_damage() -> None:
    assert derive.unwrap(secret(os.urandom(32)), WRAPPED) is None
    damaged = bytearray(WRAPPED)
    damaged[20] ^= 1
    assert derive.unwrap(secret(KEK_32), bytes(damaged)) is None
    assert derive.unwrap(secret(KEK_32), WRAPPED[:-1]) is None


# Application keys: luks_tpm.derive must give the contract's vectors (docs/derivation.md; the table and
# its reference implementation are in test_app_key_vectors.py).


def test_app_hmac_message_layout() -> None:
    assert derive.app_hmac_message(1000, "myservice") == b"luks-tpm/app/v1\x001000\x00myservice"
    assert derive.app_hmac_message(0, "a") == b"luks-tpm/app/v1\x000\x00a"
    # Never a volume message: those start "luks-tpm/v1\0".
    assert not derive.app_hmac_message(0, "a").startswith(derive.hmac_message(UUID, b"")[:12])


def test_app_key_vectors() -> None:
    for vector in APP_VECTORS:
        with derive.app_expand(secret(APP_PRK), vector.uid, vector.name, vector.length) as key:
            assert bytes(key.view()).hex() == vector.key
        assert derive.app_hmac_message(vector.uid, vector.name) == app_message(vector.uid, vector.name)


def test_app_key_domain_is_not_the_volume_domain() -> None:
    """Same PRK, same length: an application key named like a volume UUID is not that volume's key."""
    assert bytes(derive.app_expand(secret(PRK), 0, UUID, 32).view()) != KEK_32


def test_app_key_rejects_bad_lengths_names_and_uids() -> None:
    for length in (0, 15, 65, 255):
        with pytest.raises(ValueError):
            derive.app_expand(secret(APP_PRK), 1000, "myservice", length)
    for name in ("", "x" * 201, "a/b", "a b", "naïve", "a;b", "a\0b"):
        with pytest.raises(ValueError):
            derive.app_hmac_message(1000, name)
    for uid in (-1, 2**32 - 1, 2**32):  # (uid_t)-1 is no uid
        with pytest.raises(ValueError):
            derive.app_hmac_message(uid, "myservice")
    assert derive.app_hmac_message(1000, "x" * 200).endswith(b"x" * 200)
