"""`luks-tpm status`: each volume's tokens, and whether each would unlock now, and why not.

"Now" is found out by trying: the key is recovered, verified against the header, then zeroed. PIN tokens
are checked as far as can be without the PIN. Exit 5 when some volume would not unlock now, so fleets
can ask "will this machine boot unattended?" in one command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from .cryptsetup import Device, open_device
from .crypttab import Unresolved
from .errors import Cause, ExitCode, LuksTpmError, UnlockFailed
from .model import FENCE_PCR
from .output import OMIT_IF_NONE, ErrorInfo, Report
from .tokenformat import Token
from .tpm import Tpm
from .tpm import pcr as tpm_pcr
from .unlock import Recovery, TokenEntry, changed_pcrs, luks_tpm_tokens


@dataclasses.dataclass(frozen=True)
class TokenStatus:
    id: int
    damaged: bool
    mode: str
    pcr_bank: str
    pcrs: tuple[int, ...]
    pin: bool
    fence: bool
    created: str
    parent: str
    parent_handle: str | None
    summary: str
    other_tpm: bool
    unlocks: bool
    reason: str | None
    cause: str | None
    note: str | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)
    pcrs_matching: tuple[int, ...] | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)

    def lines(self) -> list[str]:
        lines = [f"  token {self.id}: {self.summary}"]
        if self.pcrs or self.fence:
            pcrs = ",".join(map(str, self.pcrs)) or "none"
            now = "unknown" if self.pcrs_matching is None else ",".join(map(str, self.pcrs_matching)) or "none"
            lines.append(
                f"    bank {self.pcr_bank}, PCRs {pcrs}, matching now: {now}, fence: {'yes' if self.fence else 'no'}"
                f", PIN: {'yes' if self.pin else 'no'}"
            )
        if self.unlocks:
            verdict = "unlocks now" + (" (needs the PIN)" if self.note else "")
        elif self.other_tpm:
            verdict = "another TPM's binding: not for this machine (it works where it was made)"
        else:
            verdict = f"would NOT unlock: {self.reason}"
        return [*lines, f"    {verdict}"]


@dataclasses.dataclass(frozen=True)
class DamagedTokenStatus:
    id: int
    damaged: bool
    summary: str
    unlocks: bool
    reason: str
    cause: str
    other_tpm: bool = False

    def lines(self) -> list[str]:
        return [f"  token {self.id}: {self.summary}", f"    would NOT unlock: {self.reason}"]


@dataclasses.dataclass(frozen=True)
class VolumeStatus:
    device: str
    uuid: str | None
    keyslots: tuple[int, ...]
    tokens: tuple[TokenStatus | DamagedTokenStatus, ...]
    error: ErrorInfo | None
    unlocks: bool

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"{self.device}: {self.error.message}"]
        lines = [f"{self.device}: LUKS2 {self.uuid}, keyslots {list(self.keyslots) or 'none'}"]
        lines += [line for token in self.tokens for line in token.lines()]
        return lines if self.tokens else [*lines, "  no luks-tpm token"]


@dataclasses.dataclass(frozen=True)
class StatusReport:
    volumes: tuple[VolumeStatus, ...]
    fence_up: bool | None  # None: no TPM answered
    unlocks: bool

    def lines(self) -> list[str]:
        lines = [line for volume in self.volumes for line in volume.lines()]
        if self.fence_up is not None:
            state = "up: fenced tokens cannot be recovered until reboot" if self.fence_up else "down"
            lines.append(f"fence (PCR {FENCE_PCR}): {state}")
        return lines


def status(tcti: str, devices: Sequence[Path | Unresolved]) -> Report:
    """Every device's status, in order; an `Unresolved` crypttab entry (its device is not there) is
    reported as a volume that cannot be read."""
    tpm: Tpm | None = None
    tpm_error: LuksTpmError | None = None
    try:
        tpm = Tpm(tcti)
    except LuksTpmError as error:
        if error.code is ExitCode.USAGE:  # a TCTI refused before use: the command line's mistake
            raise
        tpm_error = error
    try:
        fence_up = _fence_up(tpm) if tpm is not None else None
        volumes = [
            _volume_status(path, tpm, tpm_error, alone=len(devices) == 1)
            if isinstance(path, Path)
            else _unreadable(path.device, path.error)
            for path in devices
        ]
        warnings = tuple(tpm.warnings) if tpm is not None else ()
    finally:
        if tpm is not None:
            tpm.close()
    every = all(volume.unlocks for volume in volumes)
    code = ExitCode.OK if every else ExitCode.UNLOCK_FAILED
    return Report(StatusReport(tuple(volumes), fence_up, every), warnings, exit_code=code)


def _fence_up(tpm: Tpm) -> bool | None:
    """None also for a TPM without the fence's bank: it has no fence (fenced tokens say so each)."""
    try:
        return tpm_pcr.fence_is_up(tpm)
    except LuksTpmError as error:
        if error.cause is not Cause.UNSUPPORTED:
            raise
        return None


def _unreadable(device: str, error: LuksTpmError) -> VolumeStatus:
    return VolumeStatus(device, None, (), (), ErrorInfo.of(error), False)


def _volume_status(path: Path, tpm: Tpm | None, tpm_error: LuksTpmError | None, *, alone: bool) -> VolumeStatus:
    try:
        with open_device(path) as device:
            tokens = tuple(_token_status(device, tpm, tpm_error, entry) for entry in luks_tpm_tokens(device))
            unlocks = any(token.unlocks for token in tokens)
            return VolumeStatus(str(path), device.uuid, tuple(device.keyslots()), tokens, None, unlocks)
    except LuksTpmError as error:
        if alone:  # the one device asked about cannot be read: that is the answer, with its own exit code
            raise
        return _unreadable(str(path), error)


def _token_status(
    device: Device, tpm: Tpm | None, tpm_error: LuksTpmError | None, entry: TokenEntry
) -> TokenStatus | DamagedTokenStatus:
    token = entry.token
    if token is None:
        assert entry.damage is not None
        damage = entry.damage
        return DamagedTokenStatus(entry.token_id, True, "damaged", False, damage.message, str(damage.cause))
    facts = TokenStatus(
        id=entry.token_id,
        damaged=False,
        mode=str(token.mode),
        pcr_bank=str(token.pcr_bank),
        pcrs=token.pcrs,
        pin=token.pin,
        fence=token.fence,
        created=token.created,
        parent=token.parent.name.hex(),
        parent_handle=None if token.parent.handle is None else f"{token.parent.handle:#x}",
        summary=f"{token.describe()}, created {token.created}",
        other_tpm=False,
        unlocks=False,
        reason=None,
        cause=None,
    )
    if tpm is None:
        assert tpm_error is not None
        return dataclasses.replace(facts, reason=tpm_error.message, cause=str(tpm_error.cause))
    try:
        if token.pcrs:
            changed = changed_pcrs(token, tpm_pcr.pcr_values(tpm, token.pcr_bank, token.pcrs))
            facts = dataclasses.replace(facts, pcrs_matching=tuple(i for i in token.pcrs if i not in changed))
        _try(device, tpm, entry.token_id, token)
        note = "needs the PIN" if token.pin else None
        return dataclasses.replace(facts, unlocks=True, note=note)
    except UnlockFailed as error:
        return _would_not_unlock(facts, error.failures[0].error)
    except LuksTpmError as error:
        return _would_not_unlock(facts, error)


def _try(device: Device, tpm: Tpm, token_id: int, token: Token) -> None:
    """Recover the token's key and zero it; for a PIN token, check what can be checked without the PIN,
    in unseal's order."""
    with Recovery(tpm) as recovery:
        if not token.pin:
            recovery.recover(device, token_id=token_id).key.close()
            return
        recovery.precheck(token)
    from .tpm.info import lockout_state

    if lockout_state(tpm).in_lockout:  # a PIN object is DA-protected: no try is accepted now
        raise LuksTpmError("the TPM is in dictionary-attack lockout", code=ExitCode.LOCKED_OUT, cause=Cause.LOCKED_OUT)


def _would_not_unlock(facts: TokenStatus, error: LuksTpmError) -> TokenStatus:
    """Another TPM's token is not a failure here: it is marked as such, and the volume's verdict rests on
    this TPM's tokens (a volume with only other TPMs' tokens does not unlock here, and says so)."""
    other = error.cause is Cause.OTHER_TPM
    summary = f"{facts.summary} (another TPM)" if other else facts.summary
    return dataclasses.replace(
        facts, unlocks=False, reason=error.message, cause=str(error.cause), other_tpm=other, summary=summary
    )
