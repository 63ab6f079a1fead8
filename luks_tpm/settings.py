"""What the command line decided, as frozen values the commands take."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from .cryptsetup import Pbkdf
from .token import Mode
from .tpm import Bank


class Recovery(enum.StrEnum):
    GENERATE = "generate"  # a random recovery key, printed once
    PASSPHRASE = "passphrase"  # the user's own passphrase, from a file or the terminal
    NONE = "none"  # no keyslot: clearing the TPM destroys the data


@dataclasses.dataclass(frozen=True)
class FormatSettings:
    device: Path
    recovery: Recovery
    pbkdf: Pbkdf  # for the recovery keyslot
    cipher: str = "aes-xts-plain64"
    key_size: int = 64  # bytes
    sector_size: int = 512
    bank: Bank = Bank.SHA256
    label: str | None = None
    uuid: str | None = None  # None: a random one
    yes: bool = False


@dataclasses.dataclass(frozen=True)
class Enrollment:
    mode: Mode
    bank: Bank = Bank.SHA256
    pcrs: tuple[int, ...] = ()
    pcr_values: dict[int, bytes] = dataclasses.field(default_factory=dict)  # seal to these, not current
    pin: bool = False


@dataclasses.dataclass(frozen=True)
class Activation:
    readonly: bool = False
    allow_discards: bool = False
