"""`open --all`: the boot's one unlock pass, under the cross-volume guard (docs/security.md).

The TPM opens every marked volume or none. Keys are recovered for every crypttab entry first; the volumes
are opened only when every entry's key was recovered and verified, and a volume whose opening fails closes
the ones opened before it. Otherwise none is opened and every entry is left to its passphrase prompt.

Why: a volume the TPM cannot vouch for (an attacker's look-alike with the genuine UUID, whose passphrase
the attacker types at the prompt) must never sit beside volumes the TPM opened. A swapped root would be
handed the genuine data volumes; a swapped data volume would be mounted by the genuine root, whose code
its file system could then attack. The boot scripts check the rest at the fence: a volume opened by a
passphrase beside TPM-opened ones stops the boot (hooks/functions.sh).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Protocol

from . import cryptsetup
from .activation import dm_crypt, require_device_mapper
from .cryptsetup import Device, open_device
from .crypttab import Entry, resolve
from .errors import Cause, ExitCode, LuksTpmError
from .output import OMIT_IF_NONE, ErrorInfo, Report, progress
from .prompt import PinSource
from .secret import Secret
from .settings import Activation
from .tpm import Tpm
from .unlock import Recovery


@dataclasses.dataclass(frozen=True)
class EntryOpened:
    """One crypttab entry of `open --all`: `device` as written in crypttab."""

    name: str
    device: str
    opened: bool
    token: int | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    error: ErrorInfo | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)


@dataclasses.dataclass(frozen=True)
class OpenedAll:
    volumes: tuple[EntryOpened, ...]

    def lines(self) -> list[str]:
        return []  # progress went to stderr as it happened


class Mapper(Protocol):
    """Creates and removes the dm-crypt mappings: the one step that needs device-mapper. Hosts without it
    (the test machines) pass their own, which checks the key it is handed instead (a documented seam)."""

    def open(self, device: Device, name: str, key: Secret, options: Activation) -> None: ...

    def close(self, device: Device, name: str) -> None: ...


class DmCrypt:
    def open(self, device: Device, name: str, key: Secret, options: Activation) -> None:
        dm_crypt(device, name, key, options)

    def close(self, device: Device, name: str) -> None:
        device.deactivate(name)


@dataclasses.dataclass
class _Ready:
    entry: Entry
    device: Device
    token: int
    key: Secret


def open_all(tcti: str, entries: Sequence[Entry], pins: PinSource, mapper: Mapper | None = None) -> Report:
    """Open every entry from the TPM in one pass, or none of them."""
    if mapper is None:
        require_device_mapper()
        mapper = DmCrypt()
    with contextlib.ExitStack() as held:
        with Tpm(tcti) as tpm, Recovery(tpm, pins, many_volumes=True) as recovery:
            outcomes = [_recover(held, recovery, entry) for entry in entries]
        ready = [outcome for outcome in outcomes if isinstance(outcome, _Ready)]
        failed = [outcome.name for outcome in outcomes if isinstance(outcome, EntryOpened)]
        if not failed:
            failed = _open_every(mapper, ready)
        results = tuple(
            outcome
            if isinstance(outcome, EntryOpened)
            else EntryOpened(outcome.entry.name, outcome.entry.device, True, token=outcome.token)
            if not failed
            else _held_back(outcome, failed)
            for outcome in outcomes
        )
    if failed:
        progress(
            f"not opened from the TPM: {', '.join(failed)}; by the cross-volume guard, no volume is opened from "
            "the TPM this boot: every volume is left for its passphrase prompt"
        )
    return Report(OpenedAll(results), exit_code=ExitCode.UNLOCK_FAILED if failed else ExitCode.OK)


def _recover(held: contextlib.ExitStack, recovery: Recovery, entry: Entry) -> _Ready | EntryOpened:
    """The entry's verified key, kept open (and zeroed at the end of the pass), or why there is none."""
    try:
        device = held.enter_context(open_device(resolve(entry).device))
        found = recovery.recover(device)
    except LuksTpmError as error:
        progress(f"{entry.name}: {error.message}")
        return EntryOpened(entry.name, entry.device, False, error=ErrorInfo.of(error))
    held.enter_context(found.key)
    return _Ready(entry, device, found.token_id, found.key)


def _open_every(mapper: Mapper, ready: list[_Ready]) -> list[str]:
    """Open each volume; if one fails, close the ones opened before it. The names that failed."""
    opened: list[_Ready] = []
    for volume in ready:
        try:
            mapper.open(
                volume.device, volume.entry.name, volume.key, Activation(volume.entry.readonly, volume.entry.discard)
            )
        except LuksTpmError as error:
            progress(f"{volume.entry.name}: {error.message}")
            for done in reversed(opened):
                with contextlib.suppress(LuksTpmError, cryptsetup.CryptsetupError):
                    mapper.close(done.device, done.entry.name)
            return [volume.entry.name]
        opened.append(volume)
        progress(f"{volume.entry.name}: opened")
    return []


def _held_back(volume: _Ready, failed: list[str]) -> EntryOpened:
    error = LuksTpmError(
        f"{volume.entry.name}: its key was recovered, but not used: {', '.join(failed)} did not open from the TPM",
        hint="the cross-volume guard opens every marked volume from the TPM or none (docs/security.md)",
        code=ExitCode.UNLOCK_FAILED,
        cause=Cause.GUARD,
    )
    return EntryOpened(volume.entry.name, volume.entry.device, False, token=volume.token, error=ErrorInfo.of(error))
