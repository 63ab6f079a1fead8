"""`luks-tpm status`: each volume's tokens, whether they would unlock now, and why not, and whether they
will at the next boot.

"Now" is found out by trying: the key is recovered, verified against the header, then zeroed. PIN tokens
are checked as far as can be without the PIN. "The next boot" is the predicted state of the boot chain
(nextboot.py) held against each token's PCR values or approved states; on a machine without a TCG event
log it is unknown. Exit 5 when some volume will not unlock at the next boot (where that is known; else
when some volume would not unlock now), so fleets can ask "will this machine boot unattended?" in one
command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from .cryptsetup import Device, open_device
from .crypttab import Unresolved
from .errors import DEAD_CAUSES, Cause, ExitCode, LuksTpmError, UnlockFailed
from .model import FENCE_PCR
from .nextboot import NextBoot, predict_next_boot
from .output import OMIT_IF_NONE, ErrorInfo, Report
from .tokenformat import Token, format_version
from .tpm import Tpm
from .tpm import pcr as tpm_pcr
from .unlock import Recovery, TokenEntry, changed_pcrs, luks_tpm_tokens


@dataclasses.dataclass(frozen=True)
class TokenStatus:
    id: int
    damaged: bool
    mode: str
    version: int  # the token format's (docs/token-format.md): 2 bound to the boot chain, 3 sealed elsewhere
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
    next_boot: bool | None = None  # it will unlock at the next boot; None: unknown (no event log)

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
        lines.append(f"    {verdict}")
        if self.next_boot is not None and not self.other_tpm:
            lines.append(f"    next boot: {'unlocks' if self.next_boot else 'will NOT unlock unattended'}")
        return lines


@dataclasses.dataclass(frozen=True)
class DamagedTokenStatus:
    id: int
    damaged: bool
    summary: str
    unlocks: bool
    reason: str
    cause: str
    other_tpm: bool = False
    next_boot: bool | None = False

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
    next_boot: bool | None = False

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
    next_boot: bool | None  # every volume unlocks at the next boot; None: unknown (no event log)
    next_boot_problem: ErrorInfo | None  # why the next boot could not be predicted

    def lines(self) -> list[str]:
        lines = [line for volume in self.volumes for line in volume.lines()]
        if self.fence_up is not None:
            state = "up: fenced tokens cannot be recovered until reboot" if self.fence_up else "down"
            lines.append(f"fence (PCR {FENCE_PCR}): {state}")
        if self.next_boot_problem is not None:
            lines.append(f"next boot: NOT predicted: {self.next_boot_problem.message}")
        if self.next_boot is not None:
            every = "every volume unlocks unattended" if self.next_boot else "NOT every volume unlocks unattended"
            lines.append(f"next boot: {every}")
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
        outlook = Outlook.of(tpm)
        volumes = [
            _volume_status(path, tpm, tpm_error, outlook, alone=len(devices) == 1)
            if isinstance(path, Path)
            else _unreadable(path.device, path.error)
            for path in devices
        ]
        warnings = tuple(tpm.warnings) if tpm is not None else ()
    finally:
        if tpm is not None:
            tpm.close()
    every = all(volume.unlocks for volume in volumes)
    next_boot = _all_of(volume.next_boot for volume in volumes)
    ready = every if next_boot is None else next_boot
    report = StatusReport(tuple(volumes), fence_up, every, next_boot, outlook.problem)
    return Report(report, warnings, exit_code=ExitCode.OK if ready else ExitCode.UNLOCK_FAILED)


@dataclasses.dataclass(frozen=True)
class Outlook:
    """The next boot as far as it is known: predicted, not predictable (why), or unknown (no event log)."""

    next_boot: NextBoot | None
    problem: ErrorInfo | None

    @classmethod
    def of(cls, tpm: Tpm | None) -> Outlook:
        if tpm is None:
            return cls(None, None)
        try:
            return cls(predict_next_boot(tpm), None)
        except LuksTpmError as error:
            return cls(None, None if error.cause is Cause.NO_EVENT_LOG else ErrorInfo.of(error))

    def unlocks(self, token: Token, now: TokenStatus) -> bool | None:
        """Whether `token` unlocks at the next boot (None: unknown)."""
        if now.other_tpm or now.cause in _DEAD:
            return False
        if now.cause == str(Cause.NO_TPM):
            return None
        if not token.pcrs:  # bound to the TPM (and the fence, which is down again at boot)
            return now.unlocks or now.cause == str(Cause.FENCE_UP)
        if self.next_boot is None:
            return None if self.problem is None else False
        state = self.next_boot.state(token.pcr_bank, token.pcrs)
        if token.approver is not None:
            return any(approval.values == state for approval in token.approvals)
        return all(token.pcr_values.get(index) in (None, state[index]) for index in token.pcrs)


_DEAD = frozenset(str(cause) for cause in DEAD_CAUSES)


def _all_of(values: Iterable[bool | None]) -> bool | None:
    found = list(values)
    return False if False in found else None if None in found or not found else True


def _any_of(values: Iterable[bool | None]) -> bool | None:
    found = list(values)
    return True if True in found else None if None in found else False


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


def _volume_status(
    path: Path, tpm: Tpm | None, tpm_error: LuksTpmError | None, outlook: Outlook, *, alone: bool
) -> VolumeStatus:
    try:
        with open_device(path) as device:
            tokens = tuple(_token_status(device, tpm, tpm_error, entry, outlook) for entry in luks_tpm_tokens(device))
            unlocks = any(token.unlocks for token in tokens)
            next_boot = _any_of(token.next_boot for token in tokens)
            return VolumeStatus(str(path), device.uuid, tuple(device.keyslots()), tokens, None, unlocks, next_boot)
    except LuksTpmError as error:
        if alone:  # the one device asked about cannot be read: that is the answer, with its own exit code
            raise
        return _unreadable(str(path), error)


def _token_status(
    device: Device, tpm: Tpm | None, tpm_error: LuksTpmError | None, entry: TokenEntry, outlook: Outlook
) -> TokenStatus | DamagedTokenStatus:
    now = _now(device, tpm, tpm_error, entry)
    if entry.token is None or isinstance(now, DamagedTokenStatus):
        return now
    return dataclasses.replace(now, next_boot=outlook.unlocks(entry.token, now))


def _now(
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
        version=format_version(token),
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
            facts = dataclasses.replace(facts, pcrs_matching=_matching(token, tpm))
        _try(device, tpm, entry.token_id, token)
        note = "needs the PIN" if token.pin else None
        return dataclasses.replace(facts, unlocks=True, note=note)
    except UnlockFailed as error:
        return _would_not_unlock(facts, error.failures[0].error)
    except LuksTpmError as error:
        return _would_not_unlock(facts, error)


def _matching(token: Token, tpm: Tpm) -> tuple[int, ...]:
    """The bound PCRs that hold a value the token accepts now: its recorded value, or (with an approver)
    that PCR's value in some approved state."""
    current = tpm_pcr.pcr_values(tpm, token.pcr_bank, token.pcrs)
    if token.approver is None:
        changed = changed_pcrs(token, current)
        return tuple(index for index in token.pcrs if index not in changed)
    return tuple(i for i in token.pcrs if any(a.values.get(i) == current[i] for a in token.approvals))


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
