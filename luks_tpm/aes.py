"""AES from OpenSSL's libcrypto: single blocks for the RFC 3394 key wrap in derive.py, and CFB for the
TPM 2.0 duplication format in duplication.py.

The key and every block pass to libcrypto as pointers into `Secret`s; nothing is copied into Python
objects. The one copy outside our locked memory is the key schedule in libcrypto's cipher context,
for as long as a `BlockCipher` is open: see `close`.
"""

from __future__ import annotations

import ctypes
from errno import EIO, ENOMEM, ENOSYS

from .clib import CLibraryError
from .libcrypto import call as _call
from .libcrypto import libcrypto as _crypto
from .secret import Released, Secret

BLOCK_SIZE = 16

_int = ctypes.c_int

_CIPHERS = {16: "EVP_aes_128_ecb", 24: "EVP_aes_192_ecb", 32: "EVP_aes_256_ecb"}
_CFB_CIPHERS = {16: "EVP_aes_128_cfb128", 24: "EVP_aes_192_cfb128", 32: "EVP_aes_256_cfb128"}


class BlockCipher(Released):
    """AES (ECB, no padding) under `key`, one 16-byte block at a time, in place; a context manager."""

    def __init__(self, key: Secret, *, encrypt: bool) -> None:
        self._ctx: int | None = None  # set first: __del__ runs even when the key is refused
        name = _CIPHERS.get(len(key))
        if name is None:
            raise ValueError("an AES key is 16, 24 or 32 bytes")
        self._ctx = _crypto.function("EVP_CIPHER_CTX_new")()
        if self._ctx is None:
            raise CLibraryError(ENOMEM, "EVP_CIPHER_CTX_new")  # its only failure
        try:
            cipher = _crypto.function(name)()
            if cipher is None:
                raise CLibraryError(ENOSYS, name)  # a libcrypto built without AES
            _call("EVP_CipherInit_ex", self._ctx, cipher, None, key.as_ctypes(), None, int(encrypt))
            # Exactly one block in, one block out: no padding block, nothing held back for a final call.
            _call("EVP_CIPHER_CTX_set_padding", self._ctx, 0)
        except BaseException:
            self.close()
            raise

    def apply(self, block: Secret) -> None:
        """Encrypt (or decrypt) the 16 bytes of `block` in place (ECB allows in == out)."""
        if self._ctx is None:
            raise ValueError("the cipher is closed")
        if len(block) != BLOCK_SIZE:
            raise ValueError("AES works on 16-byte blocks")
        written = _int(0)
        pointer = block.as_ctypes()
        _call("EVP_CipherUpdate", self._ctx, pointer, ctypes.byref(written), pointer, BLOCK_SIZE)
        if written.value != BLOCK_SIZE:
            raise CLibraryError(EIO, "EVP_CipherUpdate")  # a whole block in, and not a whole block out

    def close(self) -> None:
        # EVP_CIPHER_CTX_free cleanses in OpenSSL 3: it resets the context, and the AES provider frees
        # its own context (the key schedule) with OPENSSL_clear_free, which zeroes before freeing.
        if self._ctx is not None:
            _crypto.function("EVP_CIPHER_CTX_free")(self._ctx)
            self._ctx = None


def cfb_encrypt(key: Secret, data: Secret) -> None:
    """AES-CFB with 128-bit feedback and an all-zero IV, in place: how TPM 2.0 encrypts a sensitive area
    under a symmetric key derived for that one message (TPM 2.0 Part 1, "Symmetric Encryption"), so
    the zero IV is safe there and nowhere else."""
    name = _CFB_CIPHERS.get(len(key))
    if name is None:
        raise ValueError("an AES key is 16, 24 or 32 bytes")
    ctx = _crypto.function("EVP_CIPHER_CTX_new")()
    if ctx is None:
        raise CLibraryError(ENOMEM, "EVP_CIPHER_CTX_new")
    try:
        cipher = _crypto.function(name)()
        if cipher is None:
            raise CLibraryError(ENOSYS, name)
        _call("EVP_CipherInit_ex", ctx, cipher, None, key.as_ctypes(), bytes(BLOCK_SIZE), 1)
        written = _int(0)
        pointer = data.as_ctypes()
        # CFB is a stream mode: in == out is allowed, and every byte comes out of the one update.
        _call("EVP_CipherUpdate", ctx, pointer, ctypes.byref(written), pointer, len(data))
        if written.value != len(data):
            raise CLibraryError(EIO, "EVP_CipherUpdate")
    finally:
        _crypto.function("EVP_CIPHER_CTX_free")(ctx)  # cleanses the key schedule (see BlockCipher.close)
