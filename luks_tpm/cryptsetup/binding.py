"""libcryptsetup itself: its soname, the one table of the C functions luks-tpm calls, constants and
structures from libcryptsetup.h (cryptsetup 2.6.1, unchanged in 2.7), errno as `CryptsetupError`, and
libcryptsetup's log routed into `logging.getLogger("luks_tpm.cryptsetup")`."""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..clib import CLibrary, CLibraryError, Convention
from ..settings import Pbkdf

log = logging.getLogger("luks_tpm.cryptsetup")
SONAME = "libcryptsetup.so.12"

log.addHandler(logging.NullHandler())  # libcryptsetup's errors are not printed unless logging is set up

# --- constants from libcryptsetup.h -------------------------------------------------------------

ANY_SLOT = -1  # CRYPT_ANY_SLOT
ANY_TOKEN = -1  # CRYPT_ANY_TOKEN
ACTIVATE_READONLY = 1 << 0  # CRYPT_ACTIVATE_READONLY
ACTIVATE_ALLOW_DISCARDS = 1 << 3  # CRYPT_ACTIVATE_ALLOW_DISCARDS
ACTIVATE_KEYRING_KEY = 1 << 11  # CRYPT_ACTIVATE_KEYRING_KEY

_PBKDF_NO_BENCHMARK = 1 << 1  # CRYPT_PBKDF_NO_BENCHMARK
_LOG_NORMAL, _LOG_ERROR, _LOG_VERBOSE, _LOG_DEBUG, _LOG_DEBUG_JSON = 0, 1, 2, -1, -2
_DEBUG_ALL, _DEBUG_NONE = -1, 0  # CRYPT_DEBUG_ALL, CRYPT_DEBUG_NONE
SLOT_ACTIVE, SLOT_ACTIVE_LAST = 2, 3  # crypt_keyslot_info
LUKS2 = b"LUKS2"
MAX_TOKENS = 32  # LUKS2_TOKENS_MAX, used when crypt_token_max() is missing (< 2.4)

_LOG_LEVELS = {
    _LOG_ERROR: logging.ERROR,
    _LOG_NORMAL: logging.INFO,
    _LOG_VERBOSE: logging.DEBUG,
    _LOG_DEBUG: logging.DEBUG,
    _LOG_DEBUG_JSON: logging.DEBUG,
}


class TokenInfo(enum.IntEnum):
    """crypt_token_info."""

    INVALID = 0
    INACTIVE = 1
    INTERNAL = 2
    INTERNAL_UNKNOWN = 3
    EXTERNAL = 4
    EXTERNAL_UNKNOWN = 5


class PbkdfType(ctypes.Structure):
    """struct crypt_pbkdf_type."""

    _fields_ = (
        ("type", ctypes.c_char_p),
        ("hash", ctypes.c_char_p),
        ("time_ms", ctypes.c_uint32),
        ("iterations", ctypes.c_uint32),
        ("max_memory_kb", ctypes.c_uint32),
        ("parallel_threads", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class ParamsLuks2(ctypes.Structure):
    """struct crypt_params_luks2."""

    _fields_ = (
        ("pbkdf", ctypes.POINTER(PbkdfType)),
        ("integrity", ctypes.c_char_p),
        ("integrity_params", ctypes.c_void_p),  # const struct crypt_params_integrity *, unused
        ("data_alignment", ctypes.c_size_t),
        ("data_device", ctypes.c_char_p),
        ("sector_size", ctypes.c_uint32),
        ("label", ctypes.c_char_p),
        ("subsystem", ctypes.c_char_p),
    )


cd_t = ctypes.c_void_p  # struct crypt_device *
_str = ctypes.c_char_p  # const char * holding text
_key = ctypes.POINTER(ctypes.c_char)  # const char * / char * holding key material: a Secret's buffer
_strp = ctypes.POINTER(ctypes.c_char_p)  # const char ** out-parameter
_int, _u32, _u64, size_t = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# name -> (restype, argtypes): the whole C surface luks-tpm uses.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "crypt_init": (_int, [ctypes.POINTER(cd_t), _str]),
    "crypt_free": (None, [cd_t]),
    "crypt_load": (_int, [cd_t, _str, ctypes.c_void_p]),
    "crypt_format": (_int, [cd_t, _str, _str, _str, _str, _key, size_t, ctypes.POINTER(ParamsLuks2)]),
    "crypt_set_pbkdf_type": (_int, [cd_t, ctypes.POINTER(PbkdfType)]),
    "crypt_get_pbkdf_default": (ctypes.POINTER(PbkdfType), [_str]),
    "crypt_get_type": (_str, [cd_t]),
    "crypt_get_uuid": (_str, [cd_t]),
    "crypt_get_volume_key_size": (_int, [cd_t]),
    "crypt_volume_key_verify": (_int, [cd_t, _key, size_t]),
    "crypt_volume_key_get": (_int, [cd_t, _int, _key, ctypes.POINTER(size_t), _key, size_t]),
    "crypt_keyslot_add_by_volume_key": (_int, [cd_t, _int, _key, size_t, _key, size_t]),
    "crypt_keyslot_max": (_int, [_str]),
    "crypt_keyslot_status": (_int, [cd_t, _int]),
    "crypt_keyslot_destroy": (_int, [cd_t, _int]),
    "crypt_token_max": (_int, [_str]),
    "crypt_token_json_get": (_int, [cd_t, _int, _strp]),
    "crypt_token_json_set": (_int, [cd_t, _int, _str]),
    "crypt_token_status": (_int, [cd_t, _int, _strp]),
    "crypt_dump_json": (_int, [cd_t, _strp, _u32]),
    "crypt_activate_by_volume_key": (_int, [cd_t, _str, _key, size_t, _u32]),
    "crypt_deactivate": (_int, [cd_t, _str]),
    "crypt_set_log_callback": (None, [cd_t, _LOG_CALLBACK, ctypes.c_void_p]),
    "crypt_set_debug_level": (None, [_int]),
    "crypt_get_version": (_str, []),  # not in 2.6: used only when present
}


class CryptsetupError(CLibraryError):
    """A libcryptsetup call returned a negative errno, with what libcryptsetup logged as errors during
    the call (`log`: its own words, e.g. "concurrent metadata update"). No key material, by construction."""

    def __init__(self, errno: int, function: str) -> None:
        super().__init__(errno, function)
        self.log = list(_errors_logged)


_errors_logged: list[str] = []  # libcryptsetup's error messages during the current call


def _on_log(level: int, message: bytes | None, _usrptr: int | None) -> None:
    text = (message or b"").decode("utf-8", "replace").rstrip("\n")
    if level == _LOG_ERROR:
        _errors_logged.append(text)
    log.log(_LOG_LEVELS.get(level, logging.DEBUG), "%s", text)


_log_callback = _LOG_CALLBACK(_on_log)  # referenced for the life of the process: libcryptsetup keeps it
_c = CLibrary(
    SONAME,
    _SIGNATURES,
    convention=Convention.NEGATIVE_ERRNO,
    error=CryptsetupError,
    install_hint="install libcryptsetup12 (cryptsetup 2.4 or later)",
)
_log_routed = False


def function(name: str) -> Callable[..., Any]:
    global _log_routed  # noqa: PLW0603 - libcryptsetup's log goes to ours from the first call on
    if not _log_routed:
        _log_routed = True
        _c.function("crypt_set_log_callback")(None, _log_callback, None)
    return _c.function(name)


def call(name: str, *args: Any) -> int:
    """Call an int-returning function; a negative result is raised as `CryptsetupError`."""
    function(name)
    _errors_logged.clear()
    return _c.call(name, *args)


def has_function(name: str) -> bool:
    """Whether the loaded libcryptsetup exports `name` (e.g. crypt_get_version needs 2.7)."""
    return _c.has(name)


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


def library_version() -> str:
    """The libcryptsetup release: exact where the library says (crypt_get_version), else its ABI level."""
    if has_function("crypt_get_version"):
        return text(function("crypt_get_version")()) or "unknown"
    # 2.6 and older have no version call. The highest symbol version node (CRYPTSETUP_2.6) names
    # the minor release the library implements; the patch level is not recorded anywhere we can read.
    try:
        _c.library()
        maps = Path("/proc/self/maps").read_text().splitlines()
        path = next(Path(line.split(maxsplit=5)[-1]) for line in maps if f"/{SONAME}" in line)
        nodes = re.findall(rb"CRYPTSETUP_(\d+)\.(\d+)\x00", path.read_bytes())
    except (OSError, StopIteration):
        nodes = []
    if not nodes:
        return "unknown"
    major, minor = max((int(a), int(b)) for a, b in nodes)
    return f"{major}.{minor}.x (exact release unknown)"


def set_debug(enabled: bool) -> None:
    """Turn libcryptsetup's debug messages on or off (they arrive at logging.DEBUG)."""
    function("crypt_set_debug_level")(_DEBUG_ALL if enabled else _DEBUG_NONE)


def device_mapper_available() -> bool:
    """Whether activation can work here: the kernel has device-mapper (/proc/devices lists it and
    /dev/mapper/control exists) and dm-crypt is loaded (/sys/module/dm_crypt) or installed for the
    running kernel (named in modules.builtin or modules.dep, so the kernel can load it on demand)."""
    try:
        devices = Path("/proc/devices").read_text()
    except OSError:
        return False
    if "device-mapper" not in devices.split() or not Path("/dev/mapper/control").exists():
        return False
    if Path("/sys/module/dm_crypt").exists():
        return True
    modules = Path("/lib/modules") / os.uname().release
    for index in ("modules.builtin", "modules.dep"):
        try:
            if "/dm-crypt.ko" in (modules / index).read_text():
                return True
        except OSError:
            continue
    return False


# --- PBKDF --------------------------------------------------------------------------------------


def pbkdf_struct(pbkdf: Pbkdf) -> PbkdfType:
    """A keyslot PBKDF as libcryptsetup takes it; unset costs are the library's LUKS2 defaults."""
    default = function("crypt_get_pbkdf_default")(LUKS2).contents
    argon = pbkdf.type.startswith("argon2")
    return PbkdfType(
        type=pbkdf.type.encode(),
        hash=pbkdf.hash.encode(),
        time_ms=pbkdf.time_ms or default.time_ms,
        iterations=pbkdf.iterations or 0,
        max_memory_kb=(pbkdf.max_memory_kb or default.max_memory_kb) if argon else 0,
        parallel_threads=(pbkdf.parallel_threads or default.parallel_threads) if argon else 0,
        flags=_PBKDF_NO_BENCHMARK if pbkdf.iterations is not None else 0,
    )
