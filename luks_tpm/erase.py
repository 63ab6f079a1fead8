"""`luks-tpm erase`: crypto-erase single volumes, and prove it by reading the header back.

It removes one thing per header write (libcryptsetup writes both header copies with a sequence number,
so each write is whole or absent), the ways in that need no secret first: luks-tpm tokens, other tools'
tokens, then the keyslots. Any interruption leaves a subset of what was there, every remaining part
unchanged, and running erase again finishes the job. It needs no TPM (nothing of the TSS is imported),
so it also works on a rescue system where the TSS is missing. The data area is not overwritten: it is
ciphertext under a key that no longer exists anywhere.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .cryptsetup import CryptsetupError, Device, open_device, write_error
from .errors import Cause, ExitCode, LuksTpmError, die
from .output import ABSENT, TEXT_ONLY, Absent, Report, progress
from .prompt import Confirm
from .tokenformat import TOKEN_TYPE, parse

_WARNING = (
    "Erasing destroys every keyslot and every token; afterwards nothing opens these volumes (no passphrase, "
    "no recovery key, no TPM). The data area is not overwritten: without the key it is noise."
)


@dataclasses.dataclass(frozen=True)
class TokenSummary:
    id: int
    summary: str


@dataclasses.dataclass(frozen=True)
class OtherToken:
    id: int
    type: str


@dataclasses.dataclass(frozen=True)
class Left:
    keyslots: tuple[int, ...]
    tokens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class VolumeErase:
    device: str
    uuid: str
    keyslots: tuple[int, ...]
    luks_tpm_tokens: tuple[TokenSummary, ...]
    other_tokens: tuple[OtherToken, ...]
    in_use_by: tuple[str, ...]
    # after erasing
    tokens_removed: tuple[int, ...] | Absent = ABSENT
    keyslots_destroyed: tuple[int, ...] | Absent = ABSENT
    left: Left | Absent = ABSENT
    verified: bool | Absent = ABSENT

    def lines(self) -> list[str]:
        lines = [f"  {self.device} (LUKS2 {self.uuid}):"]
        lines += [f"    token {t.id} (luks-tpm): {t.summary}" for t in self.luks_tpm_tokens]
        lines += [f"    token {t.id} ({t.type})" for t in self.other_tokens]
        if self.keyslots:
            lines.append(
                f"    keyslot {', '.join(map(str, self.keyslots))}: passphrases and recovery keys stop working"
            )
        if not (self.keyslots or self.luks_tpm_tokens or self.other_tokens):
            lines.append("    nothing left to destroy: no keyslot, no token")
        if self.in_use_by:
            lines.append(
                f"    in use by {', '.join(self.in_use_by)}: the open mapping keeps its key in the kernel "
                "until it is closed"
            )
        return lines

    def outcome(self) -> str:
        if self.verified is True:
            return f"{self.device}: erased: no keyslot and no token left"
        left = self.left if isinstance(self.left, Left) else None
        return f"{self.device}: NOT ERASED: left {dataclasses.asdict(left) if left else 'unknown'}"


@dataclasses.dataclass(frozen=True)
class EraseReport:
    volumes: tuple[VolumeErase, ...]
    dry_run: bool
    verified: bool | Absent = ABSENT
    text: tuple[str, ...] = dataclasses.field(default=(), metadata=TEXT_ONLY)

    def lines(self) -> list[str]:
        return list(self.text)


def erase(devices: Sequence[Path], *, dry_run: bool, confirm: Confirm | None) -> Report:
    """`confirm` None: the operator said --yes."""
    plans = []
    for path in devices:
        with open_device(path) as device:
            plans.append(_plan(device))
    lines = [_WARNING] + [line for plan in plans for line in plan.lines()]
    if dry_run:
        return Report(EraseReport(tuple(plans), True, text=(*lines, "dry run: nothing was erased")))
    if confirm is not None and not confirm(lines, "Erase these volumes for good?"):
        die("not erasing: the volumes were left as they were", code=ExitCode.REFUSED, cause=Cause.REFUSED)
    results = tuple(_erase_one(plan) for plan in plans)
    out = ([] if confirm is not None else lines) + [result.outcome() for result in results]
    every = all(result.verified is True for result in results)
    report = EraseReport(results, False, every, tuple(out))
    return Report(report, exit_code=ExitCode.OK if every else ExitCode.INCOMPLETE)


def _plan(device: Device) -> VolumeErase:
    tokens = device.tokens()
    return VolumeErase(
        device.path,
        device.uuid,
        tuple(device.keyslots_in_header()),
        tuple(
            TokenSummary(token_id, _token_summary(device, token_id)) for token_id, kind in tokens if kind == TOKEN_TYPE
        ),
        tuple(OtherToken(token_id, kind) for token_id, kind in tokens if kind != TOKEN_TYPE),
        tuple(_holders(device.path)),
    )


def _token_summary(device: Device, token_id: int) -> str:
    try:
        token = parse(device.token_json_get(token_id) or "", token_id)
    except LuksTpmError as error:
        return f"damaged ({error.message})"
    return f"{token.describe()}, created {token.created}"


def _holders(path: str) -> list[str]:
    """What has the device (or, for an image, the loop device over it) open as a dm or md member."""
    try:
        info = os.stat(path)
    except OSError:
        return []
    blocks: list[Path] = []
    if stat.S_ISBLK(info.st_mode):
        blocks.append(Path(f"/sys/dev/block/{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"))
    else:
        real = os.path.realpath(path)
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                if backing.read_text().strip() == real:
                    blocks.append(backing.parent.parent)
            except OSError:
                continue
    return sorted(holder.name for block in blocks for holder in (block / "holders").glob("*"))


def _erase_one(plan: VolumeErase) -> VolumeErase:
    """Destroy in an order that only ever removes, one thing per write: the tokens that need no secret to
    open the volume (ours first), then the keyslots. What is there now is what gets destroyed, so a second
    run after an interruption finishes the first one's work."""
    tokens_removed: list[int] = []
    keyslots_destroyed: list[int] = []
    with open_device(plan.device, write=True) as device:
        tokens = device.tokens()
        order = [t for t, kind in tokens if kind == TOKEN_TYPE] + [t for t, kind in tokens if kind != TOKEN_TYPE]
        try:
            for token_id in order:
                device.token_remove(token_id)
                tokens_removed.append(token_id)
            for keyslot in device.keyslots_in_header():
                device.keyslot_destroy(keyslot)
                keyslots_destroyed.append(keyslot)
        except CryptsetupError as error:
            raise write_error(device, error) from None
    progress(f"{plan.device}: removed token(s) {_ids(tokens_removed)}, destroyed keyslot(s) {_ids(keyslots_destroyed)}")
    with open_device(plan.device) as fresh:  # read back from the disk, not from what libcryptsetup holds in memory
        left = Left(tuple(fresh.keyslots_in_header()), tuple(token_id for token_id, _ in fresh.tokens()))
    return dataclasses.replace(
        plan,
        tokens_removed=tuple(tokens_removed),
        keyslots_destroyed=tuple(keyslots_destroyed),
        left=left,
        verified=not left.keyslots and not left.tokens,
    )


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) or "none"
