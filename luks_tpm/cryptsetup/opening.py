"""Opening a device: what is refused before libcryptsetup sees it (FIFOs, directories, ...), the header
facts read from disk without it (magic, version, UUID), the lock luks-tpm writers share, and the errors
of opening, loading and writing turned into one line each."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

from ..errors import Cause, ExitCode, LuksTpmError, die
from .binding import CryptsetupError, call, cd_t
from .device import Device

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
        die(f"{name}: {kind}", hint="check the device path", cause=Cause.DEVICE, code=ExitCode.DEVICE)
    except PermissionError:
        die(
            f"{name}: permission denied",
            hint="run as root, or as a user allowed to read and write it",
            cause=Cause.DEVICE,
            code=ExitCode.DEVICE,
        )
    except OSError as error:
        die(f"{name}: cannot open: {error.strerror}", cause=Cause.DEVICE, code=ExitCode.DEVICE)
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a character device"
            if stat.S_ISCHR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        die(
            f"{name}: {kind}, not a block device or disk image file",
            hint="give the LUKS2 device or image",
            cause=Cause.DEVICE,
            code=ExitCode.DEVICE,
        )


@contextmanager
def _header_lock(name: str) -> Iterator[None]:
    """Serialise luks-tpm processes that change this header (read, decide, write): an open file
    description lock, which neither libcryptsetup's own flock() nor its closing of other descriptors
    of the same file can disturb. Other tools do not take it; libcryptsetup's own metadata locking and
    its sequence-id check on write cover them."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        die(
            f"{name}: read-only or not writable ({error.strerror}); luks-tpm needs to write its token into the "
            "LUKS header",
            hint="run as root, or make the device or image writable",
            cause=Cause.DEVICE,
            code=ExitCode.DEVICE,
        )
    try:
        request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, request)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def open_device(
    path: str | os.PathLike[str], *, load: bool = True, write: bool = False, allow_detached: bool = False
) -> Iterator[Device]:
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
        handle = cd_t()
        try:
            call("crypt_init", ctypes.byref(handle), os.fsencode(name))
        except CryptsetupError as error:
            _raise_open_error(name, error)
        device = Device(name, handle)
        try:
            if load:
                _load(device, allow_detached)
            yield device
        finally:
            device.close()


def _raise_open_error(name: str, error: CryptsetupError) -> NoReturn:
    # crypt_init reports an unreadable file as ENOTBLK: ask the file system (safe: it is a file or disk).
    try:
        with open(name, "rb"):
            pass
    except PermissionError:
        die(
            f"{name}: permission denied",
            hint="run as root, or as a user allowed to read and write it",
            cause=Cause.DEVICE,
            code=ExitCode.DEVICE,
        )
    except OSError as os_error:
        die(f"{name}: cannot open: {os_error.strerror}", cause=Cause.DEVICE, code=ExitCode.DEVICE)
    if error.errno in (errno.EACCES, errno.EPERM):
        die(
            f"{name}: permission denied",
            hint="run as root, or as a user allowed to read and write it",
            cause=Cause.DEVICE,
            code=ExitCode.DEVICE,
        )
    die(f"{name}: cannot open: {error}", cause=Cause.DEVICE, code=ExitCode.DEVICE)


def _load(device: Device, allow_detached: bool) -> None:
    name = device.path
    try:
        call("crypt_load", device.cd, None, None)  # any LUKS version, so LUKS1 can be named as such
    except CryptsetupError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            die(
                f"{name}: permission denied",
                hint="run as root, or as a user allowed to read and write it",
                cause=Cause.DEVICE,
                code=ExitCode.DEVICE,
            )
        facts = header_facts(name)
        if facts is not None and facts.version == 1:
            die(
                f"{name}: damaged LUKS1 header; luks-tpm needs LUKS2",
                code=ExitCode.UNSUPPORTED,
                cause=Cause.UNSUPPORTED,
            )
        if facts is not None and error.errno in (errno.EINVAL, errno.EIO):
            die(
                f"{name}: the LUKS2 metadata is corrupt or truncated",
                hint=f"`cryptsetup repair {name}` may recover it (back up the first 16 MiB first)",
                cause=Cause.DEVICE,
                code=ExitCode.DEVICE,
            )
        if error.errno == errno.EINVAL:
            die(
                f"{name}: not a LUKS device",
                hint="is this the right device? `cryptsetup isLuks` checks",
                cause=Cause.DEVICE,
                code=ExitCode.DEVICE,
            )
        die(f"{name}: cannot read the LUKS header: {error}", cause=Cause.DEVICE, code=ExitCode.DEVICE)
    kind = device.type
    if kind == "LUKS1":
        die(
            f"{name}: LUKS1 header; luks-tpm needs LUKS2",
            hint=f"convert it with `cryptsetup convert --type luks2 {name}` (back up the header first)",
            code=ExitCode.UNSUPPORTED,
            cause=Cause.UNSUPPORTED,
        )
    if kind != "LUKS2":
        die(f"{name}: unsupported device type {kind}", code=ExitCode.UNSUPPORTED, cause=Cause.UNSUPPORTED)
    if not allow_detached and device.is_detached_header():
        die(
            f"{name} is a detached LUKS2 header (its data segment starts inside the header area, so the data "
            "lives on another device); luks-tpm does not support detached headers",
            hint="keep the header on the data device",
            code=ExitCode.UNSUPPORTED,
            cause=Cause.UNSUPPORTED,
        )


def write_error(device: Device, error: CryptsetupError) -> LuksTpmError:
    """A failed header write in words, from the errno and what libcryptsetup logged about it."""
    said = " ".join(error.log).lower()
    full_hint = "remove unused tokens (`luks-tpm status`, `luks-tpm remove`) or keyslots"
    if "concurrent" in said:
        return LuksTpmError(
            f"{device.path}: another process changed the LUKS header meanwhile; nothing was written",
            hint="run the command again",
            code=ExitCode.DEVICE,
            cause=Cause.HEADER_CHANGED,
        )
    if "free token" in said or "no free" in said:
        return LuksTpmError(
            f"{device.path}: the LUKS2 header is full ({error.log[-1] if error.log else error})",
            hint=f"{full_hint}; the JSON area size is fixed when the volume is formatted",
            code=ExitCode.DEVICE,
            cause=Cause.HEADER_FULL,
        )
    if error.errno == errno.ENOSPC:
        return LuksTpmError(
            f"{device.path}: the LUKS2 header's JSON area is full",
            hint=f"{full_hint}; a larger area can only be chosen when formatting "
            "(`cryptsetup luksFormat --luks2-metadata-size`)",
            code=ExitCode.DEVICE,
            cause=Cause.HEADER_FULL,
        )
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return LuksTpmError(
            f"{device.path}: cannot write the LUKS header ({error.strerror})",
            hint="is the device or image read-only?",
            code=ExitCode.DEVICE,
            cause=Cause.DEVICE,
        )
    return LuksTpmError(
        f"{device.path}: writing the LUKS header failed: {error}", code=ExitCode.DEVICE, cause=Cause.DEVICE
    )
