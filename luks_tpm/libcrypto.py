"""OpenSSL 3's libcrypto, bound once: AES for aes.py, P-256 for ecdh.py, random bytes for duplication.py,
SHA-256 and HMAC-SHA256 computed straight into Secrets (Python's hashlib and hmac would hand their
results back as `bytes`, which cannot be zeroed) for derive.py and duplication.py, and X.509 signature
checks for the boot chain's Authenticode signatures (bootchain/signature.py).

libcrypto.so.3 is on every system and in every initramfs that has libtss2-esys (it links it), so
binding it costs nothing to ship, where the `cryptography` package costs megabytes and an import
measured in tenths of a second at boot.
"""

from __future__ import annotations

import ctypes
from errno import EIO

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
        # ---- SHA-256 and HMAC-SHA256 ----
        "EVP_sha256": (_p, []),
        # data, count, md, &size, type, engine
        "EVP_Digest": (_int, [_p, _size, _p, ctypes.POINTER(ctypes.c_uint), _p, _p]),
        # evp_md, key, key_len, data, data_len, md, &md_len: md, or NULL on failure
        "HMAC": (_p, [_p, _p, _int, _p, _size, _p, ctypes.POINTER(ctypes.c_uint)]),
        "ERR_clear_error": (None, []),
        # ---- X.509 certificates and signatures (bootchain/signature.py) ----
        # NULL, &pointer to DER (advanced past it), length: the certificate, or NULL
        "d2i_X509": (_p, [_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
        "X509_free": (None, [_p]),
        "X509_get0_pubkey": (_p, [_p]),
        # certificate, public key: 1 when that key signed the certificate
        "X509_verify": (_int, [_p, _p]),
        "EVP_get_digestbyname": (_p, [ctypes.c_char_p]),
        "EVP_MD_CTX_new": (_p, []),
        "EVP_MD_CTX_free": (None, [_p]),
        # ctx, &pkey_ctx (NULL), md, engine, public key
        "EVP_DigestVerifyInit": (_int, [_p, _p, _p, _p, _p]),
        # ctx, signature, its length, signed data, its length: 1 valid, 0 not
        "EVP_DigestVerify": (_int, [_p, ctypes.c_char_p, _size, ctypes.c_char_p, _size]),
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


SHA256_SIZE = 32


def _pointer(view: memoryview) -> ctypes.Array[ctypes.c_char]:
    """A ctypes pointer into a writable buffer (a Secret's view, a bytearray), without a copy."""
    return (ctypes.c_char * len(view)).from_buffer(view)


def _check_out(out: memoryview) -> None:
    if len(out) != SHA256_SIZE:
        raise ValueError("a SHA-256 output is 32 bytes")


def sha256(message: memoryview, out: memoryview) -> None:
    """out = SHA-256(message), written by libcrypto into `out` (a view into a Secret). One-shot EVP_Digest
    frees its context cleansed (OpenSSL 3)."""
    _check_out(out)
    written = ctypes.c_uint(0)
    digest = libcrypto.function("EVP_sha256")()
    call("EVP_Digest", _pointer(message), len(message), _pointer(out), ctypes.byref(written), digest, None)
    if written.value != SHA256_SIZE:
        raise CLibraryError(EIO, "EVP_Digest")


def hmac_sha256(key: memoryview, message: memoryview, out: memoryview) -> None:
    """out = HMAC-SHA256(key, message), written by libcrypto into `out` (a view into a Secret). One-shot
    HMAC() frees its context with the key cleansed (OpenSSL 3)."""
    _check_out(out)
    written = ctypes.c_uint(0)
    result = libcrypto.function("HMAC")(
        libcrypto.function("EVP_sha256")(),
        _pointer(key),
        len(key),
        _pointer(message),
        len(message),
        _pointer(out),
        ctypes.byref(written),
    )
    if result is None or written.value != SHA256_SIZE:
        clear_errors()
        raise CLibraryError(EIO, "HMAC")


class _Certificate:
    """An X509 parsed from DER for the length of a `with` block; `.key` is its public key (or None)."""

    def __init__(self, der: bytes) -> None:
        pointer = ctypes.c_char_p(der)
        self.x509 = libcrypto.function("d2i_X509")(None, ctypes.byref(pointer), len(der))
        self.key = libcrypto.function("X509_get0_pubkey")(self.x509) if self.x509 else None

    def __enter__(self) -> _Certificate:
        return self

    def __exit__(self, *_: object) -> None:
        if self.x509:
            libcrypto.function("X509_free")(self.x509)
        clear_errors()  # a refused certificate or signature leaves its reasons on the queue


def certificate_signed_by(certificate: bytes, issuer: bytes) -> bool:
    """Whether `issuer`'s key made the signature on `certificate` (both DER). Names, dates and
    extensions are not looked at: shim checks none of them either, having no trusted clock."""
    with _Certificate(certificate) as child, _Certificate(issuer) as parent:
        return bool(child.key and parent.key) and libcrypto.function("X509_verify")(child.x509, parent.key) == 1


def signature_valid(certificate: bytes, signature: bytes, data: bytes, digest: str) -> bool:
    """Whether `signature` over `data` (hashed with `digest`, e.g. "sha256") verifies with the public key
    of `certificate` (DER): RSA PKCS#1 v1.5 or ECDSA, as the key's type says."""
    with _Certificate(certificate) as signer:
        md = libcrypto.function("EVP_get_digestbyname")(digest.encode("ascii"))
        ctx = libcrypto.function("EVP_MD_CTX_new")()
        if not (signer.key and md and ctx):
            libcrypto.function("EVP_MD_CTX_free")(ctx)
            return False
        try:
            if libcrypto.function("EVP_DigestVerifyInit")(ctx, None, md, None, signer.key) != 1:
                return False
            verify = libcrypto.function("EVP_DigestVerify")
            return bool(verify(ctx, signature, len(signature), data, len(data)) == 1)
        finally:
            libcrypto.function("EVP_MD_CTX_free")(ctx)
