"""The one module that calls libcryptsetup (`libcryptsetup.so.12`), through ctypes.

Every C function used is declared once, in `_SIGNATURES`, and resolved on first use, so a function
missing from an older library fails only the feature that needs it (see `has_function`).
A negative errno from libcryptsetup becomes a `CryptsetupError` naming the function; `open_device`
alone turns the errors of opening a device into user-facing `LuksTpmError`s.

libcryptsetup's own messages go to `logging.getLogger("luks_tpm.cryptsetup")`.

Key material (volume keys, passphrases) is passed as `Secret` and handed to C as a pointer into
its locked buffer: it never becomes `bytes` or `str` here, is never logged and never put in an error.
Structures and constants follow `/usr/include/libcryptsetup.h` of cryptsetup 2.6.1 (unchanged in 2.7).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import json
import logging
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .clib import CLibrary, CLibraryError, Convention
from .errors import Cause, ExitCode, LuksTpmError, die
from .secret import Secret

SONAME = "libcryptsetup.so.12"

log = logging.getLogger("luks_tpm.cryptsetup")
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
_SLOT_ACTIVE, _SLOT_ACTIVE_LAST = 2, 3  # crypt_keyslot_info
_LUKS2 = b"LUKS2"
_MAX_TOKENS = 32  # LUKS2_TOKENS_MAX, used when crypt_token_max() is missing (< 2.4)

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


class _PbkdfType(ctypes.Structure):
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


class _ParamsLuks2(ctypes.Structure):
    """struct crypt_params_luks2."""

    _fields_ = (
        ("pbkdf", ctypes.POINTER(_PbkdfType)),
        ("integrity", ctypes.c_char_p),
        ("integrity_params", ctypes.c_void_p),  # const struct crypt_params_integrity *, unused
        ("data_alignment", ctypes.c_size_t),
        ("data_device", ctypes.c_char_p),
        ("sector_size", ctypes.c_uint32),
        ("label", ctypes.c_char_p),
        ("subsystem", ctypes.c_char_p),
    )


_cd = ctypes.c_void_p  # struct crypt_device *
_str = ctypes.c_char_p  # const char * holding text
_key = ctypes.POINTER(ctypes.c_char)  # const char * / char * holding key material: a Secret's buffer
_strp = ctypes.POINTER(ctypes.c_char_p)  # const char ** out-parameter
_int, _u32, _u64, _size = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# name -> (restype, argtypes): the whole C surface luks-tpm uses.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "crypt_init": (_int, [ctypes.POINTER(_cd), _str]),
    "crypt_free": (None, [_cd]),
    "crypt_load": (_int, [_cd, _str, ctypes.c_void_p]),
    "crypt_format": (_int, [_cd, _str, _str, _str, _str, _key, _size, ctypes.POINTER(_ParamsLuks2)]),
    "crypt_set_pbkdf_type": (_int, [_cd, ctypes.POINTER(_PbkdfType)]),
    "crypt_get_pbkdf_default": (ctypes.POINTER(_PbkdfType), [_str]),
    "crypt_get_type": (_str, [_cd]),
    "crypt_get_uuid": (_str, [_cd]),
    "crypt_get_volume_key_size": (_int, [_cd]),
    "crypt_volume_key_verify": (_int, [_cd, _key, _size]),
    "crypt_volume_key_get": (_int, [_cd, _int, _key, ctypes.POINTER(_size), _key, _size]),
    "crypt_keyslot_add_by_volume_key": (_int, [_cd, _int, _key, _size, _key, _size]),
    "crypt_keyslot_max": (_int, [_str]),
    "crypt_keyslot_status": (_int, [_cd, _int]),
    "crypt_token_max": (_int, [_str]),
    "crypt_token_json_get": (_int, [_cd, _int, _strp]),
    "crypt_token_json_set": (_int, [_cd, _int, _str]),
    "crypt_token_status": (_int, [_cd, _int, _strp]),
    "crypt_dump_json": (_int, [_cd, _strp, _u32]),
    "crypt_activate_by_volume_key": (_int, [_cd, _str, _key, _size, _u32]),
    "crypt_set_log_callback": (None, [_cd, _LOG_CALLBACK, ctypes.c_void_p]),
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


def _missing(soname: str) -> Exception:
    return LuksTpmError(f"cannot load {soname}", hint="install libcryptsetup12 (cryptsetup 2.4 or later)",
                        code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED)


_log_callback = _LOG_CALLBACK(_on_log)  # referenced for the life of the process: libcryptsetup keeps it
_c = CLibrary(SONAME, _SIGNATURES, convention=Convention.NEGATIVE_ERRNO, error=CryptsetupError, missing=_missing)
_log_routed = False


def _fn(name: str) -> Callable[..., Any]:
    global _log_routed  # noqa: PLW0603 - libcryptsetup's log goes to ours from the first call on
    if not _log_routed:
        _log_routed = True
        _c.function("crypt_set_log_callback")(None, _log_callback, None)
    return _c.function(name)


def _call(name: str, *args: Any) -> int:
    """Call an int-returning function; a negative result is raised as `CryptsetupError`."""
    _fn(name)
    _errors_logged.clear()
    return _c.call(name, *args)


def has_function(name: str) -> bool:
    """Whether the loaded libcryptsetup exports `name` (e.g. crypt_get_version needs 2.7)."""
    return _c.has(name)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


def library_version() -> str:
    """The libcryptsetup release: exact where the library says (crypt_get_version), else its ABI level."""
    if has_function("crypt_get_version"):
        return _text(_fn("crypt_get_version")()) or "unknown"
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
    _fn("crypt_set_debug_level")(_DEBUG_ALL if enabled else _DEBUG_NONE)


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


@dataclass(frozen=True)
class Pbkdf:
    """Keyslot PBKDF. `iterations` given: no benchmark, exactly that cost (time cost for argon2)."""

    type: str  # "pbkdf2" | "argon2id" | "argon2i"
    hash: str = "sha256"
    iterations: int | None = None
    time_ms: int = 0  # 0: libcryptsetup's LUKS2 default
    max_memory_kb: int = 0  # argon2 only; 0: the default
    parallel_threads: int = 0  # argon2 only; 0: the default

    def _struct(self) -> _PbkdfType:
        default = _fn("crypt_get_pbkdf_default")(_LUKS2).contents
        argon = self.type.startswith("argon2")
        return _PbkdfType(
            type=self.type.encode(),
            hash=self.hash.encode(),
            time_ms=self.time_ms or default.time_ms,
            iterations=self.iterations or 0,
            max_memory_kb=(self.max_memory_kb or default.max_memory_kb) if argon else 0,
            parallel_threads=(self.parallel_threads or default.parallel_threads) if argon else 0,
            flags=_PBKDF_NO_BENCHMARK if self.iterations is not None else 0,
        )


# --- devices ------------------------------------------------------------------------------------


def _buffer(secret: Secret) -> ctypes.Array[ctypes.c_char]:
    if secret.closed:
        raise ValueError("secret already closed")
    return secret.as_ctypes()


class Device:
    """An initialised crypt_device handle; valid only inside its `open_device` block."""

    def __init__(self, path: str, handle: ctypes.c_void_p) -> None:
        self.path = path
        self._handle: ctypes.c_void_p | None = handle

    @property
    def _cd(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise ValueError(f"device {self.path} is closed")
        return self._handle

    def _string(self, name: str) -> str | None:
        return _text(_fn(name)(self._cd))

    def __repr__(self) -> str:
        return f"<Device {self.path}>"

    # header creation and keyslots

    def format_luks2(self, *, cipher: str, cipher_mode: str, uuid: str, volume_key: Secret,
                     sector_size: int = 512, pbkdf: Pbkdf | None = None, label: str | None = None) -> None:
        """Write a new LUKS2 header using `volume_key`; adds no keyslot."""
        pbkdf_struct = pbkdf._struct() if pbkdf is not None else None
        params = _ParamsLuks2(
            pbkdf=ctypes.pointer(pbkdf_struct) if pbkdf_struct is not None else None,
            sector_size=sector_size,
            label=label.encode() if label is not None else None,
        )
        _call("crypt_format", self._cd, _LUKS2, cipher.encode(), cipher_mode.encode(), uuid.encode(),
              _buffer(volume_key), len(volume_key), ctypes.byref(params))

    def set_pbkdf(self, pbkdf: Pbkdf) -> None:
        """PBKDF for the keyslots added after this call."""
        _call("crypt_set_pbkdf_type", self._cd, ctypes.byref(pbkdf._struct()))

    def volume_key_verify(self, key: Secret) -> bool:
        """Whether `key` matches the header's digest (False on -EPERM)."""
        try:
            _call("crypt_volume_key_verify", self._cd, _buffer(key), len(key))
        except CryptsetupError as error:
            if error.errno == errno.EPERM:
                return False
            raise
        return True

    def volume_key_get(self, passphrase: Secret, *, keyslot: int = ANY_SLOT,
                       key_size: int | None = None) -> tuple[int, Secret]:
        """Unlock a keyslot with `passphrase`: (keyslot used, volume key). Wrong passphrase: EPERM."""
        capacity = key_size or self.volume_key_size or 512
        key = Secret(capacity)
        size = _size(capacity)
        try:
            slot = _call("crypt_volume_key_get", self._cd, keyslot, key.as_ctypes(), ctypes.byref(size),
                         _buffer(passphrase), len(passphrase))
            if size.value != capacity:
                exact = Secret.copy_of(key.view()[: size.value])
                key.close()
                key = exact
        except BaseException:
            key.close()
            raise
        return slot, key

    def keyslot_add_by_volume_key(self, key: Secret, passphrase: Secret, *, keyslot: int = ANY_SLOT) -> int:
        """Add a passphrase keyslot for the volume key `key`; returns its id."""
        return _call("crypt_keyslot_add_by_volume_key", self._cd, keyslot, _buffer(key), len(key),
                     _buffer(passphrase), len(passphrase))

    def keyslots(self) -> list[int]:
        """Ids of the keyslots that open the volume (ACTIVE or ACTIVE_LAST; unbound ones are not listed)."""
        count = _call("crypt_keyslot_max", _LUKS2)
        return [slot for slot in range(count)
                if _fn("crypt_keyslot_status")(self._cd, slot) in (_SLOT_ACTIVE, _SLOT_ACTIVE_LAST)]

    # tokens

    def token_json_get(self, token_id: int) -> str | None:
        """The token's JSON text, or None when there is no such token."""
        if self.token_status(token_id)[0] == TokenInfo.INACTIVE:
            return None  # 2.6 returns -EINVAL, not -ENOENT, for a free token id
        text = ctypes.c_char_p()
        try:
            _call("crypt_token_json_get", self._cd, token_id, ctypes.byref(text))
        except CryptsetupError as error:
            if error.errno == errno.ENOENT:
                return None
            raise
        return _text(text.value)

    def token_json_set(self, json_text: str, token_id: int = ANY_TOKEN) -> int:
        """Write a token (a new one with ANY_TOKEN); returns its id."""
        return _call("crypt_token_json_set", self._cd, token_id, json_text.encode())

    def token_remove(self, token_id: int) -> None:
        _call("crypt_token_json_set", self._cd, token_id, None)

    def token_status(self, token_id: int) -> tuple[TokenInfo, str | None]:
        kind = ctypes.c_char_p()
        info = TokenInfo(_fn("crypt_token_status")(self._cd, token_id, ctypes.byref(kind)))
        if info in (TokenInfo.INVALID, TokenInfo.INACTIVE):
            return info, None
        return info, _text(kind.value)

    def tokens(self) -> list[tuple[int, str]]:
        """(id, type) of every token present."""
        count = _call("crypt_token_max", _LUKS2) if has_function("crypt_token_max") else _MAX_TOKENS
        found = []
        for token_id in range(count):
            _info, kind = self.token_status(token_id)
            if kind is not None:
                found.append((token_id, kind))
        return found

    def metadata(self) -> dict[str, Any]:
        """The LUKS2 JSON metadata (keyslots, tokens, segments, digests, config); needs 2.4+."""
        text = ctypes.c_char_p()
        _call("crypt_dump_json", self._cd, ctypes.byref(text), 0)
        parsed: dict[str, Any] = json.loads(text.value or b"{}")
        return parsed

    def digest_ids(self) -> set[int]:
        return {int(digest_id) for digest_id in self.metadata().get("digests", {})}

    def default_digest(self) -> int:
        """The digest that verifies the key of segment 0, the one dm-crypt uses."""
        for digest_id, digest in self.metadata().get("digests", {}).items():
            if "0" in digest.get("segments", []):
                return int(digest_id)
        die(f"{self.path} has no digest for its data segment", hint="check it with `cryptsetup luksDump`")

    def is_detached_header(self) -> bool:
        meta = self.metadata()
        segment = meta.get("segments", {}).get("0")
        config = meta.get("config", {})
        if segment is None or "json_size" not in config:
            return False
        header_area = 2 * (int(config["json_size"]) + 4096) + int(config.get("keyslots_size", 0))
        return int(segment["offset"]) < header_area

    def header_seqid(self) -> int:
        """The on-disk header's sequence id, incremented by every write of any LUKS2 tool."""
        with open(self.path, "rb") as file:
            return int.from_bytes(file.read(24)[16:24], "big")

    # header properties

    @property
    def type(self) -> str | None:
        return self._string("crypt_get_type")

    @property
    def uuid(self) -> str:
        return self._string("crypt_get_uuid") or ""

    @property
    def volume_key_size(self) -> int:
        """Volume key length in bytes; 0 on a LUKS2 header without keyslots (it is not recorded)."""
        return _call("crypt_get_volume_key_size", self._cd)

    # device-mapper

    def activate_by_volume_key(self, name: str | None, key: Secret, flags: int = 0) -> None:
        """Create /dev/mapper/`name`; with `name` None only check that `key` is right."""
        _call("crypt_activate_by_volume_key", self._cd, name.encode() if name is not None else None,
              _buffer(key), len(key), flags)


# LUKS1 and LUKS2 binary headers: magic, version (2 bytes), ...; the UUID at 0xA8 (40 bytes, NUL-padded).
_MAGIC, _SECONDARY_MAGIC = b"LUKS\xba\xbe", b"SKUL\xba\xbe"
_UUID_OFFSET, _UUID_SIZE = 0xA8, 40
# LUKS2 keeps two header copies: the primary at 0, the secondary at one of these offsets.
_SECONDARY_OFFSETS = tuple(0x4000 << n for n in range(9))  # 16 KiB .. 4 MiB


@dataclass(frozen=True)
class HeaderFacts:
    """What a LUKS binary header on disk claims, read without libcryptsetup (to name errors, find UUIDs)."""

    version: int
    uuid: str


def header_facts(path: str | os.PathLike[str]) -> HeaderFacts | None:
    """The LUKS version and UUID a header magic on disk claims (any copy), or None. Only regular files and
    block devices are read: opening a FIFO would block."""
    if not _is_disk(os.fspath(path)):
        return None
    try:
        with open(path, "rb") as file:
            for offset in (0, *_SECONDARY_OFFSETS):
                file.seek(offset)
                header = file.read(_UUID_OFFSET + _UUID_SIZE)
                if len(header) == _UUID_OFFSET + _UUID_SIZE and header[:6] in (_MAGIC, _SECONDARY_MAGIC):
                    if offset and header[:6] != _SECONDARY_MAGIC:
                        continue
                    uuid = header[_UUID_OFFSET:].rstrip(b"\0").decode("ascii", "replace").lower()
                    return HeaderFacts(int.from_bytes(header[6:8], "big"), uuid)
                if offset == 0 and header[:6] == _MAGIC:
                    return None
    except OSError:
        pass
    return None


def _is_disk(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _check_path(name: str) -> None:
    """Refuse what is not a disk before anything opens it (a FIFO would hang open(), a directory or a
    character device would be misread)."""
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        kind = "a dangling symbolic link" if os.path.islink(name) else "no such file or device"
        die(f"{name}: {kind}", hint="check the device path", cause=Cause.DEVICE)
    except PermissionError:
        die(f"{name}: permission denied", hint="run as root, or as a user allowed to read and write it",
            cause=Cause.DEVICE)
    except OSError as error:
        die(f"{name}: cannot open: {error.strerror}", cause=Cause.DEVICE)
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode) else \
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        die(f"{name}: {kind}, not a block device or disk image file", hint="give the LUKS2 device or image",
            cause=Cause.DEVICE)


@contextmanager
def _header_lock(name: str) -> Iterator[None]:
    """Serialise luks-tpm processes that change this header (read, decide, write): an open file
    description lock, which neither libcryptsetup's own flock() nor its closing of other descriptors
    of the same file can disturb. Other tools do not take it; `Device.check_unchanged` covers them."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        die(f"{name}: read-only or not writable ({error.strerror}); luks-tpm needs to write its token into the "
            "LUKS header", hint="run as root, or make the device or image writable", cause=Cause.DEVICE)
    try:
        request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def open_device(path: str | os.PathLike[str], *, load: bool = True, write: bool = False,
                allow_detached: bool = False) -> Iterator[Device]:
    """crypt_init (+ crypt_load of a LUKS2 header when `load`); always crypt_free. With `write`, the
    device must be writable and the header stays locked against other luks-tpm writers meanwhile.
    A detached header (data on another device) is refused unless `allow_detached` (tests write tokens
    into one to prove the commands refuse it).

    Failing to open or load is raised as a `LuksTpmError` with a hint; later calls raise
    `CryptsetupError`. Note: like every libcryptsetup user (even `cryptsetup isLuks`), loading a
    LUKS2 header with one damaged copy rewrites that copy from the good one when the file is writable.
    """
    name = os.fspath(path)
    _check_path(name)
    with contextlib.ExitStack() as stack:
        if write:
            stack.enter_context(_header_lock(name))
        handle = _cd()
        try:
            _call("crypt_init", ctypes.byref(handle), os.fsencode(name))
        except CryptsetupError as error:
            _raise_open_error(name, error)
        device = Device(name, handle)
        try:
            if load:
                _load(device, allow_detached)
            yield device
        finally:
            device._handle = None
            _fn("crypt_free")(handle)


def _raise_open_error(name: str, error: CryptsetupError) -> NoReturn:
    # crypt_init reports an unreadable file as ENOTBLK: ask the file system (safe: it is a file or disk).
    try:
        with open(name, "rb"):
            pass
    except PermissionError:
        die(f"{name}: permission denied", hint="run as root, or as a user allowed to read and write it",
            cause=Cause.DEVICE)
    except OSError as os_error:
        die(f"{name}: cannot open: {os_error.strerror}", cause=Cause.DEVICE)
    if error.errno in (errno.EACCES, errno.EPERM):
        die(f"{name}: permission denied", hint="run as root, or as a user allowed to read and write it",
            cause=Cause.DEVICE)
    die(f"{name}: cannot open: {error}", cause=Cause.DEVICE)


def _load(device: Device, allow_detached: bool) -> None:
    name = device.path
    try:
        _call("crypt_load", device._cd, None, None)  # any LUKS version, so LUKS1 can be named as such
    except CryptsetupError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            die(f"{name}: permission denied", hint="run as root, or as a user allowed to read and write it",
                cause=Cause.DEVICE)
        facts = header_facts(name)
        if facts is not None and facts.version == 1:
            die(f"{name}: damaged LUKS1 header; luks-tpm needs LUKS2", code=ExitCode.UNSUPPORTED,
                cause=Cause.UNSUPPORTED)
        if facts is not None and error.errno in (errno.EINVAL, errno.EIO):
            die(f"{name}: the LUKS2 metadata is corrupt or truncated",
                hint=f"`cryptsetup repair {name}` may recover it (back up the first 16 MiB first)", cause=Cause.DEVICE)
        if error.errno == errno.EINVAL:
            die(f"{name}: not a LUKS device", hint="is this the right device? `cryptsetup isLuks` checks",
                cause=Cause.DEVICE)
        die(f"{name}: cannot read the LUKS header: {error}", cause=Cause.DEVICE)
    kind = device.type
    if kind == "LUKS1":
        die(f"{name}: LUKS1 header; luks-tpm needs LUKS2",
            hint=f"convert it with `cryptsetup convert --type luks2 {name}` (back up the header first)",
            code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED)
    if kind != "LUKS2":
        die(f"{name}: unsupported device type {kind}", code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED)
    if not allow_detached and device.is_detached_header():
        die(f"{name} is a detached LUKS2 header (its data segment starts inside the header area, so the data "
            "lives on another device); luks-tpm does not support detached headers",
            hint="keep the header on the data device", code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED)
