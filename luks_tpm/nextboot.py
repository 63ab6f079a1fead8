"""The next boot's PCR values on this machine (docs/boot-chain.md): the TCG event log, checked against the
TPM, replayed with the boot files as they are now (luks_tpm.bootchain does the replay and the GRUB
emulation; this module finds the files on the running system and says what went wrong in words).

A log that does not reproduce the TPM's current PCRs is refused: nothing is predicted from it. What cannot
be predicted (an unknown event, a GRUB build the emulation does not model, a shim whose SbatLevel would
change, a grub.cfg the emulation does not model, a binary Secure Boot will refuse, no event log at all)
is an error with exit code 10, never a guess.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path

from .bootchain import eventlog, predict
from .bootchain.bootfiles import BootFiles
from .bootchain.errors import BootchainError, Unpredictable
from .errors import Cause, ExitCode, LuksTpmError
from .model import Bank
from .settings import BOOT, BOOT_FILES, ESP, EVENT_LOG
from .tpm import Tpm
from .tpm.pcr import pcr_banks, pcr_values

# What the prediction covers: the firmware's, shim's and GRUB's PCRs. Not 10 (IMA measures at run time,
# nothing the log says) and not 11-15 (the OS's): those keep their current value in a predicted state.
PREDICTED = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14)


@dataclasses.dataclass(frozen=True)
class BootChain:
    """Where the boot chain is read from: the event log and the file systems GRUB reads."""

    event_log: Path = EVENT_LOG
    esp: Path = ESP
    boot: Path = BOOT
    snapshots: Path = BOOT_FILES  # the booted config files, kept at each boot
    uuids: Mapping[str, str] | None = None  # fs UUID -> GRUB device; None: read the mounted superblocks


@dataclasses.dataclass(frozen=True)
class NextBoot:
    current: Mapping[Bank, Mapping[int, bytes]]  # now, read from the TPM
    values: Mapping[Bank, Mapping[int, bytes]]  # at the next boot, PCRs 0-15
    changes: tuple[str, ...]  # what differs, in words

    def changed(self, bank: Bank) -> tuple[int, ...]:
        return tuple(p for p in PREDICTED if self.values[bank][p] != self.current[bank][p])

    def state(self, bank: Bank, pcrs: tuple[int, ...]) -> dict[int, bytes]:
        """The predicted values of `pcrs` (PCRs the prediction does not cover keep their current value)."""
        return {p: (self.values[bank] if p in PREDICTED else self.current[bank])[p] for p in pcrs}


def _unpredictable(message: str, hint: str | None, cause: Cause = Cause.UNPREDICTABLE) -> LuksTpmError:
    return LuksTpmError(message, hint=hint, code=ExitCode.UNPREDICTABLE, cause=cause)


def read_log(chain: BootChain) -> eventlog.EventLog:
    try:
        data = chain.event_log.read_bytes()
    except OSError as error:
        raise _unpredictable(
            f"no TCG event log to predict from ({chain.event_log}: {error.strerror})",
            "prediction needs a UEFI measured boot (and securityfs mounted)",
            Cause.NO_EVENT_LOG,
        ) from None
    try:
        return eventlog.parse(data)
    except BootchainError as error:
        raise _unpredictable(f"{chain.event_log}: {error.message}", error.hint) from None


def current_values(tpm: Tpm, banks: tuple[Bank, ...]) -> dict[Bank, dict[int, bytes]]:
    return {bank: pcr_values(tpm, bank, range(24)) for bank in banks}


def boot_files(log: eventlog.EventLog, chain: BootChain) -> BootFiles:
    """GRUB's devices from the log, mapped to the mounted ESP and /boot, and their file systems' UUIDs
    (what GRUB's `search` looks for) read from their superblocks: no udev needed."""
    try:
        files = BootFiles.from_log(log, esp=chain.esp, boot=chain.boot, snapshots=chain.snapshots)
    except Unpredictable as error:
        raise _unpredictable(error.message, error.hint) from None
    if chain.uuids is not None:
        return dataclasses.replace(files, uuids=dict(chain.uuids))
    uuids = {}
    for device, directory in files.devices.items():
        found = _fs_uuid(directory)
        if found is not None:
            uuids[found] = device
    return dataclasses.replace(files, uuids=uuids)


def predict_next_boot(tpm: Tpm, chain: BootChain = BootChain()) -> NextBoot:
    log = read_log(chain)
    banks = tuple(bank for bank in pcr_banks(tpm) if str(bank) in log.digest_sizes)
    current = current_values(tpm, banks)
    try:
        eventlog.check_replay(log, {str(b): v for b, v in current.items()})
        prediction = predict.next_boot(log, boot_files(log, chain))
    except BootchainError as error:
        raise _unpredictable(error.message, error.hint) from None
    values = {bank: dict(prediction.values[str(bank)]) for bank in banks}
    return NextBoot(current, values, prediction.changes)


def keep_boot_files(tpm: Tpm, chain: BootChain = BootChain()) -> list[Path]:
    """Copy the config files this boot's GRUB read (where they are still as booted) into the snapshot
    directory: a prediction after update-grub needs them. Run at each boot (rebind does)."""
    log = read_log(chain)
    banks = tuple(bank for bank in pcr_banks(tpm) if str(bank) in log.digest_sizes)
    try:
        eventlog.check_replay(log, {str(b): v for b, v in current_values(tpm, banks).items()})
        return predict.snapshot(log, boot_files(log, chain), chain.snapshots)
    except BootchainError as error:
        raise _unpredictable(error.message, error.hint) from None


# ---- file systems' UUIDs, from their superblocks --------------------------------------------------------


def _mount_source(directory: Path) -> str | None:
    """The device mounted at `directory` (/proc/self/mountinfo's source field)."""
    target = os.path.realpath(directory)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    source = None
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4 and fields[4] == target and " - " in line:
            source = line.split(" - ", 1)[1].split(" ")[1]  # the last mount there wins
    return source


def _fs_uuid(directory: Path) -> str | None:
    """The UUID GRUB's `search --fs-uuid` finds for the file system mounted at `directory` (ext2/3/4, FAT)."""
    source = _mount_source(directory)
    if source is None or not source.startswith("/"):
        return None
    try:
        with open(source, "rb") as device:
            head = device.read(2048)
    except OSError:
        return None
    if len(head) >= 1024 + 120 and head[1024 + 56 : 1024 + 58] == b"\x53\xef":  # ext2/3/4 magic
        return str(uuid.UUID(bytes=head[1024 + 104 : 1024 + 120]))
    if head[510:512] == b"\x55\xaa" and head[82:87] == b"FAT32":
        serial = struct.unpack_from("<I", head, 67)[0]
        return f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"
    if head[510:512] == b"\x55\xaa" and head[54:57] == b"FAT":
        serial = struct.unpack_from("<I", head, 39)[0]
        return f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"
    return None
