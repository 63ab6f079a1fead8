"""`luks-tpm reseal`: a new token for new PCR values, verified, and only then the old one removed.

The key comes from a token that still works, else from the passphrase or recovery key. A token bound to
given values cannot be verified now: it is kept beside the old one unless `--force`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .cryptsetup import Device, open_device
from .enrollment import bind, remove_token, unverified_note, volume_key_with_passphrase
from .errors import Cause, ExitCode, LuksTpmError, die
from .model import Mode
from .output import TEXT_ONLY, Report, progress
from .prompt import NewPinSource, PassphraseSource, PinSource
from .secret import Secret
from .settings import Enrollment, ResealSettings
from .tokenformat import Token
from .tpm import Tpm
from .tpm.owner import owner_authorization
from .unlock import Recovered, Recovery, TokenEntry, luks_tpm_tokens

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Resealed:
    device: str
    token: int
    removed: int | None  # the old token, removed because the new one was verified (or --force)
    kept: int | None  # the old token, kept because the new one could not be verified
    verified: bool
    pcrs: tuple[int, ...]
    summary: str = dataclasses.field(metadata=TEXT_ONLY)

    def lines(self) -> list[str]:
        return [self.summary]


def reseal(
    tcti: str,
    device_path: Path,
    settings: ResealSettings,
    passphrase: PassphraseSource,
    pins: PinSource,
    new_pin: NewPinSource,
    owner_auth: Secret | None = None,
) -> Report:
    """What is not given is the old token's: its mode, bank, PCRs (plus those given values for), PIN, fence.
    `owner_auth`: the owner hierarchy's authorization, when it has one (closed here)."""
    try:
        return _reseal(tcti, device_path, settings, passphrase, pins, new_pin, owner_auth)
    finally:
        if owner_auth is not None:
            owner_auth.close()


def _reseal(
    tcti: str,
    device_path: Path,
    settings: ResealSettings,
    passphrase: PassphraseSource,
    pins: PinSource,
    new_pin: NewPinSource,
    owner_auth: Secret | None,
) -> Report:
    path = str(device_path)
    with open_device(path, write=True) as device:
        old_id, old = _old_token(device, settings.token_id)
        bank = old.pcr_bank if settings.bank is None else settings.bank
        if any(len(value) != bank.size for value in settings.pcr_values.values()):
            die(f"--pcr-value: the {bank} bank needs {bank.size}-byte values", code=ExitCode.USAGE, cause=Cause.USAGE)
        chosen = tuple(sorted(set(old.pcrs if settings.pcrs is None else settings.pcrs) | set(settings.pcr_values)))
        enrollment = Enrollment(old.mode, bank, chosen, settings.pcr_values, old.pin, old.fence)
        with Tpm(tcti) as tpm, owner_authorization(tpm, owner_auth), Recovery(tpm, pins) as recovery:
            found = _key_for_reseal(device, recovery)
            with found.key if found else volume_key_with_passphrase(device, passphrase) as key:
                pin = _pin_for_reseal(recovery, old_id, enrollment.pin, new_pin)
                try:
                    bound = bind(device, tpm, key, enrollment, pin, old.extra)
                finally:
                    if pin is not None:
                        pin.close()
            warnings = tuple(tpm.warnings)
        described = f"token {bound.token_id} ({bound.token.describe()})"
        if not bound.verified and not settings.force:
            line = (
                f"{path}: {described} added; {unverified_note(enrollment)}; token {old_id} kept (remove it once "
                "the new one works, or pass --force)"
            )
            return Report(Resealed(path, bound.token_id, None, old_id, False, bound.token.pcrs, line), warnings)
        remove_token(device, old_id)
    line = f"{path}: token {old_id} replaced by {described}"
    return Report(Resealed(path, bound.token_id, old_id, None, bound.verified, bound.token.pcrs, line), warnings)


def _old_token(device: Device, token_id: int | None) -> tuple[int, Token]:
    """The token to reseal: the one asked for, or the first bound to PCRs or the fence (or sealed)."""
    bound: list[TokenEntry] = [
        entry
        for entry in luks_tpm_tokens(device)
        if entry.token is not None and (entry.token.pcrs or entry.token.fence or entry.token.mode is Mode.SEALED)
    ]
    if token_id is not None:
        bound = [entry for entry in bound if entry.token_id == token_id]
    if not bound:
        which = (
            f"--token-id {token_id}: token {token_id} of {device.path} is not"
            if token_id is not None
            else f"{device.path} has no luks-tpm token"
        )
        die(
            f"{which} bound to PCRs or the fence: nothing to reseal",
            hint="`luks-tpm status` lists the tokens",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    token = bound[0].token
    assert token is not None
    return bound[0].token_id, token


def _key_for_reseal(device: Device, recovery: Recovery) -> Recovered | None:
    try:
        found = recovery.recover(device)
    except LuksTpmError as error:
        log.warning("%s; using the passphrase or recovery key instead", error.message)
        return None
    progress(f"got the volume key from token {found.token_id}")
    return found


def _pin_for_reseal(recovery: Recovery, old_id: int, with_pin: bool, new_pin: NewPinSource) -> Secret | None:
    """The new binding's PIN: the old token's only when it just unsealed that token (a PIN that failed is
    never reused), otherwise asked for explicitly."""
    if not with_pin:
        return None
    verified = recovery.verified_pins.get(old_id)
    if verified is not None:
        return Secret.copy_of(verified.view())
    pin = new_pin()
    if pin is None:
        die(
            f"token {old_id} has a PIN, and it was not verified now (wrong or not given), so it is not reused",
            hint="give the new binding's PIN with --new-pin-file, or run on a terminal",
            code=ExitCode.UNLOCK_FAILED,
            cause=Cause.WRONG_PIN,
        )
    return pin
