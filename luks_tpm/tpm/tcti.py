"""The TCTI string (`name:config`, as the TSS's TCTI loader splits it), checked before the TSS sees it.

The device TCTI opens its path read-write and writes a TPM command into it at once (it probes whether
the device supports partial reads), before any answer could show that it is not a TPM: `device:` with a
disk image or /dev/sdX would overwrite that disk's first bytes, a LUKS header's magic among them. So a
device TCTI is refused unless its path is a TPM character device, as the kernel's sysfs says
(/sys/dev/char/MAJOR:MINOR belongs to class tpm or tpmrm). The pcap TCTI wraps another TCTI string:
that one is checked the same way. Every TCTI luks-tpm is given (--tcti, LUKS_TPM_TCTI, TPM2TOOLS_TCTI,
the boot scripts' and request-key.conf's lines) reaches the TSS through `Tpm`, which calls `check` first.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import Cause, ExitCode, LuksTpmError

# What the device TCTI opens when its configuration is empty (tpm2-tss, tcti-device.c).
DEVICE_DEFAULTS = ("/dev/tpmrm0", "/dev/tpm0")
_TPM_CLASSES = {"tpm", "tpmrm"}
# The loader tries the name as given (a library file), then libtss2-tcti-<name>.so.0 and .so.
_LIBRARY = r"(?:.*/)?libtss2-tcti-{}\.so(?:\.[0-9]+)*"


def _names(name: str, kind: str) -> bool:
    if name == kind or re.fullmatch(_LIBRARY.format(kind), name):
        return True
    return "/" in name and bool(re.fullmatch(_LIBRARY.format(kind), os.path.realpath(name)))


def device_paths(tcti: str) -> list[str]:
    """The paths the device TCTI would open for `tcti` (through pcap's child too); [] for other TCTIs."""
    name, _, config = tcti.partition(":")
    if _names(name, "pcap"):
        return device_paths(config)
    if not _names(name, "device"):
        return []
    if config:
        return [config]
    return [next((path for path in DEVICE_DEFAULTS if os.path.exists(path)), DEVICE_DEFAULTS[0])]


def _kind(mode: int) -> str:
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a character device"


def device_problem(path: str, sysfs: Path = Path("/sys")) -> str | None:
    """Why `path` is not a TPM character device, or None when it is one (or is missing: the TSS then
    fails to open it, which says so, and writes nothing)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot be examined ({error.strerror})"
    if not stat.S_ISCHR(info.st_mode):
        return _kind(info.st_mode)
    major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
    node = sysfs / "dev" / "char" / f"{major}:{minor}"
    if not (sysfs / "dev" / "char").is_dir():
        return None  # no sysfs to ask (a bare chroot): a character device is all that can be known
    subsystem = Path(os.path.realpath(node / "subsystem")).name if node.exists() else None
    if subsystem in _TPM_CLASSES:
        return None
    return f"the character device {major}:{minor}" + (f" of class {subsystem}" if subsystem else "") + ", not a TPM"


def check(tcti: str, sysfs: Path = Path("/sys")) -> None:
    """Refuse (exit 2) a TCTI that would make the TSS write TPM commands into something that is not a TPM."""
    for path in device_paths(tcti):
        problem = device_problem(path, sysfs)
        if problem is not None:
            raise LuksTpmError(
                f"TCTI '{tcti}': {path} is {problem}; the device TCTI would write TPM commands into it",
                hint="name the TPM's character device, e.g. device:/dev/tpmrm0 (--tcti, LUKS_TPM_TCTI or "
                "TPM2TOOLS_TCTI); `ls -l /sys/class/tpm /sys/class/tpmrm` lists them",
                code=ExitCode.USAGE,
                cause=Cause.USAGE,
            )
