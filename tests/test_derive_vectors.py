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
    return Secret.copy_of(bytearray(data), wipe_source=True)


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


# Application keys (request-key `user luks-tpm:app:<name>`, decisions of issue 12): the vectors the contract
# documentation gives, computed there by a reference implementation and cross-checked with cryptography.
APP_PRK = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
APP_VECTORS = [
    (0, "myservice", 32, "90f2b2201ed2161dd005b9f8813fc0e2786324a8f596f11b5352e568dd4f6ba8"),
    (1000, "myservice", 32, "7f862737815e49ccd456ea315b904307fabe18202dd00d6e3e1b9dca66a9e50c"),
    (1000, "myservice", 16, "f9f53f185db8369b29fbfeb007145f60"),
    (1000, "myservice", 64, "19465b024c1ec12294411c4e46c6f9ef45d7b8ea6657e5d43fe1e6b96bfd42f3"
                            "f48ddc472b29e35e709c2907c5a973bd2873cb1a938469859dd36d19a9f3aef6"),
    (65534, "backup@host:v2.1+x_y-z", 48, "013b957f656145e5d1cf54952e852c2001ba6116689cf059"
                                         "68fa64667b66d49b2d84cbf715512cc8456318132bd54d56"),
    (4294967294, "a", 16, "911f722ab9622087414e0b7161a0732c"),
]


def test_app_hmac_message_layout() -> None:
    assert derive.app_hmac_message(1000, "myservice") == b"luks-tpm/app/v1\x001000\x00myservice"
    assert derive.app_hmac_message(0, "a") == b"luks-tpm/app/v1\x000\x00a"
    # Never a volume message: those start "luks-tpm/v1\0".
    assert not derive.app_hmac_message(0, "a").startswith(derive.hmac_message(UUID, b"")[:12])


def test_app_key_vectors() -> None:
    for uid, name, length, expected in APP_VECTORS:
        key = derive.app_expand(secret(APP_PRK), uid, name, length)
        assert bytes(key.view()).hex() == expected
        info = b"luks-tpm application key\x00" + str(uid).encode() + b"\x00" + name.encode() + length.to_bytes(2, "big")
        assert HKDFExpand(hashes.SHA256(), length, info).derive(APP_PRK).hex() == expected


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
