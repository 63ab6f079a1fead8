"""The command line: parse, build frozen settings, call one function. Nothing else happens here."""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import click

from . import __version__
from .cryptsetup import Pbkdf
from .errors import ExitCode, die
from .output import Report
from .secret import Secret
from .settings import Activation, Enrollment, FormatSettings, Recovery
from .token import Mode
from .tpm import Bank, tcti_from_environment


class Context:
    def __init__(self, tcti: str, as_json: bool) -> None:
        self.tcti = tcti
        self.json = as_json


pass_context = click.make_pass_decorator(Context)


def _emit(context: Context, report: Report) -> None:
    report.emit(context.json)


def _pcr_list(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    if not re.fullmatch(r"\d{1,2}(,\d{1,2})*", text) or any(int(i) > 23 for i in text.split(",")):
        raise click.BadParameter("a comma-separated list of PCR indices 0-23, e.g. 7 or 7,11")
    return tuple(sorted({int(i) for i in text.split(",")}))


def _pcr_values(items: tuple[str, ...], bank: Bank) -> dict[int, bytes]:
    values = {}
    size = len(bank.hash(b""))
    for item in items:
        match = re.fullmatch(r"(\d{1,2})=(?:0x)?([0-9a-fA-F]+)", item)
        if not match or int(match[1]) > 23 or len(match[2]) != 2 * size:
            raise click.BadParameter(f"{item!r}: expected INDEX=HEX with a {size}-byte {bank} value")
        values[int(match[1])] = bytes.fromhex(match[2])
    return values


def _passphrase_source(path: Path | None, prompt: str, twice: bool = False) -> Callable[[], Secret]:
    from .prompt import ask, read_file

    if path is not None:
        return lambda: read_file(path, what="passphrase")
    return lambda: ask(prompt, twice=twice)


def _pin_source(path: Path | None) -> Callable[[int], Secret | None]:
    from .prompt import ask, read_file

    def pins(token_id: int) -> Secret | None:
        if path is not None:
            return read_file(path, what="PIN")
        if sys.stdin.isatty():
            return ask(f"PIN for token {token_id}: ")
        return None

    return pins


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        die(f"{question} (not asking: no terminal)", hint="pass --yes to confirm", code=ExitCode.REFUSED)
    return click.confirm(question, default=False, err=True)


_TCTI_HELP = ("TPM to use, as a TCTI string: device:/dev/tpmrm0 (default), swtpm:path=SOCKET, mssim:..., "
              "tabrmd:. Also from LUKS_TPM_TCTI or TPM2TOOLS_TCTI.")

device_argument = click.argument("device", type=click.Path(path_type=Path, dir_okay=False))
token_option = click.option("--token-id", type=click.IntRange(0, 31), help="Use only this luks-tpm token.")
pin_file_option = click.option("--pin-file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
                               help="Read the PIN from this file (exact bytes) instead of asking.")
unlock_key_option = click.option(
    "--unlock-key-file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
    help="Existing passphrase, recovery key or key file that opens a keyslot (exact bytes; - for stdin). "
         "Asked for on the terminal otherwise.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--tcti", metavar="SPEC", help=_TCTI_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-v", "--verbose", count=True, help="More detail; -v also shows tracebacks of bugs.")
@click.version_option(__version__, prog_name="luks-tpm")
@click.pass_context
def main(ctx: click.Context, tcti: str | None, as_json: bool, verbose: int) -> None:
    """Bind LUKS2 volumes to this machine's TPM 2.0.

    \b
    Derived keys (format, enroll --mode derived): the TPM recomputes the volume
    key from a key in its owner hierarchy; nothing secret is stored anywhere, and
    clearing the TPM owner hierarchy destroys the key: keep the recovery key.
    Sealed keys (enroll --mode sealed): the key is sealed to PCR values, with an
    optional PIN; `reseal` before planned firmware or bootloader changes.

    \b
    Unlocked keys go into the kernel keyring as logon keys cryptsetup:<uuid>-d0
    that dm-crypt references by name; they never pass through files or pipes.

    \b
    Exit codes: 0 ok, 1 bug, 2 usage, 3 device or header problem, 4 TPM unavailable,
    5 unlock failed, 6 TPM in lockout, 7 refused (would lose data, or declined),
    8 unsupported (LUKS1, newer token version, no device-mapper).
    """
    ctx.obj = Context(tcti_from_environment(tcti, dict(os.environ)), as_json)


@main.command()
@pass_context
def doctor(context: Context) -> None:
    """Check the TPM, SRK, lockout state, keyring, libcryptsetup and dm-crypt."""
    from .doctor import doctor as run

    report = run(context.tcti)
    _emit(context, report)
    if not report.data["checks"][0]["ok"]:
        sys.exit(ExitCode.TPM_UNAVAILABLE)


@main.command("persist-srk")
@pass_context
def persist_srk(context: Context) -> None:
    """Store the standard SRK at 0x81000001 so later commands need not re-create it.

    Bindings record which SRK they use: tokens made before this keep using a
    transient SRK (same key, created on demand); new ones use the persistent one."""
    from .tpm import Tpm

    with Tpm(context.tcti) as tpm:
        parent = tpm.persist_srk()
    _emit(context, Report({"handle": f"{parent.handle:#x}", "name": parent.name.hex()},
                          [f"SRK persistent at {parent.handle:#x}, name {parent.name.hex()}"]))


@main.command("format")
@device_argument
@click.option("--cipher", default="aes-xts-plain64", show_default=True)
@click.option("--key-size", type=click.Choice(["256", "512"]), default="512", show_default=True,
              help="Volume key size in bits.")
@click.option("--sector-size", type=click.Choice(["512", "1024", "2048", "4096"]), default="512",
              show_default=True)
@click.option("--label", help="LUKS2 label.")
@click.option("--uuid", "volume_uuid", type=click.UUID, help="UUID of the new volume (default: random).")
@click.option("--passphrase-file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              help="Recovery passphrase from this file (exact bytes) instead of a generated recovery key.")
@click.option("--passphrase", "ask_passphrase", is_flag=True, help="Ask for a recovery passphrase instead.")
@click.option("--no-recovery", is_flag=True,
              help="No recovery keyslot: clearing or losing the TPM then destroys the data.")
@click.option("--pbkdf", type=click.Choice(["argon2id", "argon2i", "pbkdf2"]), default="argon2id",
              show_default=True, help="PBKDF of the recovery keyslot.")
@click.option("--pbkdf-force-iterations", type=click.IntRange(min=1),
              help="Fixed PBKDF cost instead of benchmarking (like cryptsetup).")
@click.option("--yes", is_flag=True, help="Overwrite an existing LUKS header without asking.")
@pass_context
def format_command(context: Context, device: Path, cipher: str, key_size: str, sector_size: str,
                   label: str | None, volume_uuid: uuid.UUID | None, passphrase_file: Path | None,
                   ask_passphrase: bool, no_recovery: bool, pbkdf: str, pbkdf_force_iterations: int | None,
                   yes: bool) -> None:
    """Create a LUKS2 volume on DEVICE whose volume key is derived by the TPM.

    A recovery key is generated and printed once (or use --passphrase-file,
    --passphrase, or --no-recovery). DEVICE may be a block device or an image file.
    """
    from .provision import format_volume

    if sum([passphrase_file is not None, ask_passphrase, no_recovery]) > 1:
        raise click.UsageError("choose one of --passphrase-file, --passphrase and --no-recovery")
    recovery = Recovery.NONE if no_recovery else (
        Recovery.PASSPHRASE if passphrase_file or ask_passphrase else Recovery.GENERATE)
    settings = FormatSettings(
        device=device, recovery=recovery, pbkdf=Pbkdf(pbkdf, iterations=pbkdf_force_iterations),
        cipher=cipher, key_size=int(key_size) // 8, sector_size=int(sector_size), label=label,
        uuid=str(volume_uuid) if volume_uuid else None, yes=yes,
    )
    source = _passphrase_source(passphrase_file, "Recovery passphrase: ", twice=True)
    _emit(context, format_volume(context.tcti, settings, _confirm, source))


@main.command()
@device_argument
@click.option("--mode", type=click.Choice([m.value for m in Mode]), required=True,
              help="derived: the TPM recomputes a key-encryption key; sealed: the key is sealed to PCRs.")
@click.option("--pcrs", help="PCRs to bind a sealed key to, e.g. 7 or 7,11 (none: bound to the TPM only).")
@click.option("--pcr-bank", type=click.Choice([b.value for b in Bank]), default="sha256", show_default=True)
@click.option("--pcr-value", multiple=True, metavar="INDEX=HEX",
              help="Seal against this value instead of the current one (repeatable), e.g. before an update.")
@click.option("--pin", is_flag=True, help="Also require a PIN (asked twice; DA-protected).")
@pin_file_option
@unlock_key_option
@pass_context
def enroll(context: Context, device: Path, mode: str, pcrs: str | None, pcr_bank: str,
           pcr_value: tuple[str, ...], pin: bool, pin_file: Path | None, unlock_key_file: Path | None) -> None:
    """Bind an existing LUKS2 volume to the TPM (other keyslots and tokens are kept)."""
    from .prompt import ask, read_file
    from .provision import enroll as run

    chosen = Mode(mode)
    bank = Bank(pcr_bank)
    values = _pcr_values(pcr_value, bank)
    if chosen is Mode.DERIVED and (pcrs or values or pin or pin_file):
        raise click.UsageError("--pcrs, --pcr-value and --pin apply to --mode sealed")
    with_pin = pin or pin_file is not None
    enrollment = Enrollment(chosen, bank, tuple(sorted(set(_pcr_list(pcrs)) | set(values))), values, with_pin)

    def pin_source() -> Secret | None:
        if not with_pin:
            return None
        return read_file(pin_file, what="PIN") if pin_file else ask("New PIN: ", twice=True)

    _emit(context, run(context.tcti, device, enrollment,
                       _passphrase_source(unlock_key_file, f"Passphrase or recovery key for {device}: "),
                       pin_source))


@main.command("load-key")
@device_argument
@click.option("--keyring", "keyring_spec", default="@s", show_default=True,
              help="Keyring to add the logon key to: @s, @u, @p, @t, @us or a serial number.")
@click.option("--timeout", type=click.IntRange(min=1), help="Expire the key after this many seconds.")
@click.option("--table", is_flag=True, help="Also print the dm-crypt table line that references the key.")
@token_option
@pin_file_option
@pass_context
def load_key(context: Context, device: Path, keyring_spec: str, timeout: int | None, table: bool,
             token_id: int | None, pin_file: Path | None) -> None:
    """Recover the volume key and add it as logon key cryptsetup:<uuid>-d0; prints its serial."""
    from . import keyring
    from .activate import load_key as run

    try:
        target = keyring.parse_keyring(keyring_spec)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--keyring") from None
    _emit(context, run(context.tcti, device, target, timeout, table, token_id, _pin_source(pin_file)))


@main.command("open")
@click.argument("device", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.argument("name", required=False)
@click.option("--all", "all_volumes", is_flag=True,
              help="Open every crypttab entry with option x-luks-tpm, in one TPM pass.")
@click.option("--crypttab", type=click.Path(path_type=Path, dir_okay=False), default="/etc/crypttab",
              show_default=True, help="The crypttab for --all.")
@click.option("--readonly", is_flag=True)
@click.option("--allow-discards", is_flag=True)
@token_option
@pin_file_option
@pass_context
def open_command(context: Context, device: Path | None, name: str | None, all_volumes: bool, crypttab: Path,
                 readonly: bool, allow_discards: bool, token_id: int | None, pin_file: Path | None) -> None:
    """Unlock DEVICE as /dev/mapper/NAME with the key referenced from the kernel keyring."""
    from . import crypttab as tab
    from .activate import open_all, open_volume

    if all_volumes:
        if device or name:
            raise click.UsageError("--all takes no DEVICE or NAME")
        entries = [tab.resolve(entry) for entry in tab.read(crypttab)]
        _emit(context, open_all(context.tcti, entries, _pin_source(pin_file)))
        return
    if device is None or name is None:
        raise click.UsageError("give DEVICE and NAME, or --all")
    _emit(context, open_volume(context.tcti, device, name, Activation(readonly, allow_discards), token_id,
                               _pin_source(pin_file)))


@main.command()
@click.argument("devices", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@pass_context
def status(context: Context, devices: tuple[Path, ...]) -> None:
    """Show each volume's luks-tpm tokens and whether they would unlock now, and why not.

    Without DEVICES, the crypttab entries marked x-luks-tpm."""
    from . import crypttab as tab
    from .activate import status as run

    paths = list(devices) or [Path(tab.resolve(e).device) for e in tab.read(Path("/etc/crypttab"))]
    _emit(context, run(context.tcti, paths))


@main.command()
@device_argument
@token_option
@click.option("--pcrs", help="New PCR list (default: the token's).")
@click.option("--pcr-bank", type=click.Choice([b.value for b in Bank]))
@click.option("--pcr-value", multiple=True, metavar="INDEX=HEX", help="Seal against this value (repeatable).")
@pin_file_option
@unlock_key_option
@pass_context
def reseal(context: Context, device: Path, token_id: int | None, pcrs: str | None, pcr_bank: str | None,
           pcr_value: tuple[str, ...], pin_file: Path | None, unlock_key_file: Path | None) -> None:
    """Re-seal a sealed token to new PCR values; the old token is removed only after the new one works."""
    from .provision import reseal as run

    # Anything not given (bank, PCR list, PIN) stays as the old token has it.
    bank = Bank(pcr_bank) if pcr_bank else None
    values = _pcr_values(pcr_value, bank or Bank.SHA256)
    _emit(context, run(context.tcti, device, token_id, _pcr_list(pcrs) if pcrs else None, bank, values,
                       _passphrase_source(unlock_key_file, f"Passphrase or recovery key for {device}: "),
                       _pin_source(pin_file)))


@main.command()
@device_argument
@click.option("--token-id", type=click.IntRange(0, 31), required=True)
@click.option("--force", is_flag=True, help="Remove it even if it is the last way into the volume.")
@pass_context
def remove(context: Context, device: Path, token_id: int, force: bool) -> None:
    """Remove a luks-tpm token; refuses to remove the last way into the volume unless --force."""
    from .provision import remove as run

    _emit(context, run(device, token_id, force))


@main.command("request-key", context_settings={"ignore_unknown_options": True})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def request_key(arguments: tuple[str, ...]) -> None:
    """Handler for /sbin/request-key: KEY TYPE DESCRIPTION CALLOUT SESSION_KEYRING.

    \b
    Run by the kernel, from /etc/request-key.d/luks-tpm.conf, as
      luks-tpm --tcti SPEC request-key %k %t %d %c %S
    when a program asks for a key that is not there (request_key(2)):
      logon cryptsetup:<uuid>-d<digest>  callout: the LUKS2 device, or -
      user  luks-tpm:app:<name>          callout: the length in bytes, 16-64
    It answers through the keyring, logs to syslog, and is of no use from a shell.
    """
    die(f"request-key takes exactly KEY TYPE DESCRIPTION CALLOUT SESSION_KEYRING ({len(arguments)} given), "
        "and only /sbin/request-key can run it", hint="see `luks-tpm request-key --help`", code=ExitCode.USAGE)


def verbosity(argv: list[str]) -> int:
    """-v count, read before click runs so the boundary knows whether to show tracebacks."""
    count = 0
    for arg in argv:
        if arg == "--verbose":
            count += 1
        elif re.fullmatch(r"-v+", arg):
            count += len(arg) - 1
        elif not arg.startswith("-"):
            break
    return count

