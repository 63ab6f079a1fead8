"""What the command line decided, as frozen values the commands take."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from .cryptsetup import Pbkdf
from .model import Bank, Mode

DEFAULT_TCTI = "device:/dev/tpmrm0"


def tcti_from_environment(option: str | None, environ: dict[str, str]) -> str:
    """The TCTI in the documented order: --tcti, LUKS_TPM_TCTI, TPM2TOOLS_TCTI, then the kernel's RM."""
    return option or environ.get("LUKS_TPM_TCTI") or environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI


class Recovery(enum.StrEnum):
    GENERATE = "generate"  # a random recovery key, printed once
    PASSPHRASE = "passphrase"  # the user's own passphrase, from a file or the terminal
    NONE = "none"  # no keyslot: clearing the TPM destroys the data


@dataclasses.dataclass(frozen=True)
class Enrollment:
    mode: Mode
    bank: Bank = Bank.SHA256
    pcrs: tuple[int, ...] = ()
    pcr_values: dict[int, bytes] = dataclasses.field(default_factory=dict)  # bind to these, not current
    pin: bool = False
    fence: bool = False
    persist_srk: bool = True  # store the standard SRK at 0x81000001 when nothing is there


@dataclasses.dataclass(frozen=True)
class FormatSettings:
    device: Path
    recovery: Recovery
    pbkdf: Pbkdf  # for the recovery keyslot
    cipher: str = "aes-xts-plain64"
    key_size: int = 64  # bytes
    sector_size: int = 512
    label: str | None = None
    uuid: str | None = None  # None: a random one
    yes: bool = False
    binding: Enrollment = Enrollment(Mode.DERIVED)


@dataclasses.dataclass(frozen=True)
class Activation:
    readonly: bool = False
    allow_discards: bool = False
