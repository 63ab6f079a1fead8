"""luks_tpm.libcrypto: SHA-256 and HMAC-SHA256 computed into Secrets agree with Python's hashlib and hmac."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from luks_tpm import libcrypto
from luks_tpm.secret import Secret


@pytest.mark.parametrize("length", [0, 1, 55, 56, 64, 65, 1000])
def test_sha256_is_hashlibs(length: int) -> None:
    message = bytearray(range(256)) * 4
    with Secret(32) as out:
        libcrypto.sha256(memoryview(message)[:length], out.view())
        assert bytes(out.view()) == hashlib.sha256(message[:length]).digest()


@pytest.mark.parametrize("key_length", [1, 32, 64, 65, 200])
@pytest.mark.parametrize("length", [1, 64, 300])
def test_hmac_sha256_is_hmacs(key_length: int, length: int) -> None:
    key = bytes(range(1, key_length + 1))
    message = bytearray(b"m" * length)
    with Secret.copy_of(key) as secret, Secret(32) as out:
        libcrypto.hmac_sha256(secret.view(), memoryview(message), out.view())
        assert bytes(out.view()) == hmac.new(key, message, "sha256").digest()


def test_a_wrong_output_size_is_refused() -> None:
    with Secret(16) as out, pytest.raises(ValueError):
        libcrypto.sha256(memoryview(bytearray(b"x")), out.view())
