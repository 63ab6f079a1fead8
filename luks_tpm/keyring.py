"""The kernel keyring, through libkeyutils.so.1 (the only module that makes keyring calls).

Volume keys go in as `logon` keys: the kernel (dm-crypt) can use them, no userspace process can read
them back. Payloads are passed to C as a pointer into the caller's `Secret`; they are never copied into
`bytes` or `str`, and no error message ever carries them (errors name the function and the errno only).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any

from .clib import CLibrary, CLibraryError, Convention
from .secret import Secret, zero

# Special keyring IDs (KEY_SPEC_*), resolved by the kernel against the calling thread's credentials.
THREAD = -1
PROCESS = -2
SESSION = -3
USER = -4
USER_SESSION = -5

_KEYRING_NAMES = {"@t": THREAD, "@p": PROCESS, "@s": SESSION, "@u": USER, "@us": USER_SESSION}

# Permission bits (key_perm_t): possessor, owner user, group, other; one byte each. Only the possessor's
# are used: see logon_key_permissions.
KEY_POS_VIEW = 0x01000000
KEY_POS_READ = 0x02000000
KEY_POS_WRITE = 0x04000000
KEY_POS_SEARCH = 0x08000000
KEY_POS_LINK = 0x10000000
KEY_POS_SETATTR = 0x20000000

_serial = ctypes.c_int32  # key_serial_t
_long = ctypes.c_long

# name -> (restype, argtypes), as declared in keyutils.h. Every one returns -1 and sets errno on failure.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "add_key": (_serial, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, _serial]),
    "keyctl_get_keyring_ID": (_serial, [_serial, ctypes.c_int]),
    "keyctl_setperm": (_long, [_serial, ctypes.c_uint32]),
    "keyctl_set_timeout": (_long, [_serial, ctypes.c_uint]),
    "keyctl_link": (_long, [_serial, _serial]),
    "keyctl_unlink": (_long, [_serial, _serial]),
    "keyctl_describe": (_long, [_serial, ctypes.c_void_p, ctypes.c_size_t]),
    "keyctl_assume_authority": (_long, [_serial]),
    "keyctl_instantiate": (_long, [_serial, ctypes.c_void_p, ctypes.c_size_t, _serial]),
    "keyctl_negate": (_long, [_serial, ctypes.c_uint, _serial]),
}


class KeyringError(CLibraryError):
    """A keyring call failed: `.errno` says why, `.function` which call (e.g. `keyctl_search`)."""


# Loaded on first use, so that commands which never touch the keyring work without libkeyutils.
_library = CLibrary("libkeyutils.so.1", _SIGNATURES, convention=Convention.MINUS_ONE, error=KeyringError)
_call = _library.call


@dataclass(frozen=True)
class KeyDescription:
    type: str
    uid: int
    gid: int
    perm: int
    description: str


def parse_keyring(spec: str) -> int:
    """`@t`, `@p`, `@s`, `@u`, `@us` or a keyring's decimal serial number, as keyctl(1) spells them."""
    if spec in _KEYRING_NAMES:
        return _KEYRING_NAMES[spec]
    if re.fullmatch(r"[0-9]+", spec) and 0 < int(spec) < 2**31:
        return int(spec)
    raise ValueError(f"invalid keyring {spec!r}: use @t, @p, @s, @u, @us or a keyring serial number")


def load_key_target(spec: str) -> int:
    """The serial of the keyring `load-key --keyring SPEC` adds to. ValueError (a usage error) when SPEC
    does not parse, names no keyring, or names a key that is not a keyring.

    The process and thread keyrings exist only once asked for, and creating them is harmless; @s must
    not be created (that would be a new anonymous session, gone when we exit), and it need not be:
    without one the kernel falls back to the user session keyring."""
    special = parse_keyring(spec)
    try:
        # a serial is described as it is (resolving it as keyrings are would need search permission)
        serial = keyring_id(special, create=special in (PROCESS, THREAD)) if special < 0 else special
        kind = describe(serial).type
    except KeyringError as error:
        raise ValueError(f"{spec}: {error.strerror}") from None
    if kind != "keyring":
        raise ValueError(f"{spec} is a {kind} key, not a keyring")
    return serial


def logon_key_permissions() -> int:
    """The tightest permissions a volume key can have and still work for dm-crypt.

    dm-crypt finds the key with request_key() from the process loading the table, searching that
    process's thread, process and session keyrings: a key found that way is *possessed*, so only the
    possessor byte matters. VIEW (describe, /proc/keys), SEARCH (the lookup itself), LINK (so it can be
    linked into another keyring, e.g. cryptsetup's --link-vk-to-keyring) and SETATTR (timeout, revoke).
    No READ (a logon key cannot be read anyway) and no WRITE: a key with these permissions cannot be
    updated in place; unlink it and add a new one instead. The owner, group and others get nothing:
    holding the same uid without possessing the key (another login session) gives no access.
    """
    return KEY_POS_VIEW | KEY_POS_SEARCH | KEY_POS_LINK | KEY_POS_SETATTR


def add_logon_key(description: str, payload: Secret, keyring: int) -> int:
    """Add (or update in place, same serial) the logon key `description` in `keyring`; its serial."""
    if ":" not in description:
        raise ValueError(f"a logon key description needs a 'prefix:' ({description!r} has none)")
    return _call("add_key", b"logon", description.encode(), payload.as_ctypes(), len(payload), keyring)


def set_permissions(serial: int, perm: int) -> None:
    _call("keyctl_setperm", serial, perm)


def set_timeout(serial: int, seconds: int) -> None:
    """Expire the key `seconds` from now (0 removes the timeout)."""
    if not 0 <= seconds < 2**32:
        raise ValueError(f"invalid key timeout {seconds}")
    _call("keyctl_set_timeout", serial, seconds)


def link(serial: int, keyring: int) -> None:
    """Link the key into `keyring`, displacing a key of the same type and description there (atomically)."""
    _call("keyctl_link", serial, keyring)


def unlink(serial: int, keyring: int) -> None:
    _call("keyctl_unlink", serial, keyring)


def keyring_id(keyring: int, *, create: bool = False) -> int:
    """The serial of a special keyring (THREAD, SESSION, ...); KeyringError(ENOKEY) if it does not exist."""
    return _call("keyctl_get_keyring_ID", keyring, int(create))


def _read_into_new_buffer(function: str, serial: int) -> bytearray:
    """keyctl_read/describe return the full size and copy at most buflen: retry until it fits."""
    buffer = bytearray(_call(function, serial, None, 0))
    while True:
        pointer = (ctypes.c_char * len(buffer)).from_buffer(buffer) if buffer else None
        size = _call(function, serial, pointer, len(buffer))
        if size <= len(buffer):
            del buffer[size:]
            return buffer
        zero(buffer)  # the payload grew between the calls
        buffer = bytearray(size)


def describe(serial: int) -> KeyDescription:
    raw = _read_into_new_buffer("keyctl_describe", serial).rstrip(b"\0").decode("utf-8", "surrogateescape")
    key_type, uid, gid, perm, description = raw.split(";", 4)
    return KeyDescription(key_type, int(uid), int(gid), int(perm, 16), description)


# ---- request-key handlers (the process /sbin/request-key runs for a key under construction) ----------


def assume_authority(serial: int) -> None:
    """Act for the process whose request created the uninstantiated key `serial` (calling thread only).

    Only a process holding that request's authorization key (the one /sbin/request-key runs) can; after
    this, `describe`, `instantiate` and `negate` work on the key, and the requester's keyrings are
    searched as theirs.
    """
    _call("keyctl_assume_authority", serial)


def instantiate(serial: int, payload: Secret, keyring: int = 0) -> None:
    """Give the key under construction its payload, read in place from `payload`; waiters wake up.

    `keyring` 0 links it nowhere new: the kernel already linked the key into the keyring the requester
    named (or its default request-key keyring) when the request began.
    """
    _call("keyctl_instantiate", serial, payload.as_ctypes(), len(payload), keyring)


def negate(serial: int, seconds: int, keyring: int = 0) -> None:
    """Instantiate the key negatively: requests for it fail with ENOKEY, without an upcall, for `seconds`."""
    if not 0 < seconds < 2**32:
        raise ValueError(f"invalid negative-key timeout {seconds}")
    _call("keyctl_negate", serial, seconds, keyring)
