"""Commands that make and remove bindings: format, enroll, reseal, remove, persist-srk."""

from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

import click

from ..model import Mode
from ..output import Report
from ..prompt import pin_source
from ..settings import BOOT_CHAIN_PCRS, DEFAULT_CIPHER, Enrollment, FormatSettings, Pbkdf, Recovery, ResealSettings
from . import command, options
from .params import (
    approver_option,
    bank,
    bank_option,
    boot_chain_option,
    device_argument,
    fence_option,
    file_path,
    key_file_check,
    new_pin_source,
    owner_auth,
    owner_auth_option,
    passphrase_source,
    pcr_list,
    pcr_value_option,
    pcr_values,
    pcrs_option,
    pin_file_check,
    pin_file_option,
    srk_option,
    token_option,
    unlock_key_option,
    yes_option,
    yes_or_no,
)
from .params import (
    label as check_label,
)


@dataclasses.dataclass(frozen=True)
class _Binding:
    """The binding options several commands share, as given."""

    pcrs: str | None
    bank: str | None
    values: tuple[str, ...]
    fence: bool
    transient_srk: bool
    boot_chain: bool
    approver: Path

    def enrollment(self, mode: Mode, *, pin: bool) -> Enrollment:
        chosen = bank(self.bank)
        given = pcr_values(self.values, chosen)
        listed = pcr_list(self.pcrs) if self.pcrs is not None else BOOT_CHAIN_PCRS if self.boot_chain else ()
        bound = tuple(sorted(set(listed) | set(given)))
        approver = self.approver if self.boot_chain else None
        return Enrollment(mode, chosen, bound, given, pin, self.fence, not self.transient_srk, approver)


@command("format")
@device_argument
@click.option("--cipher", default=DEFAULT_CIPHER, show_default=True)
@click.option(
    "--key-size", type=click.Choice(["256", "512"]), default="512", show_default=True, help="Volume key size in bits."
)
@click.option("--sector-size", type=click.Choice(["512", "1024", "2048", "4096"]), default="512", show_default=True)
@click.option("--label", callback=check_label, help="LUKS2 label (at most 47 printable ASCII bytes).")
@click.option("--uuid", "volume_uuid", type=click.UUID, help="UUID of the new volume (default: random).")
@click.option(
    "--passphrase-file",
    type=file_path,
    callback=key_file_check,
    help="Recovery passphrase from this file (exact bytes) instead of a generated recovery key.",
)
@click.option("--passphrase", "ask_passphrase", is_flag=True, help="Ask for a recovery passphrase instead.")
@click.option(
    "--no-recovery", is_flag=True, help="No recovery keyslot: clearing or losing the TPM then destroys the data."
)
@click.option(
    "--pbkdf",
    type=click.Choice(["argon2id", "argon2i", "pbkdf2"]),
    default="argon2id",
    show_default=True,
    help="PBKDF of the recovery keyslot.",
)
@click.option(
    "--pbkdf-force-iterations",
    type=click.IntRange(1, 2**32 - 1),
    help="Fixed PBKDF cost instead of benchmarking (like cryptsetup).",
)
@pcrs_option
@bank_option
@fence_option
@boot_chain_option
@approver_option
@srk_option
@yes_option
def format_command(
    device: Path,
    cipher: str,
    key_size: str,
    sector_size: str,
    label: str | None,
    volume_uuid: uuid.UUID | None,
    passphrase_file: Path | None,
    ask_passphrase: bool,
    no_recovery: bool,
    pbkdf: str,
    pbkdf_force_iterations: int | None,
    pcrs: str | None,
    pcr_bank: str | None,
    fence: bool,
    boot_chain: bool,
    approver_file: Path,
    transient_srk: bool,
    yes: bool,
) -> Report:
    """Create a LUKS2 volume on DEVICE whose volume key is derived by the TPM.

    A recovery key is generated and printed once (or use --passphrase-file,
    --passphrase, or --no-recovery). DEVICE may be a block device or an image file.
    With --pcrs and --fence the derived key is bound to those PCRs and the fence.
    """
    from ..formatting import format_volume

    if sum([passphrase_file is not None, ask_passphrase, no_recovery]) > 1:
        raise click.UsageError("choose one of --passphrase-file, --passphrase and --no-recovery")
    if not re.fullmatch(r"[a-z0-9]+-[a-z0-9]+(-[a-z0-9]+)?", cipher):
        raise click.BadParameter("CIPHER-MODE, e.g. aes-xts-plain64", param_hint="--cipher")
    if no_recovery:
        recovery = Recovery.NONE
    else:
        recovery = Recovery.PASSPHRASE if passphrase_file or ask_passphrase else Recovery.GENERATE
    settings = FormatSettings(
        device=device,
        recovery=recovery,
        pbkdf=Pbkdf(pbkdf, iterations=pbkdf_force_iterations),
        cipher=cipher,
        key_size=int(key_size) // 8,
        sector_size=int(sector_size),
        label=label,
        uuid=str(volume_uuid) if volume_uuid else None,
        binding=_Binding(pcrs, pcr_bank, (), fence, transient_srk, boot_chain, approver_file).enrollment(
            Mode.DERIVED, pin=False
        ),
    )
    source = passphrase_source(passphrase_file, "Recovery passphrase: ", "--passphrase-file", twice=True)
    return format_volume(options().tcti, settings, None if yes else yes_or_no(options().json), source)


@command()
@device_argument
@click.option(
    "--mode",
    type=click.Choice([m.value for m in Mode]),
    required=True,
    help="derived: the TPM recomputes a key-encryption key; sealed: the key is sealed in the TPM.",
)
@pcrs_option
@bank_option
@pcr_value_option
@fence_option
@boot_chain_option
@approver_option
@click.option("--pin", is_flag=True, help="Sealed only: also require a PIN (asked twice; DA-protected).")
@pin_file_option
@srk_option
@owner_auth_option
@click.option(
    "--for-tpm",
    "target_file",
    type=file_path,
    help="Sealed only: seal for the TPM of another machine, from the file `luks-tpm --json srk-public` "
    "wrote there (every bound PCR needs --pcr-value); no TPM is used here.",
)
@unlock_key_option
def enroll(
    device: Path,
    mode: str,
    pcrs: str | None,
    pcr_bank: str | None,
    pcr_value: tuple[str, ...],
    fence: bool,
    boot_chain: bool,
    approver_file: Path,
    pin: bool,
    pin_file: Path | None,
    transient_srk: bool,
    owner_auth_file: Path | None,
    target_file: Path | None,
    unlock_key_file: Path | None,
) -> Report:
    """Bind an existing LUKS2 volume to the TPM (other keyslots and tokens are kept).

    \b
    With --for-tpm, bind it to another machine's TPM instead (an image build host
    preparing disks): the key is sealed in TPM2_Import's format to that TPM's
    import parent, and that TPM alone can load it (docs/sealing.md)."""
    chosen = Mode(mode)
    with_pin = pin or pin_file is not None
    if chosen is Mode.DERIVED and with_pin:
        raise click.UsageError(
            "--pin and --pin-file apply to --mode sealed: a derived key's PIN would protect "
            "nothing (the TPM re-creates the key without it)"
        )
    if chosen is Mode.DERIVED and owner_auth_file is not None:
        raise click.UsageError(
            "--owner-auth-file applies to --mode sealed: a derived binding re-creates its key in the owner "
            "hierarchy at every unlock, so it needs that hierarchy's authorization to be empty"
        )
    if target_file is not None and (chosen is Mode.DERIVED or boot_chain):
        raise click.UsageError(
            "--for-tpm makes sealed tokens bound to given PCR values: a derived key or approved boot states "
            "need the target TPM itself (enroll there)"
        )
    given = _Binding(pcrs, pcr_bank, pcr_value, fence, transient_srk, boot_chain, approver_file)
    enrollment = given.enrollment(chosen, pin=with_pin)
    passphrase = passphrase_source(unlock_key_file, f"Passphrase or recovery key for {device}: ", "--unlock-key-file")
    new_pin = new_pin_source(pin_file, required=True, option="--pin-file")
    if target_file is not None:
        from ..provisioning import enroll_for

        return enroll_for(target_file, device, enrollment, passphrase, new_pin)
    from ..enrollment import enroll as run

    return run(options().tcti, device, enrollment, passphrase, new_pin, owner_auth(owner_auth_file))


@command()
@device_argument
@token_option
@pcrs_option
@bank_option
@click.option("--pcr-value", multiple=True, metavar="INDEX=HEX", help="Bind to this value (repeatable).")
@pin_file_option
@click.option(
    "--new-pin-file",
    type=file_path,
    callback=pin_file_check,
    help="The new binding's PIN (default: the old PIN, once verified).",
)
@click.option("--force", is_flag=True, help="Replace the old token even if the new one cannot be verified now.")
@owner_auth_option
@unlock_key_option
def reseal(
    device: Path,
    token_id: int | None,
    pcrs: str | None,
    pcr_bank: str | None,
    pcr_value: tuple[str, ...],
    pin_file: Path | None,
    new_pin_file: Path | None,
    force: bool,
    owner_auth_file: Path | None,
    unlock_key_file: Path | None,
) -> Report:
    """Re-bind a PCR-bound token to new PCR values; the old token is removed only after the new one is
    verified (with given --pcr-value values it cannot be: then both are kept, unless --force)."""
    from ..reseal import reseal as run

    settings = ResealSettings(
        token_id=token_id,
        pcrs=pcr_list(pcrs) if pcrs is not None else None,
        pcr_values=pcr_values(pcr_value, None),
        bank=bank(pcr_bank) if pcr_bank else None,
        force=force,
    )
    passphrase = passphrase_source(unlock_key_file, f"Passphrase or recovery key for {device}: ", "--unlock-key-file")
    new_pin = new_pin_source(new_pin_file, required=False, option="--new-pin-file")
    return run(options().tcti, device, settings, passphrase, pin_source(pin_file), new_pin, owner_auth(owner_auth_file))


@command()
@device_argument
@click.option("--token-id", type=click.IntRange(0, 31), required=True)
@click.option("--force", is_flag=True, help="Remove it even if it is the last way into the volume.")
def remove(device: Path, token_id: int, force: bool) -> Report:
    """Remove a luks-tpm token; refuses to remove the last way into the volume unless --force.

    Ways in are keyslots and tokens that can still recover the key (or are not known to be dead)."""
    from ..enrollment import remove as run

    return run(options().tcti, device, token_id, force)


@command("persist-srk")
@owner_auth_option
def persist_srk(owner_auth_file: Path | None) -> Report:
    """Store the standard SRK at 0x81000001 so later commands need not re-create it.

    format and enroll do this by default when the handle is free. Bindings record
    which SRK they use; a binding made with the persistent SRK keeps working if
    it is evicted (the SRK is re-created from its template, with a warning).
    Refuses (exit 7) when another key holds 0x81000001. With an owner
    authorization set, give it here once: sealed bindings under the persistent
    SRK need it no more."""
    from ..enrollment import persist_srk as run

    return run(options().tcti, owner_auth(owner_auth_file))


@command("srk-public")
def srk_public() -> Report:
    """Show this TPM's identity for provisioning; with --json, the provisioning file.

    \b
    `luks-tpm --json srk-public > target.json` on the target machine; then on an
    image build host `luks-tpm enroll DISK --mode sealed --for-tpm target.json`
    (with the target's PCR values) seals the disk's key for this TPM alone. The
    file holds public keys only: the standard SRK, the import parent blobs are
    wrapped to, and the endorsement key's name (docs/sealing.md)."""
    from ..provisioning import export

    return export(options().tcti)


COMMANDS = (format_command, enroll, reseal, remove, persist_srk, srk_public)
