"""NIST P-256 points and one-pass ECDH through libcrypto, for the outer wrapper of a duplication blob.

Why OpenSSL's EC_KEY API and not EVP_PKEY_derive: libcrypto.so.3 exports EC_KEY for the whole 3.x ABI
(deprecated in the headers, not removed from the library), and it does exactly the few steps needed
here with plain pointers: set a private scalar from big-endian octets (the test vectors' fixed key),
generate one, multiply, and write the raw shared x coordinate into a caller's buffer. The EVP route
needs OSSL_PARAM arrays built through ctypes and a native-endian copy of a fixed private scalar for
the same result. Either way the private scalar stays in libcrypto's memory (EC_KEY_free clears it
with BN_clear_free) and never becomes a Python int; the shared secret is written straight into a
`Secret`.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from errno import EINVAL, EIO, ENOMEM

from .clib import CLibraryError
from .libcrypto import call, clear_errors, libcrypto
from .secret import Released, Secret

COORDINATE_SIZE = 32  # P-256: 256-bit field elements, big-endian, zero-padded
_NID_P256 = 415  # NID_X9_62_prime256v1 (OpenSSL's obj_mac.h)
_UNCOMPRESSED = 4  # POINT_CONVERSION_UNCOMPRESSED: 04 || x || y
_OCTETS = 1 + 2 * COORDINATE_SIZE


@dataclasses.dataclass(frozen=True)
class Point:
    """A P-256 public point as the TPM marshals it: x and y, each 32 bytes big-endian."""

    x: bytes
    y: bytes

    def octets(self) -> bytes:
        """The SEC 1 uncompressed encoding."""
        if len(self.x) != COORDINATE_SIZE or len(self.y) != COORDINATE_SIZE:
            raise ValueError("a P-256 coordinate is 32 bytes")
        return bytes([_UNCOMPRESSED]) + self.x + self.y


def _new(name: str, *args: object) -> int:
    """A libcrypto constructor's result; NULL (out of memory, or an unknown curve) is an error."""
    handle: int | None = libcrypto.function(name)(*args)
    if handle is None:
        clear_errors()
        raise CLibraryError(ENOMEM, name)
    return handle


@contextmanager
def _ec_key() -> Iterator[int]:
    key = _new("EC_KEY_new_by_curve_name", _NID_P256)
    try:
        yield key
    finally:
        libcrypto.function("EC_KEY_free")(key)


@contextmanager
def _point(group: int, point: Point | None = None) -> Iterator[int]:
    """An EC_POINT of `group`: empty, or set from `point`, which must lie on the curve (EINVAL if not)."""
    handle = _new("EC_POINT_new", group)
    try:
        if point is not None:
            octets = point.octets()
            if (
                libcrypto.function("EC_POINT_oct2point")(group, handle, octets, len(octets), None) != 1
                or libcrypto.function("EC_POINT_is_on_curve")(group, handle, None) != 1
            ):
                clear_errors()
                raise CLibraryError(EINVAL, "EC_POINT_oct2point")
        yield handle
    finally:
        libcrypto.function("EC_POINT_free")(handle)


def is_on_curve(point: Point) -> bool:
    """Whether `point` has 32-byte coordinates and lies on P-256 (it cannot be the point at infinity,
    which has no x and y; P-256's cofactor is 1, so every such point has the group's prime order)."""
    if len(point.x) != COORDINATE_SIZE or len(point.y) != COORDINATE_SIZE:
        return False
    with _ec_key() as key:
        try:
            with _point(libcrypto.function("EC_KEY_get0_group")(key), point):
                return True
        except CLibraryError as error:
            if error.errno != EINVAL:
                raise
            return False


class EphemeralKey(Released):
    """A P-256 key pair held by libcrypto: random, or (for fixed test vectors) from a given scalar.
    A context manager; closing it frees and clears the private scalar."""

    def __init__(self, private: Secret | None = None) -> None:
        self._key: int | None = None  # set first: __del__ runs even when the scalar is refused
        self._key = _new("EC_KEY_new_by_curve_name", _NID_P256)
        try:
            if private is None:
                call("EC_KEY_generate_key", self._key)
            else:
                self._set_private(private)
            self.public = self._public_point()
        except BaseException:
            self.close()
            raise

    def _set_private(self, private: Secret) -> None:
        if len(private) != COORDINATE_SIZE:
            raise ValueError("a P-256 private key is 32 bytes")
        key = self._key
        call("EC_KEY_oct2priv", key, private.as_ctypes(), len(private))
        group = libcrypto.function("EC_KEY_get0_group")(key)
        with _point(group) as public:
            call("EC_POINT_mul", group, public, libcrypto.function("EC_KEY_get0_private_key")(key), None, None, None)
            call("EC_KEY_set_public_key", key, public)  # copies the point
        try:
            call("EC_KEY_check_key", key)  # 0 < d < n, and the public point is d·G
        except CLibraryError:
            raise ValueError("not a valid P-256 private key") from None

    def _public_point(self) -> Point:
        group = libcrypto.function("EC_KEY_get0_group")(self._key)
        point = libcrypto.function("EC_KEY_get0_public_key")(self._key)
        buffer = ctypes.create_string_buffer(_OCTETS)
        written = libcrypto.function("EC_POINT_point2oct")(group, point, _UNCOMPRESSED, buffer, _OCTETS, None)
        if written != _OCTETS:
            clear_errors()
            raise CLibraryError(EIO, "EC_POINT_point2oct")
        return Point(buffer.raw[1 : 1 + COORDINATE_SIZE], buffer.raw[1 + COORDINATE_SIZE :])

    def shared_x(self, peer: Point) -> Secret:
        """Z: the x coordinate of d·Q for the peer's public point Q, 32 bytes (ECDH with cofactor 1, as
        TPM 2.0 Part 1 Annex C.6.1 uses it). EINVAL when Q is not on the curve."""
        if self._key is None:
            raise ValueError("the key is closed")
        z = Secret(COORDINATE_SIZE)
        try:
            with _point(libcrypto.function("EC_KEY_get0_group")(self._key), peer) as q:
                written = libcrypto.function("ECDH_compute_key")(z.as_ctypes(), len(z), q, self._key, None)
            if written != COORDINATE_SIZE:
                clear_errors()
                raise CLibraryError(EIO, "ECDH_compute_key")
        except BaseException:
            z.close()
            raise
        return z

    def close(self) -> None:
        if self._key is not None:
            libcrypto.function("EC_KEY_free")(self._key)
            self._key = None
