"""Writing bindings: format a new volume, enroll, reseal and remove tokens.

Every write goes through libcryptsetup, every new token is read back and made to recover the key
before success is reported, and nothing removes the last way into a volume unless forced.
"""

from __future__ import annotations

import os
import secrets
import uuid as uuid_module
from collections.abc import Callable
from pathlib import Path

from . import derive
from .cryptsetup import CryptsetupError, Device, Pbkdf, open_device
from .errors import ExitCode, LuksTpmError, die
from .output import Report, progress
from .prompt import generate_recovery_key
from .secret import Secret
from .settings import Enrollment, FormatSettings, Recovery
from .token import Mode, Token, utc_now
from .tpm import Bank, Tpm
from .unlock import KeyRecovery, PinSource, default_digest, luks_tpm_tokens, recover_verified

# The LUKS2 digest only has to stop a wrong key from opening the volume: the keys it checks are
# random 256/512-bit keys, so a cheap digest costs no security and saves ~100 ms on every unlock.
_DIGEST_PBKDF = Pbkdf("pbkdf2", iterations=1000)
_LUKS_MAGIC = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")

Confirm = Callable[[str], bool]
PassphraseSource = Callable[[], Secret]


def _write_error(device: Device, error: CryptsetupError) -> LuksTpmError:
    if error.errno in (30, 13, 1):  # EROFS, EACCES, EPERM
        return LuksTpmError(f"{device.path}: cannot write the LUKS header ({error.strerror})",
                            hint="is the device or image read-only?", code=ExitCode.DEVICE)
    return LuksTpmError(f"{device.path}: writing the LUKS header failed: {error}", code=ExitCode.DEVICE)


def _require_writable(path: str) -> None:
    if not os.access(path, os.W_OK):
        die(f"{path}: read-only; luks-tpm needs to write its token into the LUKS header",
            hint="run as root or make the device writable", code=ExitCode.DEVICE)


def _has_luks_header(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(6) in _LUKS_MAGIC
    except OSError as error:
        die(f"{path}: cannot open: {error.strerror}")


def _token_for(tpm: Tpm, recovery: KeyRecovery, *, mode: Mode, uuid: str, key: Secret, digest: int,
               enrollment: Enrollment, pin: Secret | None) -> Token:
    """A new token that yields `key` (derived: `key` wrapped under a fresh TPM-derived KEK)."""
    parent = tpm.parent()
    common = {"digest": digest, "key_size": len(key), "parent": parent, "created": utc_now(),
              "endorsement": tpm.endorsement_name()}
    if mode is Mode.DERIVED:
        salt = secrets.token_bytes(32)
        with recovery.derive(uuid, salt, derive.KEK_SIZE, parent, None) as kek:
            wrapped = derive.wrap(kek, key)
        return Token(mode=mode, pcr_bank=enrollment.bank, pcrs=(), policy=b"", pin=False, salt=salt,
                     wrapped_key=wrapped, **common)  # type: ignore[arg-type]
    values = tpm.pcr_values(enrollment.bank, enrollment.pcrs)
    values.update(enrollment.pcr_values)
    policy, digest_value = tpm.pcr_policy(enrollment.bank, values, pin=pin is not None)
    blob = tpm.seal(key, recovery.parent(parent, None), policy, digest_value, pin)
    return Token(mode=mode, pcr_bank=enrollment.bank, pcrs=policy.pcrs, policy=digest_value,
                 pin=pin is not None, blob=blob, pcr_values=values, **common)  # type: ignore[arg-type]


def _add_verified(device: Device, tpm: Tpm, token: Token, key: Secret, pins: PinSource | None,
                  *, expect_unseal: bool = True) -> int:
    """Write the token, prove it recovers `key` from a fresh read of the header, or take it back."""
    try:
        token_id = device.token_json_set(token.to_json())
    except CryptsetupError as error:
        raise _write_error(device, error) from None
    if not expect_unseal:
        return token_id
    try:
        with open_device(device.path) as fresh, KeyRecovery(tpm, pins) as recovery:
            _, _, recovered = recover_verified(fresh, recovery, token_id=token_id)
            with recovered:
                if not recovered.equals(key):
                    die("the new binding recovered a different key", code=ExitCode.BUG)
    except BaseException:
        device.token_remove(token_id)
        raise
    return token_id


def format_volume(tcti: str, settings: FormatSettings, confirm: Confirm,
                  recovery_passphrase: PassphraseSource | None) -> Report:
    path = str(settings.device)
    if not Path(path).exists():
        die(f"{path}: no such file or device", hint="create an image first, e.g. `truncate -s 1G disk.img`")
    _require_writable(path)
    if _has_luks_header(path) and not settings.yes and not confirm(
        f"{path} already holds a LUKS header. Overwrite it, destroying all data on it?"
    ):
        die("not formatting: the existing header was kept", code=ExitCode.REFUSED)
    if settings.recovery is Recovery.NONE:
        progress("no recovery keyslot: clearing or losing the TPM will make the data unrecoverable")
    uuid = settings.uuid or str(uuid_module.uuid4())
    passphrase = None
    if settings.recovery is Recovery.PASSPHRASE and recovery_passphrase is not None:
        passphrase = recovery_passphrase()
    recovery_key = generate_recovery_key() if settings.recovery is Recovery.GENERATE else None
    with Tpm(tcti) as tpm:
        progress(f"deriving the volume key for {uuid} from the TPM")
        with KeyRecovery(tpm) as recovery:
            parent = tpm.parent()
            salt = secrets.token_bytes(32)
            key = recovery.derive(uuid, salt, settings.key_size, parent, None)
            endorsement = tpm.endorsement_name()
        try:
            with open_device(path, load=False) as device:
                cipher, _, mode = settings.cipher.partition("-")
                progress(f"writing a LUKS2 header ({settings.cipher}, {8 * len(key)}-bit key) to {path}")
                try:
                    device.format_luks2(cipher=cipher, cipher_mode=mode, uuid=uuid, volume_key=key,
                                        sector_size=settings.sector_size, pbkdf=_DIGEST_PBKDF,
                                        label=settings.label)
                except CryptsetupError as error:
                    raise _write_error(device, error) from None
                token = Token(mode=Mode.DERIVED, digest=default_digest(device), key_size=len(key),
                              pcr_bank=settings.bank, pcrs=(), policy=b"", pin=False, parent=parent,
                              created=utc_now(), salt=salt, wrapped_key=None, endorsement=endorsement)
                token_id = _add_verified(device, tpm, token, key, None)
                keyslot = None
                secret = passphrase or recovery_key
                if secret is not None:
                    progress("adding the recovery keyslot")
                    device.set_pbkdf(settings.pbkdf)
                    keyslot = device.keyslot_add_by_volume_key(key, secret)
        finally:
            key.close()
            if passphrase is not None:
                passphrase.close()
    data = {"device": path, "uuid": uuid, "token": token_id, "recovery_keyslot": keyslot,
            "cipher": settings.cipher, "key_size": settings.key_size}
    line = f"{path}: formatted LUKS2 {uuid}, TPM-derived key in token {token_id}" + (
        f", recovery keyslot {keyslot}" if keyslot is not None else ", NO recovery keyslot")
    return Report(data, [line], recovery_key=recovery_key)


def volume_key_with_passphrase(device: Device, passphrase: PassphraseSource) -> Secret:
    with passphrase() as secret:
        try:
            _, key = device.volume_key_get(secret)
        except CryptsetupError as error:
            if error.errno == 1:  # EPERM
                die("no keyslot opens with that passphrase or key file", code=ExitCode.UNLOCK_FAILED)
            raise
    return key


def enroll(tcti: str, device_path: Path, enrollment: Enrollment, passphrase: PassphraseSource,
           pin: Callable[[], Secret | None]) -> Report:
    path = str(device_path)
    with open_device(path) as device:
        _require_writable(path)
        key = volume_key_with_passphrase(device, passphrase)
        with key, Tpm(tcti) as tpm:
            pin_secret = pin() if enrollment.mode is Mode.SEALED else None
            token, token_id = _bind(device, tpm, key, enrollment, pin_secret)
    checked = "verified by recovering the key" if not enrollment.pcr_values else \
        "not test-unsealed: it is bound to the given PCR values, not the current ones"
    return Report({"device": path, "token": token_id, "mode": str(token.mode), "pcrs": list(token.pcrs),
                   "verified": not enrollment.pcr_values},
                  [f"{path}: token {token_id} ({token.describe()}) enrolled, {checked}"])


def _bind(device: Device, tpm: Tpm, key: Secret, enrollment: Enrollment,
          pin: Secret | None) -> tuple[Token, int]:
    """Create, write and verify a token for `key`; zeroes `pin`."""
    try:
        with KeyRecovery(tpm) as recovery:
            token = _token_for(tpm, recovery, mode=enrollment.mode, uuid=device.uuid or "", key=key,
                               digest=default_digest(device), enrollment=enrollment, pin=pin)
        return token, _add_verified(device, tpm, token, key, _pins_from(pin),
                                    expect_unseal=not enrollment.pcr_values)
    finally:
        if pin is not None:
            pin.close()


def _pins_from(pin: Secret | None) -> PinSource | None:
    if pin is None:
        return None
    return lambda _token_id: Secret.copy_of(pin.view())


def reseal(tcti: str, device_path: Path, token_id: int | None, pcrs: tuple[int, ...] | None, bank: Bank | None,
           values: dict[int, bytes], passphrase: PassphraseSource, pins: PinSource) -> Report:
    """New sealed token for new PCR values, verified, and only then the old one removed.

    What is not given is the old token's: its bank, its PCRs (plus those given values for), its PIN."""
    path = str(device_path)
    with open_device(path) as device:
        _require_writable(path)
        sealed = [e for e in luks_tpm_tokens(device) if e.token and e.token.mode is Mode.SEALED]
        if token_id is not None:
            sealed = [e for e in sealed if e.token_id == token_id]
        if not sealed:
            die(f"{path} has no sealed luks-tpm token" + (f" with id {token_id}" if token_id is not None else ""),
                hint="`luks-tpm status` lists the tokens", code=ExitCode.USAGE)
        old = sealed[0]
        assert old.token is not None
        bank = bank or old.token.pcr_bank
        if any(len(value) != len(bank.hash(b"")) for value in values.values()):
            die(f"--pcr-value: the token's PCR bank is {bank}; give {len(bank.hash(b''))}-byte values "
                "or choose the bank with --pcr-bank", code=ExitCode.USAGE)
        chosen = tuple(sorted(set(old.token.pcrs if pcrs is None else pcrs) | set(values)))
        settings = Enrollment(Mode.SEALED, bank, chosen, values, old.token.pin)
        with Tpm(tcti) as tpm:
            key = _key_for_reseal(device, tpm, pins, passphrase)
            with key:
                pin_secret = pins(old.token_id) if settings.pin else None
                if settings.pin and pin_secret is None:  # never reseal a PIN binding into one without
                    die(f"token {old.token_id} has a PIN and none was given for the new binding",
                        hint="pass --pin-file or run on a terminal", code=ExitCode.UNLOCK_FAILED)
                token, new_id = _bind(device, tpm, key, settings, pin_secret)
        device.token_remove(old.token_id)
    return Report({"device": path, "removed": old.token_id, "token": new_id, "pcrs": list(token.pcrs)},
                  [f"{path}: token {old.token_id} replaced by token {new_id} ({token.describe()})"])


def _key_for_reseal(device: Device, tpm: Tpm, pins: PinSource, passphrase: PassphraseSource) -> Secret:
    try:
        with KeyRecovery(tpm, pins) as recovery:
            _, _, key = recover_verified(device, recovery)
            progress("got the volume key from a still-valid binding")
            return key
    except LuksTpmError as error:
        progress(f"{error.message}; using the passphrase or recovery key instead")
    return volume_key_with_passphrase(device, passphrase)


def remove(device_path: Path, token_id: int, force: bool) -> Report:
    path = str(device_path)
    with open_device(path) as device:
        _require_writable(path)
        entries = luks_tpm_tokens(device)
        if token_id not in [entry.token_id for entry in entries]:
            die(f"{path} has no luks-tpm token {token_id}", hint="`luks-tpm status` lists the tokens",
                code=ExitCode.USAGE)
        others = [entry for entry in entries if entry.token_id != token_id and entry.token is not None]
        if not others and not device.keyslots() and not force:
            die(f"token {token_id} is the last way into {path}: no other token and no keyslot",
                hint="add a passphrase first (`cryptsetup luksAddKey`), or pass --force to lose the data",
                code=ExitCode.REFUSED)
        try:
            device.token_remove(token_id)
        except CryptsetupError as error:
            raise _write_error(device, error) from None
    return Report({"device": path, "removed": token_id}, [f"{path}: token {token_id} removed"])
