"""Keyring calls only the tests make (reading keyrings, revoking, searching, joining sessions, requesting):
luks-tpm itself needs none of them, so they are bound here, through the project's one way to call C."""

from __future__ import annotations

import ctypes
import errno

from luks_tpm.clib import CLibrary, Convention
from luks_tpm.keyring import KeyringError

_serial = ctypes.c_int32
_long = ctypes.c_long
_library = CLibrary(
    "libkeyutils.so.1",
    {
        "keyctl_search": (_long, [_serial, ctypes.c_char_p, ctypes.c_char_p, _serial]),
        "keyctl_revoke": (_long, [_serial]),
        "keyctl_read": (_long, [_serial, ctypes.c_void_p, ctypes.c_size_t]),
        "keyctl_join_session_keyring": (_serial, [ctypes.c_char_p]),
        "request_key": (_serial, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _serial]),
    },
    convention=Convention.MINUS_ONE,
    error=KeyringError,
)


def search(keyring: int, key_type: str, description: str) -> int | None:
    """The serial of a usable key found from `keyring` (recursively), or None (absent, revoked, expired)."""
    try:
        return _library.call("keyctl_search", keyring, key_type.encode(), description.encode(), 0)
    except KeyringError as error:
        if error.errno in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED):
            return None
        raise


def revoke(serial: int) -> None:
    _library.call("keyctl_revoke", serial)


def read(serial: int) -> bytearray:
    """The payload of a readable key, or a keyring's key serials (native int32 array). A logon key: EOPNOTSUPP."""
    buffer = bytearray(_library.call("keyctl_read", serial, None, 0))
    while True:
        pointer = (ctypes.c_char * len(buffer)).from_buffer(buffer) if buffer else None
        size = _library.call("keyctl_read", serial, pointer, len(buffer))
        if size <= len(buffer):
            del buffer[size:]
            return buffer
        buffer = bytearray(size)


def keyring_contents(keyring: int) -> list[int]:
    return list(memoryview(read(keyring)).cast("i"))


def join_session_keyring(name: str | None = None) -> int:
    """Give the calling thread a new anonymous (None) or named session keyring; its serial."""
    return _library.call("keyctl_join_session_keyring", None if name is None else name.encode())


def request_key(key_type: str, description: str, callout: str | None, keyring: int) -> int:
    """request_key(2), as an application asks for a key."""
    return _library.call(
        "request_key", key_type.encode(), description.encode(), None if callout is None else callout.encode(), keyring
    )
