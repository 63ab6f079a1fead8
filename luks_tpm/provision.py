"""Writing bindings: format a new volume, enroll, reseal and remove tokens.

Every write goes through libcryptsetup, in an order that leaves at least the old ways in after an
interruption at any point; every new token is read back and made to recover the key before success
is reported; a token that cannot be verified never replaces a working one unless forced; and nothing
removes the last way into a volume unless forced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import secrets
import uuid as uuid_module
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import derive
from .cryptsetup import CryptsetupError, Device, Pbkdf, header_facts, open_device
from .errors import DEAD_CAUSES, Cause, ExitCode, LuksTpmError, die
from .model import FENCE_PCR, DerivedToken, Mode, Parent, PcrPolicy, SealedToken, Token, to_json, utc_now
from .output import Report, progress
from .prompt import generate_recovery_key
from .secret import Secret
from .settings import Enrollment, FormatSettings, Recovery
from .tpm import Tpm
from .tpm import keys as tpm_keys
from .tpm import pcr as tpm_pcr
from .tpm import srk as tpm_srk
from .unlock import KeyRecovery, PinSource, Recovered, luks_tpm_tokens, recover_verified

# The LUKS2 digest only has to stop a wrong key from opening the volume: the keys it checks are
# random 256/512-bit keys, so a cheap digest costs no security and saves ~100 ms on every unlock.
_DIGEST_PBKDF = Pbkdf("pbkdf2", iterations=1000)

log = logging.getLogger(__name__)

Confirm = Callable[[str], bool]
PassphraseSource = Callable[[], Secret]
NewPinSource = Callable[[], Secret | None]


def write_error(device: Device, error: CryptsetupError) -> LuksTpmError:
    """A failed header write in words, from the errno and what libcryptsetup logged about it."""
    said = " ".join(error.log).lower()
    if "concurrent" in said:
        return LuksTpmError(
            f"{device.path}: another process changed the LUKS header meanwhile; nothing was written",
            hint="run the command again",
            cause=Cause.HEADER_CHANGED,
            code=ExitCode.DEVICE,
        )
    if "free token" in said or "no free" in said:
        return LuksTpmError(
            f"{device.path}: the LUKS2 header is full ({error.log[-1] if error.log else error})",
            hint="remove unused tokens (`luks-tpm status`, `luks-tpm remove`) or keyslots; the "
            "JSON area size is fixed when the volume is formatted",
            cause=Cause.HEADER_FULL,
            code=ExitCode.DEVICE,
        )
    if error.errno == errno.ENOSPC:
        return LuksTpmError(
            f"{device.path}: the LUKS2 header's JSON area is full",
            hint="remove unused tokens "
            "(`luks-tpm status`, `luks-tpm remove`) or keyslots; a larger area can only be chosen "
            "when formatting (`cryptsetup luksFormat --luks2-metadata-size`)",
            cause=Cause.HEADER_FULL,
            code=ExitCode.DEVICE,
        )
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return LuksTpmError(
            f"{device.path}: cannot write the LUKS header ({error.strerror})",
            hint="is the device or image read-only?",
            cause=Cause.DEVICE,
            code=ExitCode.DEVICE,
        )
    return LuksTpmError(
        f"{device.path}: writing the LUKS header failed: {error}", cause=Cause.DEVICE, code=ExitCode.DEVICE
    )


def _write_token(device: Device, token: Token) -> int:
    if len(device.tokens()) >= 32:
        die(
            f"{device.path}: the LUKS2 header already holds 32 tokens, the most it can",
            hint="remove unused tokens (`luks-tpm status`, `luks-tpm remove`)",
            cause=Cause.HEADER_FULL,
            code=ExitCode.DEVICE,
        )
    try:
        return device.token_json_set(to_json(token))
    except CryptsetupError as error:
        raise write_error(device, error) from None


def _remove_token(device: Device, token_id: int) -> None:
    try:
        device.token_remove(token_id)
    except CryptsetupError as error:
        raise write_error(device, error) from None


# ---- making tokens: one place per mode --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Binding:
    """What a new token is made under: the SRK, and the policy with its digest (None: TPM-only derived)."""

    srk: Any
    parent: Parent
    policy: PcrPolicy | None
    digest: bytes
    endorsement: bytes | None


def _prepare(tpm: Tpm, enrollment: Enrollment) -> _Binding:
    if enrollment.mode is Mode.DERIVED and enrollment.fence and tpm_pcr.fence_is_up(tpm):
        die(
            f"the fence is up (PCR {FENCE_PCR} is not zero), so the TPM cannot compute a fenced derived key now",
            hint="enroll from the installer or the initramfs before the fence is raised, or use --mode sealed "
            "--fence (sealed to PCR 15 = zeros, verified at the next boot)",
            code=ExitCode.REFUSED,
            cause=Cause.FENCE_UP,
        )
    if enrollment.persist_srk:
        _persist_srk_if_free(tpm)
    srk, parent = tpm_srk.current_srk(tpm)
    values = tpm_pcr.pcr_values(tpm, enrollment.bank, enrollment.pcrs) if enrollment.pcrs else {}
    values.update(enrollment.pcr_values)
    policy = PcrPolicy(enrollment.bank, enrollment.pcrs, values, enrollment.pin, enrollment.fence)
    if enrollment.mode is Mode.DERIVED and policy.empty:
        return _Binding(srk, parent, None, b"", tpm_srk.endorsement_name(tpm))
    return _Binding(srk, parent, policy, tpm_pcr.policy_digest(tpm, policy), tpm_srk.endorsement_name(tpm))


def _persist_srk_if_free(tpm: Tpm) -> None:
    """Store the standard SRK at 0x81000001 when that handle is free (as systemd-cryptenroll does), so
    unlocking needs a ReadPublic instead of a CreatePrimary. Best effort: a TPM that refuses keeps
    working with a transient SRK."""
    if tpm_srk.persistent_handle_free(tpm):
        try:
            parent = tpm_srk.persist_srk(tpm)
            progress(f"stored the standard SRK at {parent.handle:#x} (faster unlocks; --transient-srk avoids this)")
        except LuksTpmError as error:
            progress(f"could not store the SRK persistently ({error.message}); using a transient one")


def _derived_key(recovery: KeyRecovery, binding: _Binding, uuid: str, salt: bytes, length: int) -> Secret:
    with recovery.derive(derive.hmac_message(uuid, salt), binding.srk, binding.policy, binding.digest) as prk:
        return derive.expand(prk, uuid, length)


def _token_fields(binding: _Binding, *, digest: int, key_size: int) -> dict[str, Any]:
    policy = binding.policy
    return {
        "digest": digest,
        "key_size": key_size,
        "parent": binding.parent,
        "created": utc_now(),
        "endorsement": binding.endorsement,
        "policy": binding.digest,
        "pcr_bank": policy.bank if policy else Enrollment(Mode.DERIVED).bank,
        "pcrs": policy.pcrs if policy else (),
        "pcr_values": dict(policy.values) if policy else {},
        "fence": bool(policy and policy.fence),
    }


def _new_token(
    tpm: Tpm,
    recovery: KeyRecovery,
    binding: _Binding,
    *,
    mode: Mode,
    uuid: str,
    key: Secret,
    digest: int,
    pin: Secret | None,
    extra: dict[str, Any],
) -> Token:
    """A new token that yields `key` (derived: `key` wrapped under a fresh TPM-derived KEK)."""
    fields = {**_token_fields(binding, digest=digest, key_size=len(key)), "extra": extra}
    if mode is Mode.DERIVED:
        salt = secrets.token_bytes(32)
        with _derived_key(recovery, binding, uuid, salt, derive.KEK_SIZE) as kek:
            return DerivedToken(**fields, salt=salt, wrapped_key=derive.wrap(kek, key))
    blob = tpm_keys.seal(tpm, key, binding.srk, binding.digest, pin)
    return SealedToken(**fields, pin=pin is not None, blob=blob)


def _verifiable_now(tpm: Tpm, token: Token, enrollment: Enrollment) -> bool:
    """Whether the new token can be tested by recovering the key now: not when it is bound to given
    (future) PCR values, nor when it is fenced and the fence is already up."""
    if enrollment.pcr_values:
        return False
    return not (token.fence and tpm_pcr.fence_is_up(tpm))


def _add_verified(device: Device, tpm: Tpm, token: Token, key: Secret, pin: Secret | None, *, verify: bool) -> int:
    """Write the token; when `verify`, prove it recovers `key` from a fresh read of the header, or take it
    back. An unverifiable token is kept (it is an additional way in, not a replacement) and says so."""
    token_id = _write_token(device, token)
    if not verify:
        return token_id
    pins: PinSource | None = None if pin is None else (lambda _token_id: Secret.copy_of(pin.view()))
    try:
        with open_device(device.path) as fresh, KeyRecovery(tpm, pins) as recovery:
            recovered = recover_verified(fresh, recovery, token_id=token_id)
            with recovered.key:
                if not recovered.key.equals(key):
                    die("the new binding recovered a different key", code=ExitCode.BUG)
    except BaseException:
        _remove_token(device, token_id)
        raise
    return token_id


def _bind(
    device: Device,
    tpm: Tpm,
    key: Secret,
    enrollment: Enrollment,
    pin: Secret | None,
    extra: dict[str, Any] | None = None,
) -> tuple[Token, int, bool]:
    """Create, write and (when possible) verify a token for `key`: (token, id, verified). `extra`: unknown
    fields of the token this one replaces, kept as the contract says."""
    binding = _prepare(tpm, enrollment)
    with KeyRecovery(tpm) as recovery:
        token = _new_token(
            tpm,
            recovery,
            binding,
            mode=enrollment.mode,
            uuid=device.uuid,
            key=key,
            digest=device.default_digest(),
            pin=pin,
            extra=dict(extra or {}),
        )
    verify = _verifiable_now(tpm, token, enrollment)
    return token, _add_verified(device, tpm, token, key, pin, verify=verify), verify


def _unverified_note(enrollment: Enrollment) -> str:
    if enrollment.pcr_values:
        return "not verified: it is bound to the given PCR values, not the current ones"
    return f"not verified: the fence is up (PCR {FENCE_PCR}); it will be usable before the fence at the next boot"


# ---- commands ---------------------------------------------------------------------------------------


def format_volume(
    tcti: str, settings: FormatSettings, confirm: Confirm, recovery_passphrase: PassphraseSource | None
) -> Report:
    path = str(settings.device)
    with open_device(path, load=False, write=True) as device:
        if (
            header_facts(path) is not None
            and not settings.yes
            and not confirm(f"{path} already holds a LUKS header. Overwrite it, destroying all data on it?")
        ):
            die("not formatting: the existing header was kept", code=ExitCode.REFUSED, cause=Cause.REFUSED)
        if settings.recovery is not Recovery.NONE:
            _check_pbkdf(device, settings.pbkdf)
        else:
            progress("no recovery keyslot: clearing or losing the TPM will make the data unrecoverable")
        uuid = settings.uuid or str(uuid_module.uuid4())
        passphrase = recovery_passphrase() if settings.recovery is Recovery.PASSPHRASE and recovery_passphrase else None
        recovery_key = generate_recovery_key() if settings.recovery is Recovery.GENERATE else None
        with Tpm(tcti) as tpm:
            binding = _prepare(tpm, settings.binding)
            progress(f"deriving the volume key for {uuid} from the TPM")
            salt = secrets.token_bytes(32)
            with KeyRecovery(tpm) as recovery:  # closed (its objects flushed) before the verification needs room
                key = _derived_key(recovery, binding, uuid, salt, settings.key_size)
            try:
                cipher, _, mode = settings.cipher.partition("-")
                progress(f"writing a LUKS2 header ({settings.cipher}, {8 * len(key)}-bit key) to {path}")
                try:
                    device.format_luks2(
                        cipher=cipher,
                        cipher_mode=mode,
                        uuid=uuid,
                        volume_key=key,
                        sector_size=settings.sector_size,
                        pbkdf=_DIGEST_PBKDF,
                        label=settings.label,
                    )
                except CryptsetupError as error:
                    if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
                        # libcryptsetup tries the cipher (kernel crypto API, then dm-crypt) before writing
                        said = f" ({error.log[-1]})" if error.log else ""
                        die(
                            f"--cipher {settings.cipher}: libcryptsetup cannot use this cipher here{said}",
                            hint="e.g. aes-xts-plain64 (the default)",
                            code=ExitCode.USAGE,
                            cause=Cause.USAGE,
                        )
                    raise write_error(device, error) from None
                # The recovery keyslot first: an interruption after it leaves a volume the recovery key opens.
                keyslot = None
                secret = passphrase or recovery_key
                if secret is not None:
                    progress("adding the recovery keyslot")
                    device.set_pbkdf(settings.pbkdf)
                    keyslot = device.keyslot_add_by_volume_key(key, secret)
                token = DerivedToken(
                    **_token_fields(binding, digest=device.default_digest(), key_size=len(key)),
                    salt=salt,
                    wrapped_key=None,
                )
                verify = not token.fence or not tpm_pcr.fence_is_up(tpm)
                token_id = _add_verified(device, tpm, token, key, None, verify=verify)
            finally:
                key.close()
                if passphrase is not None:
                    passphrase.close()
            warnings = list(tpm.warnings)
    data = {
        "device": path,
        "uuid": uuid,
        "token": token_id,
        "recovery_keyslot": keyslot,
        "cipher": settings.cipher,
        "key_size": settings.key_size,
        "fence": token.fence,
        "pcrs": list(token.pcrs),
    }
    line = f"{path}: formatted LUKS2 {uuid}, TPM-derived key in token {token_id}" + (
        f", recovery keyslot {keyslot}" if keyslot is not None else ", NO recovery keyslot"
    )
    return Report(data, [line], recovery_key=recovery_key, warnings=warnings)


def _check_pbkdf(device: Device, pbkdf: Pbkdf) -> None:
    """Let libcryptsetup judge the recovery keyslot's PBKDF before anything is written."""
    try:
        device.set_pbkdf(pbkdf)
    except CryptsetupError as error:
        said = error.log[-1] if error.log else str(error)
        die(
            f"--pbkdf {pbkdf.type}"
            + (f" --pbkdf-force-iterations {pbkdf.iterations}" if pbkdf.iterations else "")
            + f": {said}",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )


def volume_key_with_passphrase(device: Device, passphrase: PassphraseSource) -> Secret:
    with passphrase() as secret:
        try:
            _, key = device.volume_key_get(secret)
        except CryptsetupError as error:
            if error.errno == 1:  # EPERM
                die(
                    "no keyslot opens with that passphrase or key file",
                    code=ExitCode.UNLOCK_FAILED,
                    cause=Cause.WRONG_KEY,
                )
            raise
    return key


def enroll(
    tcti: str, device_path: Path, enrollment: Enrollment, passphrase: PassphraseSource, pin: NewPinSource
) -> Report:
    path = str(device_path)
    with open_device(path, write=True) as device:
        key = volume_key_with_passphrase(device, passphrase)
        pin_secret = pin() if enrollment.pin else None
        try:
            with key, Tpm(tcti) as tpm:
                token, token_id, verified = _bind(device, tpm, key, enrollment, pin_secret)
                warnings = list(tpm.warnings)
        finally:
            if pin_secret is not None:
                pin_secret.close()
    checked = "verified by recovering the key" if verified else _unverified_note(enrollment)
    return Report(
        {
            "device": path,
            "token": token_id,
            "mode": str(token.mode),
            "pcrs": list(token.pcrs),
            "fence": token.fence,
            "verified": verified,
        },
        [f"{path}: token {token_id} ({token.describe()}) enrolled, {checked}"],
        warnings=warnings,
    )


def reseal(
    tcti: str,
    device_path: Path,
    token_id: int | None,
    pcrs: tuple[int, ...] | None,
    values: dict[int, bytes],
    bank_name: str | None,
    force: bool,
    passphrase: PassphraseSource,
    pins: PinSource,
    new_pin: NewPinSource,
) -> Report:
    """A new token for new PCR values, verified, and only then the old one removed.

    What is not given is the old token's: its mode, bank, PCRs (plus those given values for), PIN, fence."""
    path = str(device_path)
    with open_device(path, write=True) as device:
        bound = [
            e
            for e in luks_tpm_tokens(device)
            if e.token is not None and (e.token.pcrs or e.token.fence or e.token.mode is Mode.SEALED)
        ]
        if token_id is not None:
            bound = [e for e in bound if e.token_id == token_id]
        if not bound:
            which = (
                f"--token-id {token_id}: token {token_id} of {path} is not"
                if token_id is not None
                else f"{path} has no luks-tpm token"
            )
            die(
                f"{which} bound to PCRs or the fence: nothing to reseal",
                hint="`luks-tpm status` lists the tokens",
                code=ExitCode.USAGE,
                cause=Cause.USAGE,
            )
        old_id, old = bound[0].token_id, bound[0].token
        assert old is not None
        bank = old.pcr_bank if bank_name is None else type(old.pcr_bank)(bank_name)
        if any(len(value) != bank.size for value in values.values()):
            die(f"--pcr-value: the {bank} bank needs {bank.size}-byte values", code=ExitCode.USAGE, cause=Cause.USAGE)
        chosen = tuple(sorted(set(old.pcrs if pcrs is None else pcrs) | set(values)))
        settings = Enrollment(old.mode, bank, chosen, values, old.pin, old.fence)
        with Tpm(tcti) as tpm, KeyRecovery(tpm, pins) as recovery:
            found = _key_for_reseal(device, recovery, passphrase)
            with found.key if found else volume_key_with_passphrase(device, passphrase) as key:
                pin_secret = _pin_for_reseal(recovery, old_id, settings.pin, new_pin)
                try:
                    token, new_id, verified = _bind(device, tpm, key, settings, pin_secret, old.extra)
                finally:
                    if pin_secret is not None:
                        pin_secret.close()
            warnings = list(tpm.warnings)
        if not verified and not force:
            return Report(
                {
                    "device": path,
                    "removed": None,
                    "token": new_id,
                    "kept": old_id,
                    "verified": False,
                    "pcrs": list(token.pcrs),
                },
                [
                    f"{path}: token {new_id} ({token.describe()}) added; {_unverified_note(settings)}; "
                    f"token {old_id} kept (remove it once the new one works, or pass --force)"
                ],
                warnings=warnings,
            )
        _remove_token(device, old_id)
    return Report(
        {
            "device": path,
            "removed": old_id,
            "token": new_id,
            "kept": None,
            "verified": verified,
            "pcrs": list(token.pcrs),
        },
        [f"{path}: token {old_id} replaced by token {new_id} ({token.describe()})"],
        warnings=warnings,
    )


def _key_for_reseal(device: Device, recovery: KeyRecovery, passphrase: PassphraseSource) -> Recovered | None:
    try:
        found = recover_verified(device, recovery)
    except LuksTpmError as error:
        log.warning("%s; using the passphrase or recovery key instead", error.message)
        return None
    progress(f"got the volume key from token {found.token_id}")
    return found


def _pin_for_reseal(recovery: KeyRecovery, old_id: int, with_pin: bool, new_pin: NewPinSource) -> Secret | None:
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


def ways_in(device: Device, tcti: str | None, *, except_token: int | None = None) -> tuple[list[int], list[int]]:
    """(keyslots, luks-tpm tokens) that open the volume, or at least are not known to be dead."""
    keyslots = device.keyslots()
    entries = [e for e in luks_tpm_tokens(device) if e.token_id != except_token]
    alive = []
    tpm = None
    with contextlib.suppress(LuksTpmError):  # no TPM now: tokens cannot be tried, so none is known to be dead
        tpm = Tpm(tcti) if tcti is not None and any(e.token for e in entries) else None
    try:
        for entry in entries:
            if entry.token is None:
                continue
            if tpm is None or _token_alive(device, tpm, entry.token_id):
                alive.append(entry.token_id)
    finally:
        if tpm is not None:
            tpm.close()
    return keyslots, alive


def _token_alive(device: Device, tpm: Tpm, token_id: int) -> bool:
    try:
        with KeyRecovery(tpm) as recovery:
            recover_verified(device, recovery, token_id=token_id).key.close()
    except LuksTpmError as error:
        failures = getattr(error, "failures", [])
        cause = failures[0].error.cause if failures else error.cause
        return cause not in DEAD_CAUSES
    return True


def remove(tcti: str, device_path: Path, token_id: int, force: bool) -> Report:
    path = str(device_path)
    with open_device(path, write=True) as device:
        if token_id not in [entry.token_id for entry in luks_tpm_tokens(device)]:
            die(
                f"{path} has no luks-tpm token {token_id}",
                hint="`luks-tpm status` lists the tokens",
                code=ExitCode.USAGE,
                cause=Cause.USAGE,
            )
        keyslots, alive = ways_in(device, tcti, except_token=token_id)
        if not keyslots and not alive and not force:
            die(
                f"token {token_id} is the last way into {path}: no keyslot, and no other token that can still "
                "recover the key",
                hint="add a passphrase first (`cryptsetup luksAddKey`), or pass --force to lose the data",
                code=ExitCode.REFUSED,
                cause=Cause.REFUSED,
            )
        _remove_token(device, token_id)
    return Report({"device": path, "removed": token_id}, [f"{path}: token {token_id} removed"])
