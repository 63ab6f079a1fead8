"""Commands that destroy keys on purpose: wipe (the TPM owner hierarchy) and erase (single volumes)."""

from __future__ import annotations

from pathlib import Path

import click

from ..output import Report
from . import command, options
from .params import file_path, secret_file_check, typed_yes, yes_option

# The lockout authorization: at most 64 bytes (an empty file is the empty authorization: allowed).
_lockout_auth_check = secret_file_check(64, allow_empty=True)


@command()
@click.argument("devices", nargs=-1, type=click.Path(path_type=Path), metavar="[DEVICE...]")
@click.option(
    "--lockout-auth-file",
    type=file_path,
    callback=_lockout_auth_check,
    help="The TPM's lockout authorization (exact bytes: a trailing newline counts; - for stdin). "
    "Default: empty, as TPMs ship.",
)
@click.option(
    "--crypttab",
    "crypttab_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The crypttab whose x-luks-tpm entries are listed (default: /etc/crypttab, when it exists).",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be destroyed; clear nothing.")
@yes_option
def wipe(
    devices: tuple[Path, ...], lockout_auth_file: Path | None, crypttab_path: Path | None, dry_run: bool, yes: bool
) -> Report:
    """Clear the TPM owner hierarchy (TPM2_Clear): every key bound to it dies.

    \b
    First lists what dies: the volumes it knows (DEVICEs, crypttab entries marked
    x-luks-tpm, block devices with a luks-tpm token), each token's fate and
    whether a keyslot keeps the volume openable; the persistent objects and owner
    NV indices (other software's keys too). Asks for YES unless --yes. Then clears
    with the lockout authorization and checks that every listed token now fails
    as destroyed. Exit 0 only when all do, 9 when some check fails.
    Keyslots stay: recovery keys and passphrases still open wiped volumes."""
    from ..wipe import wipe as run

    return run(
        options().tcti,
        devices,
        crypttab_path=crypttab_path,
        lockout_auth_file=lockout_auth_file,
        dry_run=dry_run,
        confirm=None if yes else typed_yes(options().json),
    )


@command()
@click.argument("devices", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="DEVICE...")
@click.option("--dry-run", is_flag=True, help="Only list what would be destroyed; change nothing.")
@yes_option
def erase(devices: tuple[Path, ...], dry_run: bool, yes: bool) -> Report:
    """Crypto-erase volumes: destroy every keyslot and every token (luks-tpm's and other tools').

    \b
    Afterwards no passphrase, recovery key or TPM opens them, which is checked by
    reading the header back (exit 0; 9 if anything is left). The TPM is kept for
    the machine's other volumes. The data area is not overwritten: without the key
    it is noise. Interrupted, it can be run again and finishes. Asks for YES
    unless --yes."""
    from ..erase import erase as run

    return run(devices, dry_run=dry_run, confirm=None if yes else typed_yes(options().json))


COMMANDS = (wipe, erase)
