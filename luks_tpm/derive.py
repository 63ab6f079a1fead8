"""The software half of key derivation and wrapping (docs/derivation.md, a contract).

PRK comes from the TPM (`TPM2_HMAC` with the derived primary over `hmac_message`); everything here
is deterministic and is pinned by fixed test vectors. All key material stays in `Secret`s: HMAC and AES
run in libcrypto on pointers into them (libcrypto.py, aes.py).
"""

from __future__ import annotations

import hmac
import re

from .secret import Secret

KEK_SIZE = 32
_KW_IV = b"\xa6" * 8
_HASH_SIZE = 32


def hmac_message(uuid: str, salt: bytes) -> bytes:
    """What the TPM's HMAC key is applied to: binds the key to this volume and this binding."""
    return b"luks-tpm/v1\0" + uuid.encode("ascii") + b"\0" + salt


def expand(prk: Secret, uuid: str, length: int) -> Secret:
    """The volume key (or KEK): HKDF-Expand-SHA256 with info = "luks-tpm volume key" 0x00 UUID L."""
    return hkdf_expand(prk, b"luks-tpm volume key\0" + uuid.encode("ascii") + length.to_bytes(2, "big"), length)


def hkdf_expand(prk: Secret, info: bytes, length: int) -> Secret:
    """HKDF-Expand-SHA256 (RFC 5869 section 2.3): T(i) = HMAC(PRK, T(i-1) || info || i). Every
    intermediate holding key bytes is a Secret: the HMAC input is built in one (T(i-1) in its first 32
    bytes, absent for T(1)) and each output lands in another."""
    from .libcrypto import hmac_sha256  # here: libcrypto is loaded only when a key is derived

    if not 0 < length <= 255 * _HASH_SIZE:
        raise ValueError(f"cannot derive {length} bytes")
    okm = Secret(length)
    with Secret(_HASH_SIZE + len(info) + 1) as message, Secret(_HASH_SIZE) as block:
        buffer, out = message.view(), block.view()
        buffer[_HASH_SIZE : _HASH_SIZE + len(info)] = info
        for counter, offset in enumerate(range(0, length, _HASH_SIZE), start=1):
            buffer[-1] = counter
            hmac_sha256(prk.view(), buffer if counter > 1 else buffer[_HASH_SIZE:], out)
            size = min(_HASH_SIZE, length - offset)
            okm.view()[offset : offset + size] = out[:size]
            buffer[:_HASH_SIZE] = out
    return okm


# Application keys (`luks-tpm request-key`, type user, `luks-tpm:app:<name>`): the same derived primary
# (the one without a policy), in a domain of their own: a message no volume derivation can produce
# ("luks-tpm/app/v1" vs "luks-tpm/v1") and an HKDF info of their own.
APP_KEY_SIZES = range(16, 65)
APP_NAME = re.compile(r"[A-Za-z0-9._@+:-]{1,200}")


def _app_binding(uid: int, name: str) -> bytes:
    if not 0 <= uid < 2**32 - 1 or not APP_NAME.fullmatch(name):  # (uid_t)-1 is no uid
        raise ValueError("invalid application key uid or name")
    return str(uid).encode("ascii") + b"\0" + name.encode("ascii")


def app_hmac_message(uid: int, name: str) -> bytes:
    """What the TPM's HMAC key is applied to for the application key `name` of user `uid`."""
    return b"luks-tpm/app/v1\0" + _app_binding(uid, name)


def app_expand(prk: Secret, uid: int, name: str, length: int) -> Secret:
    """HKDF-Expand-SHA256 with info = "luks-tpm application key" 0x00 uid 0x00 name L(2 bytes BE)."""
    if length not in APP_KEY_SIZES:
        raise ValueError(f"application keys are {APP_KEY_SIZES.start} to {APP_KEY_SIZES.stop - 1} bytes")
    info = b"luks-tpm application key\0" + _app_binding(uid, name) + length.to_bytes(2, "big")
    return hkdf_expand(prk, info, length)


def _xor_counter(register: memoryview, t: int) -> None:
    for index, byte in enumerate(t.to_bytes(8, "big")):
        register[index] ^= byte


def wrap(kek: Secret, key: Secret) -> bytes:
    """AES key wrap (RFC 3394) of `key` under `kek`; the result is not secret.

    A never leaves the first half of the block buffer: each step is B = AES(A | R[i]), then A is the
    first half of B (xor t) and R[i] the second, so only R[i] is copied in and out."""
    if len(key) % 8 or len(key) < 16:
        raise ValueError("AES key wrap needs a key of a multiple of 8 bytes, at least 16")
    from .aes import BlockCipher  # here: only wrapped keys need AES, and most are derived directly

    n = len(key) // 8
    with BlockCipher(kek, encrypt=True) as aes, Secret(16) as block, Secret(len(key)) as r:
        b, registers = block.view(), r.view()
        registers[:] = key.view()
        b[:8] = _KW_IV
        for j in range(6):
            for i in range(n):
                b[8:] = registers[8 * i : 8 * i + 8]
                aes.apply(block)
                _xor_counter(b[:8], n * j + i + 1)
                registers[8 * i : 8 * i + 8] = b[8:]
        return bytes(b[:8]) + bytes(registers)


def unwrap(kek: Secret, wrapped: bytes) -> Secret | None:
    """The key inside `wrapped`, or None when the integrity check fails (wrong KEK or damaged data)."""
    if len(wrapped) % 8 or len(wrapped) < 24:
        return None
    from .aes import BlockCipher

    n = len(wrapped) // 8 - 1
    r = Secret(8 * n)
    try:
        with BlockCipher(kek, encrypt=False) as aes, Secret(16) as block:
            b, registers = block.view(), r.view()
            registers[:] = wrapped[8:]
            b[:8] = wrapped[:8]
            for j in reversed(range(6)):
                for i in reversed(range(n)):
                    _xor_counter(b[:8], n * j + i + 1)
                    b[8:] = registers[8 * i : 8 * i + 8]
                    aes.apply(block)
                    registers[8 * i : 8 * i + 8] = b[8:]
            intact = hmac.compare_digest(b[:8], _KW_IV)
    except BaseException:
        r.close()
        raise
    if not intact:
        r.close()
        return None
    return r
