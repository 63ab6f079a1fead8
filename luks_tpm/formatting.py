"""`luks-tpm format`: a new LUKS2 volume whose volume key is derived by the TPM (docs/derivation.md).

The header holds no key material for this path: the key is recomputed from the TPM and a salt in the
token. The TPM's part comes first, the new token's recovery of the key included, so a TPM that fails
changes nothing on the device; then the header, the recovery keyslot before the token, so an
interruption after it leaves a volume the recovery key opens.
"""

from __future__ import annotations

import dataclasses
import errno
import secrets
import uuid as uuid_module

from .cryptsetup import CryptsetupError, Device, header_facts, open_device, write_error
from .enrollment import Binding, prepare, write_token
from .errors import Cause, ExitCode, die
from .output import Report, progress
from .prompt import Confirm, PassphraseSource, generate_recovery_key
from .secret import Secret
from .settings import DIGEST_PBKDF, FormatSettings, Pbkdf, Recovery
from .tokenformat import DerivedToken, parse, to_json
from .tpm import Tpm
from .tpm import pcr as tpm_pcr
from .tpm.keyuse import KeyUse
from .unlock import Recovery as KeyRecovery

# Below this, libcryptsetup grows an image file to hold the header (16 MiB with the default metadata
# and keyslots areas) and leaves no data area: refuse instead of changing the file's size.
MINIMUM_SIZE = 17 << 20


@dataclasses.dataclass(frozen=True)
class Formatted:
    device: str
    uuid: str
    token: int
    recovery_keyslot: int | None
    cipher: str
    key_size: int
    fence: bool
    pcrs: tuple[int, ...]

    def lines(self) -> list[str]:
        keyslot = (
            "NO recovery keyslot" if self.recovery_keyslot is None else f"recovery keyslot {self.recovery_keyslot}"
        )
        return [f"{self.device}: formatted LUKS2 {self.uuid}, TPM-derived key in token {self.token}, {keyslot}"]


def format_volume(
    tcti: str, settings: FormatSettings, confirm: Confirm | None, recovery_passphrase: PassphraseSource | None
) -> Report:
    """`confirm` None: the operator said --yes."""
    path = str(settings.device)
    with open_device(path, load=False, write=True) as device:
        _check_device(device, confirm)
        if settings.recovery is not Recovery.NONE:
            _check_pbkdf(device, settings.pbkdf)
        else:
            progress("no recovery keyslot: clearing or losing the TPM will make the data unrecoverable")
        uuid = settings.uuid or str(uuid_module.uuid4())
        passphrase = recovery_passphrase() if settings.recovery is Recovery.PASSPHRASE and recovery_passphrase else None
        recovery_key = generate_recovery_key() if settings.recovery is Recovery.GENERATE else None
        try:
            with Tpm(tcti) as tpm:
                token_id, keyslot, token = _format(device, tpm, settings, uuid, passphrase or recovery_key)
                warnings = tuple(tpm.warnings)
        except BaseException:
            if recovery_key is not None:
                recovery_key.close()
            raise
        finally:
            if passphrase is not None:
                passphrase.close()
    result = Formatted(path, uuid, token_id, keyslot, settings.cipher, settings.key_size, token.fence, token.pcrs)
    return Report(result, warnings, recovery_key=recovery_key)


def _check_device(device: Device, confirm: Confirm | None) -> None:
    path = device.path
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
    if size < MINIMUM_SIZE:
        die(
            f"{path} is {size} bytes: too small for a LUKS2 header and a data area (at least {MINIMUM_SIZE >> 20} MiB)",
            hint="give a larger device or image",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    question = f"{path} already holds a LUKS header. Overwrite it, destroying all data on it?"
    if header_facts(path) is not None and confirm is not None and not confirm([], question):
        die("not formatting: the existing header was kept", code=ExitCode.REFUSED, cause=Cause.REFUSED)


def _format(
    device: Device, tpm: Tpm, settings: FormatSettings, uuid: str, recovery: Secret | None
) -> tuple[int, int | None, DerivedToken]:
    """(token id, recovery keyslot, token) of the new volume. Every TPM command comes before the first
    write: a TPM that fails or goes away leaves the device as it was."""
    binding = prepare(tpm, settings.binding)
    progress(f"deriving the volume key for {uuid} from the TPM")
    salt = secrets.token_bytes(32)
    with KeyUse(tpm) as keys:  # closed (its objects flushed) before the check needs room
        key = binding.derived_key(keys, uuid, salt, settings.key_size)
    with key:
        token = _token(binding, salt, len(key))
        if not token.fence or not tpm_pcr.fence_is_up(tpm):
            _check_recovers(tpm, uuid, token, key)
        _write_header(device, settings, uuid, key)
        keyslot = None
        if recovery is not None:
            progress("adding the recovery keyslot")
            device.set_pbkdf(settings.pbkdf)
            keyslot = device.keyslot_add_by_volume_key(key, recovery)
        if device.default_digest() != token.digest:  # pragma: no cover - libcryptsetup numbers digests from 0
            die("the new header's digest is not the one the token names", code=ExitCode.BUG)
        token_id = write_token(device, token)
        written = device.token_json_get(token_id)
        if written is None or parse(written, token_id) != token:  # pragma: no cover - read back as written
            die("the token read back differs from the one written", code=ExitCode.BUG)
        return token_id, keyslot, token


def _check_recovers(tpm: Tpm, uuid: str, token: DerivedToken, key: Secret) -> None:
    """The token, as it will be read back (its JSON parsed), recovers `key` from the TPM."""
    with KeyRecovery(tpm) as recovery, recovery.key_from_token(uuid, 0, parse(to_json(token), 0)) as again:
        if not again.equals(key):
            die("the new binding recovered a different key", code=ExitCode.BUG)


def _token(binding: Binding, salt: bytes, key_size: int) -> DerivedToken:
    # A new header's only digest, for segment 0, is digest 0.
    return DerivedToken(**binding.fields(digest=0, key_size=key_size), salt=salt, wrapped_key=None)


def _write_header(device: Device, settings: FormatSettings, uuid: str, key: Secret) -> None:
    cipher, _, mode = settings.cipher.partition("-")
    progress(f"writing a LUKS2 header ({settings.cipher}, {8 * len(key)}-bit key) to {device.path}")
    try:
        device.format_luks2(
            cipher=cipher,
            cipher_mode=mode,
            uuid=uuid,
            volume_key=key,
            sector_size=settings.sector_size,
            pbkdf=DIGEST_PBKDF,
            label=settings.label,
        )
    except CryptsetupError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
            raise write_error(device, error) from None
        # libcryptsetup tries the cipher (kernel crypto API, then dm-crypt) before writing anything
        die(
            f"--cipher {settings.cipher}: this cipher cannot be used here",
            hint="e.g. aes-xts-plain64 (the default); /proc/crypto lists the kernel's ciphers",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )


def _check_pbkdf(device: Device, pbkdf: Pbkdf) -> None:
    """Let libcryptsetup judge the recovery keyslot's PBKDF before anything is written."""
    try:
        device.set_pbkdf(pbkdf)
    except CryptsetupError as error:
        said = error.log[-1] if error.log else str(error)
        iterations = f" --pbkdf-force-iterations {pbkdf.iterations}" if pbkdf.iterations else ""
        die(f"--pbkdf {pbkdf.type}{iterations}: {said}", code=ExitCode.USAGE, cause=Cause.USAGE)
