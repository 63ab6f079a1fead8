"""Keys into the kernel: load-key (a logon key per volume) and open (a dm-crypt mapping that references the
key in the keyring; `open --all` is luks_tpm.bootpass).

The volume key goes from the TPM into a `Secret`, is verified against the LUKS2 digest, and then only
into the kernel: a logon key `cryptsetup:<uuid>-d<digest>` (load-key) or a dm-crypt table that references
such a key (open). It never reaches a file, pipe, argv or the environment.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from . import cryptsetup, keyring
from .cryptsetup import Device, open_device
from .errors import Cause, ExitCode, LuksTpmError, die
from .output import OMIT_IF_NONE, ErrorInfo, Report, progress
from .prompt import PinSource
from .secret import Secret
from .settings import Activation
from .tpm import Tpm
from .unlock import Recovery


def key_description(device: Device, digest: int) -> str:
    return f"cryptsetup:{device.uuid}-d{digest}"


def table_device(device: Device) -> str:
    """The device as a dm table names it: MAJOR:MINOR for a block device (no path to split or escape), the
    path for an image file (which dmsetup needs on a loop device anyway), refused (exit 2) when that path
    holds white space or other characters a table line cannot carry."""
    info = os.stat(device.path)
    if stat.S_ISBLK(info.st_mode):
        return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    if not device.path.isprintable() or any(char.isspace() or char == "\\" for char in device.path):
        die(
            f"--table: {device.path} cannot stand in a dm table line (dmsetup splits it at white space)",
            hint="attach the image to a loop device (`losetup --find --show FILE`) and load-key that device",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    return device.path


def dm_table(device: Device, digest: int, key_size: int, data_device: str | None = None) -> str:
    """The dm-crypt table line libcryptsetup would load, with the key referenced from the keyring."""
    data_device = table_device(device) if data_device is None else data_device
    segment = device.metadata()["segments"]["0"]
    offset = int(segment["offset"]) // 512
    size = segment["size"]
    if size == "dynamic":
        with open(device.path, "rb") as handle:
            sectors = handle.seek(0, 2) // 512 - offset
    else:
        sectors = int(size) // 512
    sector_size = int(segment.get("sector_size", 512))
    iv_offset = int(segment.get("iv_tweak", "0"))
    options = [] if sector_size == 512 else [f"sector_size:{sector_size}"]
    if sector_size != 512:
        options.append("iv_large_sectors")
        iv_offset = iv_offset * 512 // sector_size
    key = f":{key_size}:logon:{key_description(device, digest)}"
    line = f"0 {sectors} crypt {segment['encryption']} {key} {iv_offset} {data_device} {offset}"
    return line + (f" {len(options)} {' '.join(options)}" if options else "")


# ---- load-key -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedKey:
    device: str
    serial: int
    description: str
    keyring: int  # the keyring's own serial, not a special id such as -3 (@s), which differs per process
    token: int
    table: str | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)

    def lines(self) -> list[str]:
        return [str(self.serial)] + ([self.table] if self.table is not None else [])


@dataclasses.dataclass(frozen=True)
class NotLoaded:
    device: str
    error: ErrorInfo

    def lines(self) -> list[str]:
        return []


@dataclasses.dataclass(frozen=True)
class LoadedKeys:
    volumes: tuple[LoadedKey | NotLoaded, ...]

    def lines(self) -> list[str]:
        return [line for volume in self.volumes for line in volume.lines()]


def load_keys(
    tcti: str,
    device_paths: Sequence[Path],
    target: int,
    timeout: int | None,
    table: bool,
    token_id: int | None,
    pins: PinSource,
) -> Report:
    """Recover each device's key in one TPM pass and add it as a logon key to the keyring `target` (a
    serial: keyring.load_key_target); every device is tried, and the command fails (exit 5 or the single
    failure's own code) if any could not be loaded."""
    results: list[LoadedKey | NotLoaded] = []
    failures: list[LuksTpmError] = []
    with Tpm(tcti) as tpm, Recovery(tpm, pins, many_volumes=len(device_paths) > 1) as recovery:
        for path in device_paths:
            try:
                with open_device(path) as device:
                    results.append(_load_one(device, recovery, target, timeout, table, token_id))
            except LuksTpmError as error:
                if len(device_paths) == 1:
                    raise
                failures.append(error)
                results.append(NotLoaded(str(path), ErrorInfo.of(error)))
                progress(f"{path}: {error.message}")
        warnings = tuple(tpm.warnings)
    code = ExitCode.OK if not failures else failures[0].code if len(failures) == 1 else ExitCode.UNLOCK_FAILED
    result = results[0] if len(device_paths) == 1 else LoadedKeys(tuple(results))
    return Report(result, warnings, exit_code=code)


def _load_one(
    device: Device, recovery: Recovery, target: int, timeout: int | None, table: bool, token_id: int | None
) -> LoadedKey:
    data_device = table_device(device) if table else None  # refused before any key is recovered
    found = recovery.recover(device, token_id=token_id)
    description = key_description(device, found.token.digest)
    staging = keyring.keyring_id(keyring.THREAD, create=True)
    with found.key:  # the key is zeroed as soon as the kernel has it
        serial = _add(description, found.key, staging)
    _publish(serial, description, staging, target, timeout)
    line = dm_table(device, found.token.digest, found.token.key_size, data_device) if data_device else None
    return LoadedKey(device.path, serial, description, target, found.token_id, line)


def _add(description: str, key: Secret, staging: int) -> int:
    try:
        return keyring.add_logon_key(description, key, staging)
    except keyring.KeyringError as error:
        die(f"cannot add the logon key {description}: {error}", code=ExitCode.DEVICE, cause=Cause.GENERIC)


def _publish(serial: int, description: str, staging: int, target: int, timeout: int | None) -> None:
    """Give the logon key its final permissions (and timeout) before it is linked where others may find
    it: it was added to this thread's own keyring, where it is possessed (so its permissions can be set
    whatever the target), and is then linked into `target`, which displaces a key of the same name there
    in one step. On any failure it is unlinked from the staging keyring and so destroyed: nothing is left."""
    try:
        keyring.set_permissions(serial, keyring.logon_key_permissions())
        if timeout:
            keyring.set_timeout(serial, timeout)
        if target != staging:
            keyring.link(serial, target)
    except keyring.KeyringError as error:
        keyring.unlink(serial, staging)
        die(
            f"cannot add the logon key {description} to keyring {target}: {error}",
            hint="choose a keyring this process may write to (--keyring)",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    if target != staging:
        keyring.unlink(serial, staging)


# ---- open, open --all ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Opened:
    device: str
    name: str
    token: int

    def lines(self) -> list[str]:
        return [f"{self.device}: opened as /dev/mapper/{self.name} (token {self.token})"]


def dm_crypt(device: Device, name: str, key: Secret, options: Activation) -> None:
    """Activate from a thread of its own: libcryptsetup leaves the logon key in the thread keyring,
    which the kernel drops when the thread exits."""
    flags = cryptsetup.ACTIVATE_KEYRING_KEY
    if options.readonly:
        flags |= cryptsetup.ACTIVATE_READONLY
    if options.allow_discards:
        flags |= cryptsetup.ACTIVATE_ALLOW_DISCARDS
    failure: list[BaseException] = []

    def run() -> None:
        try:
            device.activate_by_volume_key(name, key, flags)
        except BaseException as error:  # re-raised in the caller
            failure.append(error)

    worker = threading.Thread(target=run, name="luks-tpm-activate")
    worker.start()
    worker.join()
    if failure:
        error = failure[0]
        if isinstance(error, cryptsetup.CryptsetupError):
            die(
                f"activating {name} failed: {error}",
                hint="is the name already in use? (`dmsetup ls`)",
                code=ExitCode.DEVICE,
                cause=Cause.DEVICE,
            )
        raise error


def require_device_mapper() -> None:
    if not cryptsetup.device_mapper_available():
        die(
            "device-mapper is not available here; use load-key",
            hint="load the dm_crypt module, or load the key with `luks-tpm load-key --table`",
            code=ExitCode.UNSUPPORTED,
        )


def open_volume(
    tcti: str, device_path: Path, name: str, options: Activation, token_id: int | None, pins: PinSource
) -> Report:
    require_device_mapper()
    with open_device(device_path) as device, Tpm(tcti) as tpm, Recovery(tpm, pins) as recovery:
        found = recovery.recover(device, token_id=token_id)
        with found.key:
            dm_crypt(device, name, found.key, options)
        warnings = tuple(tpm.warnings)
    return Report(Opened(str(device_path), name, found.token_id), warnings)
