"""The command line: parse, build frozen settings, call one function. Nothing else happens here.

The global options (--tcti, --json, -v/--verbose, --debug) are accepted before and after the command
name, in one parse: each command carries them, and their callbacks fill the one `Globals` object the
boundary (`__main__`) also reads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cryptsetup import Pbkdf
from .errors import Cause, ExitCode, die
from .model import PCR_COUNT, Bank, Mode
from .output import Report, configure_logging
from .prompt import MAX_KEY_FILE, MAX_PIN, ask, pin_source, read_file
from .secret import Secret
from .settings import Activation, Enrollment, FormatSettings, Recovery, tcti_from_environment


@dataclasses.dataclass
class Globals:
    tcti_option: str | None = None
    json: bool = False
    verbose: int = 0

    @property
    def tcti(self) -> str:
        return tcti_from_environment(self.tcti_option, dict(os.environ))


def _globals() -> Globals:
    obj = click.get_current_context().find_object(Globals)
    assert obj is not None, "the CLI runs with a Globals object (see __main__)"
    return obj


def _set_tcti(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_object(Globals).tcti_option = value  # type: ignore[union-attr]


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Globals).json = True  # type: ignore[union-attr]


def _add_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    ctx.find_object(Globals).verbose += value  # type: ignore[union-attr]


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        found = ctx.find_object(Globals)
        assert found is not None
        found.verbose = max(found.verbose, 2)


_TCTI_HELP = (
    "TPM to use, as a TCTI string: device:/dev/tpmrm0 (default), swtpm:path=SOCKET, mssim:..., "
    "tabrmd:. Also from LUKS_TPM_TCTI or TPM2TOOLS_TCTI."
)


def global_options(function: Callable[..., Any]) -> Callable[..., Any]:
    # Eager: processed before the command's own parameters, so that a bad value of one of those
    # (`--token-id 99 --json`) is already reported the way the line asked for.
    for option in reversed(
        [
            click.option(
                "--tcti", metavar="SPEC", expose_value=False, is_eager=True, callback=_set_tcti, help=_TCTI_HELP
            ),
            click.option(
                "--json",
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_set_json,
                help="Machine-readable output on stdout (docs/json.md); errors too.",
            ),
            click.option(
                "-v",
                "--verbose",
                count=True,
                expose_value=False,
                is_eager=True,
                callback=_add_verbose,
                help="More detail; -v also shows tracebacks of bugs, -vv libcryptsetup's debug log.",
            ),
            click.option(
                "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug, help="The same as -vv."
            ),
        ]
    ):
        function = option(function)
    return function


def json_requested(command: click.Command, ctx: click.Context, args: list[str]) -> bool:
    """Whether --json stands on a command line that click could not parse.

    An unknown option or a missing option value stops click's parser before any callback runs, so
    --json later on the line has not been seen. This asks click's own parser for `command` again, told
    this once to step over what it does not know; it runs only on that error path."""
    parser = command.make_parser(ctx)
    parser.ignore_unknown_options = True
    try:
        opts, rest, _ = parser.parse_args(list(args))
    except click.BadOptionUsage:  # an option missing its value: only the last word can be one
        return bool(args) and json_requested(command, ctx, args[:-1])
    except click.UsageError:
        return False
    if opts.get("json"):
        return True
    if isinstance(command, click.Group):  # the group stops at the first word: the command's name
        words = [index for index, word in enumerate(rest) if not word.startswith("-")]
        found = command.get_command(ctx, rest[words[0]]) if words else None
        if found is not None:
            return json_requested(found, ctx, rest[words[0] + 1 :])
    return False


class _JsonOnParseErrors(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        line = list(args)  # click's parser consumes the list it is given
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as error:
            if error.ctx is None:  # click's parser leaves it out for an option missing its value
                error.ctx = ctx
            found = ctx.find_object(Globals)
            if found is not None and json_requested(self, ctx, line):
                found.json = True
            raise


class _Command(_JsonOnParseErrors):
    def invoke(self, ctx: click.Context) -> Any:
        configure_logging(_globals().verbose)
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # raised by the command's own checks: say which command's usage
            if error.ctx is None:
                error.ctx = ctx
            raise


class _Group(_JsonOnParseErrors, click.Group):
    command_class = _Command


def _emit(report: Report) -> None:
    report.emit(_globals().json)
    if report.exit_code != ExitCode.OK:
        sys.exit(report.exit_code)


def _label(value: str | None) -> str | None:
    if value is not None and (len(value.encode()) > 47 or not value.isprintable()):
        raise click.BadParameter("at most 47 bytes, printable characters only", param_hint="--label")
    return value


def _pcr_list(text: str | None, option: str = "--pcrs") -> tuple[int, ...]:
    if text is None:
        return ()
    if not re.fullmatch(r"\d{1,2}(,\d{1,2})*", text) or any(int(i) >= PCR_COUNT for i in text.split(",")):
        raise click.BadParameter(
            f"a comma-separated list of PCR indices 0-{PCR_COUNT - 1}, e.g. 7 or 7,11", param_hint=option
        )
    return tuple(sorted({int(i) for i in text.split(",")}))


def _pcr_values(items: tuple[str, ...], bank: Bank | None) -> dict[int, bytes]:
    """INDEX=HEX values; their size is checked against the bank once the bank is known (it may be the
    token's, for reseal)."""
    values = {}
    for item in items:
        match = re.fullmatch(r"(\d{1,2})=(?:0x)?([0-9a-fA-F]+)", item)
        if not match or int(match[1]) >= PCR_COUNT or len(match[2]) % 2:
            raise click.BadParameter(f"{item!r}: expected INDEX=HEX, e.g. 7=<64 hex digits>", param_hint="--pcr-value")
        value = bytes.fromhex(match[2])
        if bank is not None and len(value) != bank.size:
            raise click.BadParameter(f"{item!r}: a {bank} value has {bank.size} bytes", param_hint="--pcr-value")
        values[int(match[1])] = value
    return values


# Key, passphrase and PIN files are checked when the command line is parsed (exists, a regular file of
# an acceptable size), so a bad one is a usage error naming its option before anything is done; they
# are read, byte for byte into a Secret, only when needed.
def _secret_file_check(limit: int) -> Callable[[click.Context, click.Parameter, Path | None], Path | None]:
    def check(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
        if value is None or str(value) == "-":
            return value
        try:
            info = os.stat(value)
        except OSError as error:
            raise click.BadParameter(f"{value}: {error.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise click.BadParameter(f"{value}: not a regular file")
        if not 0 < info.st_size <= limit:
            raise click.BadParameter(f"{value}: {'empty' if not info.st_size else f'longer than {limit} bytes'}")
        if not os.access(value, os.R_OK):
            raise click.BadParameter(f"{value}: not readable")
        return value

    return check


def _passphrase_source(path: Path | None, prompt: str, option: str, twice: bool = False) -> Callable[[], Secret]:
    if path is not None:
        return lambda: read_file(path, what="passphrase", option=option)
    return lambda: ask(prompt, twice=twice)


def _new_pin_source(path: Path | None, *, required: bool, option: str) -> Callable[[], Secret | None]:
    def new_pin() -> Secret | None:
        if path is not None:
            return read_file(path, what="PIN", option=option, limit=MAX_PIN)
        if required or sys.stdin.isatty():
            return ask("New PIN: ", twice=True, limit=MAX_PIN)
        return None

    return new_pin


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        die(
            f"{question} (not asking: no terminal)",
            hint="pass --yes to confirm",
            code=ExitCode.REFUSED,
            cause=Cause.REFUSED,
        )
    return click.confirm(question, default=False, err=True)


_file = click.Path(path_type=Path, dir_okay=False, allow_dash=True)
_key_file_check = _secret_file_check(MAX_KEY_FILE)
_pin_file_check = _secret_file_check(MAX_PIN)
device_argument = click.argument("device", type=click.Path(path_type=Path))
token_option = click.option("--token-id", type=click.IntRange(0, 31), help="Use only this luks-tpm token.")
pin_file_option = click.option(
    "--pin-file",
    type=_file,
    callback=_pin_file_check,
    help="Read the PIN (1-32 bytes) from this file (exact bytes) instead of asking.",
)
unlock_key_option = click.option(
    "--unlock-key-file",
    "--key-file",
    "unlock_key_file",
    type=_file,
    callback=_key_file_check,
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
fence_option = click.option(
    "--fence",
    is_flag=True,
    help="Also require PCR 15 = zeros: recoverable only before the boot raises the fence (see `luks-tpm fence`).",
)
srk_option = click.option(
    "--transient-srk",
    is_flag=True,
    help="Do not store the standard SRK at 0x81000001 when it is free (each unlock then re-creates it).",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@global_options
@click.version_option(__version__, prog_name="luks-tpm")
def main() -> None:
    """Bind LUKS2 volumes to this machine's TPM 2.0.

    \b
    Derived keys (format, enroll --mode derived): the TPM recomputes the volume
    key from a key in its owner hierarchy; nothing secret is stored anywhere, and
    clearing the TPM owner hierarchy destroys the key: keep the recovery key.
    Sealed keys (enroll --mode sealed): the key is sealed to PCR values, with an
    optional PIN; `reseal` before planned firmware or bootloader changes.
    Both can be bound to PCRs and to the PCR-15 fence (--fence), which closes the
    TPM to them once the boot is done.

    \b
    Unlocked keys go into the kernel keyring as logon keys cryptsetup:<uuid>-d0
    that dm-crypt references by name; they never pass through files or pipes.

    \b
    Exit codes: 0 ok, 1 bug, 2 usage, 3 device, header or token problem, 4 TPM
    unavailable, 5 unlock failed (status: some volume would not unlock), 6 TPM in
    lockout, 7 refused (would lose data, or declined), 8 unsupported, 9 wipe or
    erase done but its check found something left.
    """


@main.command()
@global_options
def doctor() -> None:
    """Check the TPM, SRK, lockout state, keyring, libcryptsetup and dm-crypt."""
    from .doctor import doctor as run

    _emit(run(_globals().tcti))


@main.command("persist-srk")
@global_options
def persist_srk() -> None:
    """Store the standard SRK at 0x81000001 so later commands need not re-create it.

    format and enroll do this by default when the handle is free. Bindings record
    which SRK they use; a binding made with the persistent SRK keeps working if
    it is evicted (the SRK is re-created from its template, with a warning)."""
    from .tpm import Tpm
    from .tpm.srk import persist_srk as run

    with Tpm(_globals().tcti) as tpm:
        parent = run(tpm)
    assert parent.handle is not None
    _emit(
        Report(
            {"handle": f"{parent.handle:#x}", "name": parent.name.hex()},
            [f"SRK persistent at {parent.handle:#x}, name {parent.name.hex()}"],
        )
    )


def _enrollment(
    mode: Mode, pcrs: str | None, bank: str | None, values: tuple[str, ...], pin: bool, fence: bool, transient_srk: bool
) -> Enrollment:
    chosen_bank = Bank(bank or "sha256")
    given = _pcr_values(values, chosen_bank)
    return Enrollment(
        mode,
        chosen_bank,
        tuple(sorted(set(_pcr_list(pcrs)) | set(given))),
        given,
        pin,
        fence,
        persist_srk=not transient_srk,
    )


@main.command("format")
@device_argument
@click.option("--cipher", default="aes-xts-plain64", show_default=True)
@click.option(
    "--key-size", type=click.Choice(["256", "512"]), default="512", show_default=True, help="Volume key size in bits."
)
@click.option("--sector-size", type=click.Choice(["512", "1024", "2048", "4096"]), default="512", show_default=True)
@click.option("--label", callback=lambda _c, _p, v: _label(v), help="LUKS2 label (at most 47 printable bytes).")
@click.option("--uuid", "volume_uuid", type=click.UUID, help="UUID of the new volume (default: random).")
@click.option(
    "--passphrase-file",
    type=_file,
    callback=_key_file_check,
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
@srk_option
@yes_option
@global_options
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
    transient_srk: bool,
    yes: bool,
) -> None:
    """Create a LUKS2 volume on DEVICE whose volume key is derived by the TPM.

    A recovery key is generated and printed once (or use --passphrase-file,
    --passphrase, or --no-recovery). DEVICE may be a block device or an image file.
    With --pcrs and --fence the derived key is bound to those PCRs and the fence.
    """
    from .provision import format_volume

    if sum([passphrase_file is not None, ask_passphrase, no_recovery]) > 1:
        raise click.UsageError("choose one of --passphrase-file, --passphrase and --no-recovery")
    if not re.fullmatch(r"[a-z0-9]+-[a-z0-9]+(-[a-z0-9]+)?", cipher):
        raise click.BadParameter("CIPHER-MODE, e.g. aes-xts-plain64", param_hint="--cipher")
    recovery = (
        Recovery.NONE
        if no_recovery
        else (Recovery.PASSPHRASE if passphrase_file or ask_passphrase else Recovery.GENERATE)
    )
    settings = FormatSettings(
        device=device,
        recovery=recovery,
        pbkdf=Pbkdf(pbkdf, iterations=pbkdf_force_iterations),
        cipher=cipher,
        key_size=int(key_size) // 8,
        sector_size=int(sector_size),
        label=label,
        uuid=str(volume_uuid) if volume_uuid else None,
        yes=yes,
        binding=_enrollment(Mode.DERIVED, pcrs, pcr_bank, (), False, fence, transient_srk),
    )
    source = _passphrase_source(passphrase_file, "Recovery passphrase: ", "--passphrase-file", twice=True)
    _emit(format_volume(_globals().tcti, settings, _confirm, source))


@main.command()
@device_argument
@click.option(
    "--mode",
    type=click.Choice([m.value for m in Mode]),
    required=True,
    help="derived: the TPM recomputes a key-encryption key; sealed: the key is sealed in the TPM.",
)
@pcrs_option
@bank_option
@click.option(
    "--pcr-value",
    multiple=True,
    metavar="INDEX=HEX",
    help="Bind to this value instead of the current one (repeatable), e.g. before an update.",
)
@fence_option
@click.option("--pin", is_flag=True, help="Sealed only: also require a PIN (asked twice; DA-protected).")
@pin_file_option
@srk_option
@unlock_key_option
@global_options
def enroll(
    device: Path,
    mode: str,
    pcrs: str | None,
    pcr_bank: str | None,
    pcr_value: tuple[str, ...],
    fence: bool,
    pin: bool,
    pin_file: Path | None,
    transient_srk: bool,
    unlock_key_file: Path | None,
) -> None:
    """Bind an existing LUKS2 volume to the TPM (other keyslots and tokens are kept)."""
    from .provision import enroll as run

    chosen = Mode(mode)
    with_pin = pin or pin_file is not None
    if chosen is Mode.DERIVED and with_pin:
        raise click.UsageError(
            "--pin and --pin-file apply to --mode sealed: a derived key's PIN would protect "
            "nothing (the TPM re-creates the key without it)"
        )
    enrollment = _enrollment(chosen, pcrs, pcr_bank, pcr_value, with_pin, fence, transient_srk)
    _emit(
        run(
            _globals().tcti,
            device,
            enrollment,
            _passphrase_source(unlock_key_file, f"Passphrase or recovery key for {device}: ", "--unlock-key-file"),
            _new_pin_source(pin_file, required=True, option="--pin-file"),
        )
    )


@main.command("load-key")
@click.argument("devices", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="DEVICE...")
@click.option(
    "--keyring",
    "keyring_spec",
    default="@s",
    show_default=True,
    help="Keyring to add the logon keys to: @s, @u, @p, @t, @us or a serial number.",
)
@click.option("--timeout", type=click.IntRange(1, 2**32 - 1), help="Expire the keys after this many seconds.")
@click.option("--table", is_flag=True, help="Also print the dm-crypt table line that references each key.")
@token_option
@pin_file_option
@global_options
def load_key(
    devices: tuple[Path, ...],
    keyring_spec: str,
    timeout: int | None,
    table: bool,
    token_id: int | None,
    pin_file: Path | None,
) -> None:
    """Recover each volume key and add it as logon key cryptsetup:<uuid>-d0; prints the serials.

    Several devices share one TPM pass (one connection, one session)."""
    from . import keyring
    from .activate import load_keys

    try:
        target = keyring.load_key_target(keyring_spec)
    except (ValueError, keyring.KeyringError) as error:
        raise click.BadParameter(str(error), param_hint="--keyring") from None
    _emit(load_keys(_globals().tcti, devices, target, timeout, table, token_id, pin_source(pin_file)))


@main.command("open")
@click.argument("device", required=False, type=click.Path(path_type=Path))
@click.argument("name", required=False)
@click.option(
    "--all", "all_volumes", is_flag=True, help="Open every crypttab entry with option x-luks-tpm, in one TPM pass."
)
@click.option(
    "--crypttab",
    type=click.Path(path_type=Path, dir_okay=False, exists=True, readable=True),
    default="/etc/crypttab",
    show_default=True,
    help="The crypttab for --all.",
)
@click.option("--readonly", is_flag=True)
@click.option("--allow-discards", is_flag=True)
@token_option
@pin_file_option
@global_options
def open_command(
    device: Path | None,
    name: str | None,
    all_volumes: bool,
    crypttab: Path,
    readonly: bool,
    allow_discards: bool,
    token_id: int | None,
    pin_file: Path | None,
) -> None:
    """Unlock DEVICE as /dev/mapper/NAME with the key referenced from the kernel keyring."""
    from . import crypttab as tab
    from .activate import open_all, open_volume

    if all_volumes:
        if device or name:
            raise click.UsageError("--all takes no DEVICE or NAME")
        _emit(open_all(_globals().tcti, tab.read(crypttab), pin_source(pin_file)))
        return
    if device is None or name is None:
        raise click.UsageError("give DEVICE and NAME, or --all")
    _emit(
        open_volume(_globals().tcti, device, name, Activation(readonly, allow_discards), token_id, pin_source(pin_file))
    )


@main.command()
@click.argument("devices", nargs=-1, type=click.Path(path_type=Path))
@global_options
def status(devices: tuple[Path, ...]) -> None:
    """Show each volume's luks-tpm tokens and whether they would unlock now, and why not.

    Without DEVICES, the crypttab entries marked x-luks-tpm. Exits 0 when every
    volume would unlock now, 5 when some would not."""
    from . import crypttab as tab
    from .activate import status as run

    paths = list(devices) or [Path(tab.resolve(e).device) for e in tab.read(Path("/etc/crypttab"))]
    _emit(run(_globals().tcti, paths))


@main.command()
@device_argument
@token_option
@pcrs_option
@bank_option
@click.option("--pcr-value", multiple=True, metavar="INDEX=HEX", help="Bind to this value (repeatable).")
@pin_file_option
@click.option(
    "--new-pin-file",
    type=_file,
    callback=_pin_file_check,
    help="The new binding's PIN (default: the old PIN, once verified).",
)
@click.option("--force", is_flag=True, help="Replace the old token even if the new one cannot be verified now.")
@unlock_key_option
@global_options
def reseal(
    device: Path,
    token_id: int | None,
    pcrs: str | None,
    pcr_bank: str | None,
    pcr_value: tuple[str, ...],
    pin_file: Path | None,
    new_pin_file: Path | None,
    force: bool,
    unlock_key_file: Path | None,
) -> None:
    """Re-bind a PCR-bound token to new PCR values; the old token is removed only after the new one is
    verified (with given --pcr-value values it cannot be: then both are kept, unless --force)."""
    from .provision import reseal as run

    values = _pcr_values(pcr_value, None)
    _emit(
        run(
            _globals().tcti,
            device,
            token_id,
            _pcr_list(pcrs) if pcrs is not None else None,
            values,
            pcr_bank,
            force,
            _passphrase_source(unlock_key_file, f"Passphrase or recovery key for {device}: ", "--unlock-key-file"),
            pin_source(pin_file),
            _new_pin_source(new_pin_file, required=False, option="--new-pin-file"),
        )
    )


@main.command()
@device_argument
@click.option("--token-id", type=click.IntRange(0, 31), required=True)
@click.option("--force", is_flag=True, help="Remove it even if it is the last way into the volume.")
@global_options
def remove(device: Path, token_id: int, force: bool) -> None:
    """Remove a luks-tpm token; refuses to remove the last way into the volume unless --force.

    Ways in are keyslots and tokens that can still recover the key (or are not known to be dead)."""
    from .provision import remove as run

    _emit(run(_globals().tcti, device, token_id, force))


@main.command("request-key", context_settings={"ignore_unknown_options": True})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@global_options
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
    die(
        f"request-key takes exactly KEY TYPE DESCRIPTION CALLOUT SESSION_KEYRING ({len(arguments)} given), "
        "and only /sbin/request-key can run it",
        hint="see `luks-tpm request-key --help`",
        code=ExitCode.USAGE,
        cause=Cause.USAGE,
    )


@main.command()
@global_options
def fence() -> None:
    """Raise the PCR-15 fence: extend PCR 15 so that no fenced token can be recovered until reboot.

    The boot integration does this before the real root runs. Idempotent in effect."""
    from .activate import raise_fence

    _emit(raise_fence(_globals().tcti))


def _typed_confirmation() -> Callable[[list[str], str], bool]:
    """Show what is destroyed, then ask for YES typed in capitals (as cryptsetup asks); no terminal, no
    going ahead: a script must say --yes."""
    as_json = _globals().json

    def confirm(lines: list[str], question: str) -> bool:
        stream = sys.stderr if as_json else sys.stdout  # with --json, stdout holds only the JSON result
        for line in lines:
            print(line, file=stream)
        stream.flush()
        if not sys.stdin.isatty():
            die(
                "no terminal to confirm on, and no --yes: nothing was changed",
                hint="pass --yes (or -q/--batch-mode) to go ahead; --dry-run only lists",
                code=ExitCode.REFUSED,
            )
        answer = click.prompt(
            f"{question} Type YES in capital letters to go on", default="", show_default=False, err=True
        )
        return bool(answer == "YES")

    return confirm


@main.command()
@click.argument("devices", nargs=-1, type=click.Path(path_type=Path), metavar="[DEVICE...]")
@click.option(
    "--lockout-auth-file",
    type=_file,
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
@global_options
def wipe(
    devices: tuple[Path, ...], lockout_auth_file: Path | None, crypttab_path: Path | None, dry_run: bool, yes: bool
) -> None:
    """Clear the TPM owner hierarchy (TPM2_Clear): every key bound to it dies.

    \b
    First lists what dies: the volumes it knows (DEVICEs, crypttab entries marked
    x-luks-tpm, block devices with a luks-tpm token), each token's fate and
    whether a keyslot keeps the volume openable; the persistent objects and owner
    NV indices (other software's keys too). Asks for YES unless --yes. Then clears
    with the lockout authorization and checks that every listed token now fails
    as destroyed. Exit 0 only when all do, 9 when some check fails.
    Keyslots stay: recovery keys and passphrases still open wiped volumes."""
    from .decommission import wipe as run

    _emit(
        run(
            _globals().tcti,
            devices,
            crypttab_path=crypttab_path,
            lockout_auth_file=lockout_auth_file,
            dry_run=dry_run,
            confirm=None if yes else _typed_confirmation(),
        )
    )


@main.command()
@click.argument("devices", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="DEVICE...")
@click.option("--dry-run", is_flag=True, help="Only list what would be destroyed; change nothing.")
@yes_option
@global_options
def erase(devices: tuple[Path, ...], dry_run: bool, yes: bool) -> None:
    """Crypto-erase volumes: destroy every keyslot and every token (luks-tpm's and other tools').

    \b
    Afterwards no passphrase, recovery key or TPM opens them, which is checked by
    reading the header back (exit 0; 9 if anything is left). The TPM is kept for
    the machine's other volumes. The data area is not overwritten: without the key
    it is noise. Interrupted, it can be run again and finishes. Asks for YES
    unless --yes."""
    from .decommission import erase as run

    _emit(run(devices, dry_run=dry_run, confirm=None if yes else _typed_confirmation()))
