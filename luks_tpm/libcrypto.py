"""OpenSSL 3's libcrypto, bound once: AES for aes.py, P-256 for ecdh.py, random bytes for duplication.py.

libcrypto.so.3 is on every system and in every initramfs that has libtss2-esys (it links it), so
binding it costs nothing to ship, where the `cryptography` package costs megabytes and an import
measured in tenths of a second at boot.
"""

from __future__ import annotations

import ctypes

from .clib import CLibrary, CLibraryError, Convention

_p = ctypes.c_void_p
_int = ctypes.c_int
_size = ctypes.c_size_t

libcrypto = CLibrary(
    "libcrypto.so.3",
    {
        # ---- AES (aes.py) ----
        "EVP_aes_128_ecb": (_p, []),
        "EVP_aes_192_ecb": (_p, []),
        "EVP_aes_256_ecb": (_p, []),
        "EVP_aes_128_cfb128": (_p, []),
        "EVP_aes_192_cfb128": (_p, []),
        "EVP_aes_256_cfb128": (_p, []),
        "EVP_CIPHER_CTX_new": (_p, []),
        "EVP_CIPHER_CTX_free": (None, [_p]),
        # ctx, cipher, engine, key, iv, enc
        "EVP_CipherInit_ex": (_int, [_p, _p, _p, _p, _p, _int]),
        "EVP_CIPHER_CTX_set_padding": (_int, [_p, _int]),
        # ctx, out, &outl, in, inl
        "EVP_CipherUpdate": (_int, [_p, _p, ctypes.POINTER(_int), _p, _int]),
        # ---- NIST P-256 keys and ECDH (ecdh.py) ----
        "EC_KEY_new_by_curve_name": (_p, [_int]),
        "EC_KEY_free": (None, [_p]),
        "EC_KEY_generate_key": (_int, [_p]),
        # key, big-endian private scalar, its length
        "EC_KEY_oct2priv": (_int, [_p, _p, _size]),
        "EC_KEY_get0_group": (_p, [_p]),
        "EC_KEY_get0_private_key": (_p, [_p]),
        "EC_KEY_get0_public_key": (_p, [_p]),
        "EC_KEY_set_public_key": (_int, [_p, _p]),
        "EC_KEY_check_key": (_int, [_p]),
        "EC_POINT_new": (_p, [_p]),
        "EC_POINT_free": (None, [_p]),
        # group, result, generator scalar, point, point scalar, bn_ctx
        "EC_POINT_mul": (_int, [_p, _p, _p, _p, _p, _p]),
        # group, point, octets, length, bn_ctx
        "EC_POINT_oct2point": (_int, [_p, _p, _p, _size, _p]),
        # group, point, form, out, out length, bn_ctx: the length written (0 on failure)
        "EC_POINT_point2oct": (_size, [_p, _p, _int, _p, _size, _p]),
        # group, point, bn_ctx: 1 on the curve, 0 not, -1 error
        "EC_POINT_is_on_curve": (_int, [_p, _p, _p]),
        # out, out length, peer point, own key, kdf (NULL: the raw x coordinate): the length written
        "ECDH_compute_key": (_int, [_p, _size, _p, _p, _p]),
        # buffer, length: OpenSSL's generator for private values (seedValue)
        "RAND_priv_bytes": (_int, [_p, _int]),
        "ERR_clear_error": (None, []),
    },
    convention=Convention.ONE_IS_SUCCESS,
    install_hint="install libssl3 (OpenSSL 3's libcrypto)",
)


def clear_errors() -> None:
    """Empty libcrypto's per-thread error queue: nothing of ours may be left there for ESYS's own
    libcrypto calls in this thread to misread as theirs."""
    libcrypto.function("ERR_clear_error")()


def call(name: str, *args: object) -> None:
    """Call a function that returns 1 on success; a failure raises CLibraryError and clears the queue."""
    try:
        libcrypto.call(name, *args)
    except CLibraryError:
        clear_errors()
        raise
