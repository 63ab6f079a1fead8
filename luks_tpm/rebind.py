"""`luks-tpm predict` and `luks-tpm rebind`: the next boot's PCR values, and the approved states of every
boot-chain token kept to exactly {this boot's state, the next boot's} (docs/boot-chain.md).

Only a boot in an approved state approves anything: then the boot files were the approved ones when they
were measured, and whatever changed them since was this running system (root's choice, as with every
peer). A boot that came up with the passphrase in a state nobody approved (a command line edited at the
GRUB prompt, an initrd changed while the machine was off, an update nothing could predict) approves
nothing, and its tokens are left as they are: `--approve-current` approves it, on purpose, after a look at
what booted (`luks-tpm predict`, the event log).

Run after anything that changes what boots (the package's kernel, initramfs, GRUB and shim hooks do) and at
every boot (the stale state of the previous boot is dropped then). It needs no volume key: a version 2
token's policy takes any state the approver signed, and the fence and PIN stay part of it whatever is
approved. A token is rewritten whole (the new one written, then the old one removed), so an interruption
leaves the old approvals or both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from . import approver as approver_file
from .approver import ApproverKey
from .cryptsetup import Device, open_device
from .crypttab import Unresolved
from .enrollment import remove_token, write_token
from .errors import ExitCode, LuksTpmError
from .model import Approval, Bank
from .nextboot import BootChain, NextBoot, keep_boot_files, predict_next_boot
from .output import OMIT_IF_NONE, ErrorInfo, Report, progress
from .tokenformat import Token
from .tpm import Tpm
from .tpm.pcr import pcr_values
from .unlock import luks_tpm_tokens


@dataclasses.dataclass(frozen=True)
class Predicted:
    banks: dict[Bank, dict[str, str]]  # bank -> PCR -> hex, PCRs 0-9 and 14
    changed: tuple[int, ...]  # the PCRs (sha256) that differ from now
    changes: tuple[str, ...]  # in words

    @classmethod
    def of(cls, next_boot: NextBoot) -> Predicted:
        banks = {
            bank: {str(p): v.hex() for p, v in sorted(values.items())} for bank, values in next_boot.values.items()
        }
        bank = Bank.SHA256 if Bank.SHA256 in next_boot.values else next(iter(next_boot.values))
        return cls(banks, next_boot.changed(bank), next_boot.changes)

    def lines(self) -> list[str]:
        changed = ", ".join(map(str, self.changed)) or "none"
        return [f"next boot: PCRs that change: {changed}", *(f"  {change}" for change in self.changes)]


@dataclasses.dataclass(frozen=True)
class TokenRebound:
    id: int  # the token's id now (a rewritten token has a new one)
    was: int  # the id it had
    approved: int  # approved states now
    added: int
    dropped: int
    next_boot: bool | None  # the next boot's state is approved (None: not predicted)
    skipped: str | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)  # why it was left alone

    def line(self) -> str:
        if self.skipped is not None:
            return f"  token {self.was}: left alone: {self.skipped}"
        moved = f"token {self.was} -> {self.id}" if self.id != self.was else f"token {self.id}"
        ready = {True: "next boot approved", False: "next boot NOT approved", None: "next boot not predicted"}
        return f"  {moved}: {self.approved} approved state(s) (+{self.added} -{self.dropped}); {ready[self.next_boot]}"


@dataclasses.dataclass(frozen=True)
class VolumeRebound:
    device: str
    tokens: tuple[TokenRebound, ...]
    error: ErrorInfo | None

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"{self.device}: {self.error.message}"]
        return (
            [f"{self.device}:", *(token.line() for token in self.tokens)]
            if self.tokens
            else [f"{self.device}: no token bound to the boot chain through approvals"]
        )


@dataclasses.dataclass(frozen=True)
class RebindReport:
    volumes: tuple[VolumeRebound, ...]
    next_boot: Predicted | None  # None: not predicted (`problem` says why)
    problem: ErrorInfo | None

    def lines(self) -> list[str]:
        head = (
            self.next_boot.lines()
            if self.next_boot
            else [f"next boot NOT predicted: {self.problem.message}"]
            if self.problem
            else []
        )
        return head + [line for volume in self.volumes for line in volume.lines()]


_LIVE = BootChain()


def predict(tcti: str, chain: BootChain = _LIVE) -> Report:
    with Tpm(tcti) as tpm:
        next_boot = predict_next_boot(tpm, chain)
    return Report(Predicted.of(next_boot))


def rebind(
    tcti: str,
    devices: Sequence[Path | Unresolved],
    approver: Path,
    given: dict[int, bytes] | None = None,
    *,
    approve_current: bool = False,
    chain: BootChain = _LIVE,
) -> Report:
    """Approve {now (if approved already, or `approve_current`), the next boot (or `given`)} for every
    boot-chain token of `devices`; drop every other state."""
    key = approver_file.required(approver)
    with approver_file.exclusive(approver), Tpm(tcti) as tpm:
        next_boot, problem = _next_boot(tpm, chain) if given is None else (None, None)
        target = _Target(key, next_boot, given, approve_current)
        volumes = tuple(_volume(tpm, target, path) for path in devices)
        warnings = tuple(tpm.warnings)
    unapproved = any(token.skipped and token.next_boot is False for volume in volumes for token in volume.tokens)
    code = (
        ExitCode.UNPREDICTABLE
        if problem is not None
        else ExitCode.DEVICE
        if any(volume.error is not None for volume in volumes)
        else ExitCode.REFUSED
        if unapproved
        else ExitCode.OK
    )
    predicted = Predicted.of(next_boot) if next_boot is not None else None
    return Report(RebindReport(volumes, predicted, problem), warnings, exit_code=code)


def _next_boot(tpm: Tpm, chain: BootChain) -> tuple[NextBoot | None, ErrorInfo | None]:
    try:
        keep_boot_files(tpm, chain)
        return predict_next_boot(tpm, chain), None
    except LuksTpmError as error:
        progress(f"warning: {error.message}")
        return None, ErrorInfo.of(error)


@dataclasses.dataclass(frozen=True)
class _Target:
    key: ApproverKey
    next_boot: NextBoot | None
    given: dict[int, bytes] | None
    approve_current: bool

    def later(self, token: Token, now: dict[int, bytes]) -> dict[int, bytes] | None:
        """The state to approve beside `now`: the given values over the current ones, or the prediction."""
        if self.given is not None:
            return {index: self.given.get(index, value) for index, value in now.items()}
        return self.next_boot.state(token.pcr_bank, token.pcrs) if self.next_boot else None


def _volume(tpm: Tpm, target: _Target, path: Path | Unresolved) -> VolumeRebound:
    if isinstance(path, Unresolved):
        return VolumeRebound(path.device, (), ErrorInfo.of(path.error))
    try:
        with open_device(path, write=True) as device:
            tokens = tuple(
                _token(device, tpm, target, entry.token_id, entry.token)
                for entry in luks_tpm_tokens(device)
                if entry.token is not None and entry.token.approver is not None
            )
    except LuksTpmError as error:
        return VolumeRebound(str(path), (), ErrorInfo.of(error))
    return VolumeRebound(str(path), tokens, None)


def _token(device: Device, tpm: Tpm, target: _Target, token_id: int, token: Token) -> TokenRebound:
    assert token.approver is not None
    if token.approver.name != target.key.approver.name:
        skipped = "approved by another approver key (another machine's, or this one's was replaced)"
        return TokenRebound(token_id, token_id, len(token.approvals), 0, 0, None, skipped)
    now = pcr_values(tpm, token.pcr_bank, token.pcrs)
    if not target.approve_current and all(approval.values != now for approval in token.approvals):
        skipped = "this boot is not in an approved state (it came up with the passphrase?): it approves nothing"
        return TokenRebound(token_id, token_id, len(token.approvals), 0, 0, False, skipped)
    later = target.later(token, now)
    wanted = [now] + ([later] if later is not None and later != now else [])
    kept = [approval for approval in token.approvals if approval.values in wanted]
    added: list[Approval] = []
    for state in wanted:
        if all(approval.values != state for approval in kept):
            added.append(target.key.sign(tpm, token.pcr_policy(values=state)))
    approvals = tuple(sorted([*kept, *added], key=lambda approval: wanted.index(approval.values)))
    ready = None if later is None else True
    dropped = len(token.approvals) - len(kept)
    if not added and not dropped:
        return TokenRebound(token_id, token_id, len(approvals), 0, 0, ready)
    new_id = write_token(device, dataclasses.replace(token, approvals=approvals))
    remove_token(device, token_id)
    return TokenRebound(new_id, token_id, len(approvals), len(added), dropped, ready)
