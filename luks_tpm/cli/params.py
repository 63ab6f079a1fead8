"""Options several commands share, and the parsers of their values: the command line's one grammar.

Values are checked when the line is parsed, so a bad one is a usage error (exit 2) naming its option
before anything is done: PCR lists and values in ASCII digits only, key and PIN files that are regular
files of an acceptable size. Secrets are read (byte for byte into a Secret) only when needed.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ..errors import Cause, ExitCode, die
from ..model import PCR_COUNT, Bank
from ..output import printable
from ..prompt import MAX_KEY_FILE, MAX_PIN, Confirm, NewPinSource, PassphraseSource, ask, check_pin, read_file
from ..prompt import read_pin_file as _read_pin_file
from ..secret import Secret
from ..settings import DEFAULT_APPROVER, DEFAULT_BANK

_PCR = "[0-9]{1,2}"  # ASCII digits only: int() and \d would also take superscripts and other scripts


def pcr_list(text: str | None, option: str = "--pcrs") -> tuple[int, ...]:
    if text is None:
        return ()
    if not re.fullmatch(f"{_PCR}(,{_PCR})*", text) or any(int(i) >= PCR_COUNT for i in text.split(",")):
        raise click.BadParameter(
            f"a comma-separated list of PCR indices 0-{PCR_COUNT - 1}, e.g. 7 or 7,11", param_hint=option
        )
    return tuple(sorted({int(i) for i in text.split(",")}))


def pcr_values(items: tuple[str, ...], bank: Bank | None) -> dict[int, bytes]:
    """INDEX=HEX values; their size is checked against the bank once the bank is known (it may be the
    token's, for reseal)."""
    values = {}
    for item in items:
        match = re.fullmatch(f"({_PCR})=(?:0x)?([0-9a-fA-F]+)", item)
        if not match or int(match[1]) >= PCR_COUNT or len(match[2]) % 2:
            raise click.BadParameter(f"{item!r}: expected INDEX=HEX, e.g. 7=<64 hex digits>", param_hint="--pcr-value")
        value = bytes.fromhex(match[2])
        if bank is not None and len(value) != bank.size:
            raise click.BadParameter(f"{item!r}: a {bank} value has {bank.size} bytes", param_hint="--pcr-value")
        values[int(match[1])] = value
    return values


def bank(name: str | None) -> Bank:
    return Bank(name) if name else DEFAULT_BANK


def label(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and (len(value.encode()) > 47 or not value.isprintable() or not value.isascii()):
        raise click.BadParameter("at most 47 bytes, printable ASCII characters only", param_hint="--label")
    return value


def secret_file_check(
    limit: int, *, allow_empty: bool = False
) -> Callable[[click.Context, click.Parameter, Path | None], Path | None]:
    """A callback: the file exists and is a readable regular file of 1 (or 0) to `limit` bytes ('-' is
    stdin, read when needed)."""

    def check(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
        if value is None or str(value) == "-":
            return value
        try:
            info = os.stat(value)
        except OSError as error:
            raise click.BadParameter(f"{value}: {error.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise click.BadParameter(f"{value}: not a regular file")
        if not (0 if allow_empty else 1) <= info.st_size <= limit:
            raise click.BadParameter(f"{value}: {'empty' if not info.st_size else f'longer than {limit} bytes'}")
        if not os.access(value, os.R_OK):
            raise click.BadParameter(f"{value}: not readable")
        return value

    return check


def passphrase_source(path: Path | None, prompt: str, option: str, twice: bool = False) -> PassphraseSource:
    if path is not None:
        return lambda: read_file(path, what="passphrase", option=option)
    return lambda: ask(prompt, twice=twice)


def new_pin_source(path: Path | None, *, required: bool, option: str) -> NewPinSource:
    def new_pin() -> Secret | None:
        if path is not None:
            return _read_pin_file(path, option)
        if required or sys.stdin.isatty():
            return check_pin(ask("New PIN: ", twice=True, limit=MAX_PIN), "the PIN entered")
        return None

    return new_pin


def yes_or_no(as_json: bool) -> Confirm:
    """A y/N question; no terminal, no going ahead: a script must say --yes."""

    def confirm(lines: list[str], question: str) -> bool:
        for line in lines:
            click.echo(printable(line), err=as_json)
        if not sys.stdin.isatty():
            die(
                f"{question} (not asking: no terminal)",
                hint="pass --yes to confirm",
                code=ExitCode.REFUSED,
                cause=Cause.REFUSED,
            )
        return click.confirm(question, default=False, err=True)

    return confirm


def typed_yes(as_json: bool) -> Confirm:
    """Show what is destroyed, then ask for YES typed in capitals (as cryptsetup asks); no terminal, no
    going ahead: a script must say --yes."""

    def confirm(lines: list[str], question: str) -> bool:
        stream = sys.stderr if as_json else sys.stdout  # with --json, stdout holds only the JSON result
        for line in lines:
            print(printable(line), file=stream)
        stream.flush()
        if not sys.stdin.isatty():
            die(
                "no terminal to confirm on, and no --yes: nothing was changed",
                hint="pass --yes (or -q/--batch-mode) to go ahead; --dry-run only lists",
                code=ExitCode.REFUSED,
                cause=Cause.REFUSED,
            )
        answer = click.prompt(
            f"{question} Type YES in capital letters to go on", default="", show_default=False, err=True
        )
        return bool(answer == "YES")

    return confirm


file_path = click.Path(path_type=Path, dir_okay=False, allow_dash=True)
key_file_check = secret_file_check(MAX_KEY_FILE)
pin_file_check = secret_file_check(MAX_PIN)
device_argument = click.argument("device", type=click.Path(path_type=Path))
token_option = click.option("--token-id", type=click.IntRange(0, 31), help="Use only this luks-tpm token.")
pin_file_option = click.option(
    "--pin-file",
    type=file_path,
    callback=pin_file_check,
    help="Read the PIN (1-32 bytes, no NUL) from this file (exact bytes) instead of asking.",
)
unlock_key_option = click.option(
    "--unlock-key-file",
    "--key-file",
    "unlock_key_file",
    type=file_path,
    callback=key_file_check,
    help="Existing passphrase, recovery key or key file that opens a keyslot (exact bytes; - for stdin). "
    "Asked for on the terminal otherwise.",
)
yes_option = click.option(
    "--yes",
    "-q",
    "--batch-mode",
    "yes",
    is_flag=True,
    help="Do not ask for confirmation (cryptsetup's -q/--batch-mode).",
)
pcrs_option = click.option("--pcrs", help="PCRs to bind to, e.g. 7 or 7,11 (default: none, bound to the TPM only).")
bank_option = click.option(
    "--pcr-bank", type=click.Choice([b.value for b in Bank]), help="PCR bank of --pcrs (default sha256)."
)
pcr_value_option = click.option(
    "--pcr-value",
    multiple=True,
    metavar="INDEX=HEX",
    help="Bind to this value instead of the current one (repeatable), e.g. before an update.",
)
fence_option = click.option(
    "--fence",
    is_flag=True,
    help="Also require PCR 15 = zeros: recoverable only before the boot raises the fence (see `luks-tpm fence`).",
)
owner_auth_option = click.option(
    "--owner-auth-file",
    type=file_path,
    callback=secret_file_check(64, allow_empty=True),
    help="The TPM owner hierarchy's authorization, when it has one (exact bytes; - for stdin): creating the "
    "SRK, which proves the persistent one, needs it.",
)


def owner_auth(path: Path | None) -> Secret | None:
    """The owner authorization's exact bytes; an empty file is the empty authorization (None)."""
    if path is None or (str(path) != "-" and path.stat().st_size == 0):
        return None
    return read_file(path, what="owner authorization", option="--owner-auth-file", limit=64)


boot_chain_option = click.option(
    "--boot-chain",
    is_flag=True,
    help="Bind to the boot chain (PCRs 4,7,8,9 unless --pcrs says otherwise) through approved states that "
    "follow kernel, initrd, GRUB and shim updates (`luks-tpm rebind`); the recommended server binding with --fence.",
)
approver_option = click.option(
    "--approver",
    "approver_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_APPROVER,
    show_default=True,
    help="The approver key's file (made on first use; root-only, on the encrypted root).",
)
srk_option = click.option(
    "--transient-srk",
    is_flag=True,
    help="Do not store the standard SRK at 0x81000001 when it is free (each unlock then re-creates it).",
)
