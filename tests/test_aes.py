"""luks_tpm.aes: libcrypto's AES blocks, RFC 3394 over them, and a key wrap that loads no `cryptography`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from luks_tpm import derive
from luks_tpm.aes import BlockCipher, cfb_encrypt
from luks_tpm.secret import Secret

from .helpers import REPO

KEY_256 = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
DATA_256 = bytes.fromhex("00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f")

# FIPS-197 appendix C: the example vectors for each key size (key = the first bytes of KEY_256).
FIPS_197 = [
    (16, "69c4e0d86a7b0430d8cdb78070b4c55a"),
    (24, "dda97ca4864cdfe06eaf70a0ec0d7191"),
    (32, "8ea2b7ca516745bfeafc49904b496089"),
]
# RFC 3394 section 4 (4.1 to 4.6): (KEK bytes, key data bytes, ciphertext), KEK and data being prefixes
# of KEY_256 and DATA_256.
RFC_3394 = [
    (16, 16, "1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5"),
    (24, 16, "96778b25ae6ca435f92b5b97c050aed2468ab8a17ad84e5d"),
    (32, 16, "64e8c3f9ce0f5ba263e9777905818a2a93c8191e7d6e8ae7"),
    (24, 24, "031d33264e15d33268f24ec260743edce1c6c7ddee725a936ba814915c6762d2"),
    (32, 24, "a8f9bc1612c68b3ff6e6f4fbe30e71e4769c8b80a32cb8958cd5d17d6b254da1"),
    (32, 32, "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21"),
]


def secret(data: bytes) -> Secret:
    return Secret.copy_of(bytearray(data), zero_source=True)


@pytest.mark.parametrize(("key_size", "ciphertext"), FIPS_197)
def test_single_blocks_match_fips_197(key_size: int, ciphertext: str) -> None:
    key, plaintext = secret(KEY_256[:key_size]), DATA_256[:16]
    with secret(plaintext) as block:
        with BlockCipher(key, encrypt=True) as aes:
            aes.apply(block)
            assert bytes(block.view()).hex() == ciphertext
        with BlockCipher(key, encrypt=False) as aes:
            aes.apply(block)
            assert bytes(block.view()) == plaintext


@pytest.mark.parametrize(("kek_size", "data_size", "ciphertext"), RFC_3394)
def test_key_wrap_matches_rfc_3394_section_4(kek_size: int, data_size: int, ciphertext: str) -> None:
    kek, data = secret(KEY_256[:kek_size]), secret(DATA_256[:data_size])
    wrapped = derive.wrap(kek, data)
    assert wrapped.hex() == ciphertext
    unwrapped = derive.unwrap(kek, wrapped)
    assert unwrapped is not None and unwrapped.equals(data)
    damaged = bytearray(wrapped)
    damaged[0] ^= 0x80  # the integrity value itself
    assert derive.unwrap(kek, bytes(damaged)) is None


def test_block_cipher_refuses_bad_keys_blocks_and_use_after_close() -> None:
    for size in (8, 20, 33, 64):
        with pytest.raises(ValueError, match="16, 24 or 32"):
            BlockCipher(secret(bytes(size)), encrypt=True)
    aes = BlockCipher(secret(KEY_256), encrypt=True)
    with pytest.raises(ValueError, match="16-byte"):
        aes.apply(secret(bytes(32)))
    aes.close()
    aes.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        aes.apply(secret(bytes(16)))


# AES-CFB128 with the all-zero IV TPM 2.0 uses, against pyca `cryptography`; the lengths cover partial blocks.
@pytest.mark.parametrize("key_size", [16, 24, 32])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 64, 106])
def test_cfb_matches_cryptography(key_size: int, length: int) -> None:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    data = bytes((7 * i + 3) % 256 for i in range(length))
    encryptor = Cipher(algorithms.AES(KEY_256[:key_size]), CFB(bytes(16))).encryptor()
    expected = encryptor.update(data) + encryptor.finalize()
    with secret(data) as buffer:
        cfb_encrypt(secret(KEY_256[:key_size]), buffer)
        assert bytes(buffer.view()) == expected


def test_cfb_refuses_bad_keys() -> None:
    with pytest.raises(ValueError, match="16, 24 or 32"):
        cfb_encrypt(secret(bytes(20)), secret(bytes(16)))


_NO_CRYPTOGRAPHY = textwrap.dedent(
    """
    import sys
    from luks_tpm import derive
    from luks_tpm.secret import Secret

    kek, key = Secret.copy_of(bytearray(range(32))), Secret.copy_of(bytearray(range(64)))
    unwrapped = derive.unwrap(kek, derive.wrap(kek, key))
    assert unwrapped is not None and unwrapped.equals(key)
    print(" ".join(sorted(name for name in sys.modules if name.partition(".")[0] in ("cryptography", "_cffi_backend"))))
    """
)


def test_key_wrap_loads_no_cryptography_package() -> None:
    """A wrapped token's unlock goes through derive.wrap/unwrap: those must not pull in pyca's
    `cryptography` (nor the cffi backend, which it loads), whose import alone costs the boot a large share of its
    Python time and the initramfs megabytes."""
    result = subprocess.run(
        [sys.executable, "-c", _NO_CRYPTOGRAPHY], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"loaded by luks_tpm.derive: {result.stdout.strip()}"
