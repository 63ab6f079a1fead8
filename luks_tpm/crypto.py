"""What luks-tpm takes from OpenSSL's libcrypto: single AES blocks (the RFC 3394 key wrap in derive.py)
and HMAC-SHA256 (HKDF in derive.py).

The only libcrypto user in luks-tpm. libcrypto.so.3 is on every system and in every initramfs that
has libtss2-esys (it links it), so this costs nothing to ship, where the `cryptography` package costs
megabytes and an import measured in tenths of a second at boot.

Keys, blocks and MACs pass to libcrypto as pointers into `Secret`s, and results are written straight
into `Secret`s: nothing is copied into Python objects (Python's own hmac would hand back its output as
`bytes`, which cannot be zeroed). The one copy outside our locked memory is the key schedule in
libcrypto's cipher context, for as long as a `BlockCipher` is open: see `close`.
"""

from __future__ import annotations

import ctypes
from errno import EIO, ENOMEM, ENOSYS
from types import TracebackType
from typing import Self

from .clib import CLibrary, CLibraryError, Convention
from .secret import Secret

BLOCK_SIZE = 16

_p = ctypes.c_void_p
_int = ctypes.c_int


_crypto = CLibrary(
    "libcrypto.so.3",
    {
        "EVP_aes_128_ecb": (_p, []),
        "EVP_aes_192_ecb": (_p, []),
        "EVP_aes_256_ecb": (_p, []),
        "EVP_CIPHER_CTX_new": (_p, []),
        "EVP_CIPHER_CTX_free": (None, [_p]),
        # ctx, cipher, engine, key, iv, enc
        "EVP_CipherInit_ex": (_int, [_p, _p, _p, _p, _p, _int]),
        "EVP_CIPHER_CTX_set_padding": (_int, [_p, _int]),
        # ctx, out, &outl, in, inl
        "EVP_CipherUpdate": (_int, [_p, _p, ctypes.POINTER(_int), _p, _int]),
        "ERR_clear_error": (None, []),
        "EVP_sha256": (_p, []),
        # evp_md, key, key_len, data, data_len, md, &md_len: returns md, or NULL on failure
        "HMAC": (_p, [_p, _p, _int, _p, ctypes.c_size_t, _p, ctypes.POINTER(ctypes.c_uint)]),
    },
    convention=Convention.ONE_IS_SUCCESS,
    install_hint="install libssl3 (OpenSSL 3's libcrypto)",
)

_CIPHERS = {16: "EVP_aes_128_ecb", 24: "EVP_aes_192_ecb", 32: "EVP_aes_256_ecb"}
HMAC_SHA256_SIZE = 32


def _call(name: str, *args: object) -> None:
    try:
        _crypto.call(name, *args)
    except CLibraryError:
        # The reason sits on libcrypto's per-thread error queue: leave nothing there for ESYS's own
        # libcrypto calls in this thread to misread as theirs.
        _crypto.function("ERR_clear_error")()
        raise


class BlockCipher:
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def hmac_sha256(key: Secret, message: memoryview, out: memoryview) -> None:
    """out = HMAC-SHA256(key, message), computed by libcrypto straight into `out` (32 bytes). `message`
    and `out` are views into Secrets' buffers (writable, so ctypes can point into them without a copy).
    One-shot HMAC() frees its context with the key cleansed (OpenSSL 3)."""
    if len(out) != HMAC_SHA256_SIZE:
        raise ValueError("an HMAC-SHA256 output is 32 bytes")
    written = ctypes.c_uint(0)
    result = _crypto.function("HMAC")(
        _crypto.function("EVP_sha256")(),
        key.as_ctypes(),
        len(key),
        (ctypes.c_char * len(message)).from_buffer(message),
        len(message),
        (ctypes.c_char * len(out)).from_buffer(out),
        ctypes.byref(written),
    )
    if result is None or written.value != HMAC_SHA256_SIZE:
        _crypto.function("ERR_clear_error")()
        raise CLibraryError(EIO, "HMAC")
