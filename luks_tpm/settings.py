"""What the command line decided, as frozen values the commands take, and every default, spelled once."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from .model import Bank, Mode

DEFAULT_TCTI = "device:/dev/tpmrm0"
DEFAULT_CRYPTTAB = Path("/etc/crypttab")
DEFAULT_CIPHER = "aes-xts-plain64"
DEFAULT_KEY_SIZE = 64  # bytes: aes-xts-plain64 with two 256-bit keys
DEFAULT_KEYRING = "@s"
DEFAULT_BANK = Bank.SHA256
# The boot chain (docs/boot-chain.md): the Secure Boot policy and the authorities used (7), shim, GRUB and
# the kernel (4), GRUB's commands and the kernel command line (8), every file GRUB reads (9).
BOOT_CHAIN_PCRS = (4, 7, 8, 9)
# Kept by the running system, on its (encrypted) root: the approver key's blob and the boot files of the
# booted boot chain (the event log records only their digests, and update-grub replaces grub.cfg).
DEFAULT_APPROVER = Path("/var/lib/luks-tpm/approver.json")
BOOT_FILES = Path("/var/lib/luks-tpm/boot-files")
EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
ESP, BOOT = Path("/boot/efi"), Path("/boot")


def tcti_from_environment(option: str | None, environ: dict[str, str]) -> str:
    """The TCTI in the documented order: --tcti, LUKS_TPM_TCTI, TPM2TOOLS_TCTI, then the kernel's RM."""
    return option or environ.get("LUKS_TPM_TCTI") or environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI


@dataclasses.dataclass(frozen=True)
class Pbkdf:
    """A keyslot's PBKDF. `iterations` given: no benchmark, exactly that cost (time cost for argon2)."""

    type: str  # "pbkdf2" | "argon2id" | "argon2i"
    hash: str = "sha256"
    iterations: int | None = None
    time_ms: int = 0  # 0: libcryptsetup's LUKS2 default
    max_memory_kb: int = 0  # argon2 only; 0: the default
    parallel_threads: int = 0  # argon2 only; 0: the default


# The LUKS2 digest only has to stop a wrong key from opening the volume: the keys it checks are random
# 256/512-bit keys, so a cheap digest costs no security and saves ~100 ms on every unlock.
DIGEST_PBKDF = Pbkdf("pbkdf2", iterations=1000)


class Recovery(enum.StrEnum):
    GENERATE = "generate"  # a random recovery key, printed once
    PASSPHRASE = "passphrase"  # the user's own passphrase, from a file or the terminal
    NONE = "none"  # no keyslot: clearing the TPM destroys the data


@dataclasses.dataclass(frozen=True)
class Enrollment:
    """A new binding: its mode and what it is bound to."""

    mode: Mode
    bank: Bank = DEFAULT_BANK
    pcrs: tuple[int, ...] = ()
    pcr_values: dict[int, bytes] = dataclasses.field(default_factory=dict)  # bind to these, not current
    pin: bool = False
    fence: bool = False
    persist_srk: bool = True  # store the standard SRK at 0x81000001 when nothing is there
    approver: Path | None = None  # bound to the boot chain: PCR states approved by the key kept in this file


@dataclasses.dataclass(frozen=True)
class FormatSettings:
    device: Path
    recovery: Recovery
    pbkdf: Pbkdf  # for the recovery keyslot
    cipher: str = DEFAULT_CIPHER
    key_size: int = DEFAULT_KEY_SIZE
    sector_size: int = 512
    label: str | None = None
    uuid: str | None = None  # None: a random one
    binding: Enrollment = Enrollment(Mode.DERIVED)


@dataclasses.dataclass(frozen=True)
class ResealSettings:
    """What `reseal` changes; what is not given is the old token's (its bank, PCRs, PIN, fence)."""

    token_id: int | None = None  # None: the first token bound to PCRs or the fence
    pcrs: tuple[int, ...] | None = None
    pcr_values: dict[int, bytes] = dataclasses.field(default_factory=dict)
    bank: Bank | None = None
    force: bool = False  # replace the old token even if the new one cannot be verified now


@dataclasses.dataclass(frozen=True)
class Activation:
    readonly: bool = False
    allow_discards: bool = False
