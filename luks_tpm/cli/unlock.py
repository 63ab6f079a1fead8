"""Commands that use bindings: load-key, open (and open --all), status, fence."""

from __future__ import annotations

from pathlib import Path

import click

from ..output import Report
from ..prompt import pin_source
from ..settings import DEFAULT_CRYPTTAB, DEFAULT_KEYRING, Activation
from . import command, options
from .params import pin_file_option, token_option


@command("load-key")
@click.argument("devices", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="DEVICE...")
@click.option(
    "--keyring",
    "keyring_spec",
    default=DEFAULT_KEYRING,
    show_default=True,
    help="Keyring to add the logon keys to: @s, @u, @p, @t, @us or a keyring's serial number.",
)
@click.option("--timeout", type=click.IntRange(1, 2**32 - 1), help="Expire the keys after this many seconds.")
@click.option("--table", is_flag=True, help="Also print the dm-crypt table line that references each key.")
@token_option
@pin_file_option
def load_key(
    devices: tuple[Path, ...],
    keyring_spec: str,
    timeout: int | None,
    table: bool,
    token_id: int | None,
    pin_file: Path | None,
) -> Report:
    """Recover each volume key and add it as logon key cryptsetup:<uuid>-d0; prints the serials.

    Several devices share one TPM pass (one connection, one session)."""
    from .. import keyring
    from ..activation import load_keys

    try:
        target = keyring.load_key_target(keyring_spec)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--keyring") from None
    return load_keys(options().tcti, devices, target, timeout, table, token_id, pin_source(pin_file))


@command("open")
@click.argument("device", required=False, type=click.Path(path_type=Path))
@click.argument("name", required=False)
@click.option(
    "--all", "all_volumes", is_flag=True, help="Open every crypttab entry with option x-luks-tpm, in one TPM pass."
)
@click.option(
    "--crypttab",
    type=click.Path(path_type=Path, dir_okay=False, exists=True, readable=True),
    default=DEFAULT_CRYPTTAB,
    show_default=True,
    help="The crypttab for --all.",
)
@click.option("--readonly", is_flag=True)
@click.option("--allow-discards", is_flag=True)
@token_option
@pin_file_option
def open_command(
    device: Path | None,
    name: str | None,
    all_volumes: bool,
    crypttab: Path,
    readonly: bool,
    allow_discards: bool,
    token_id: int | None,
    pin_file: Path | None,
) -> Report:
    """Unlock DEVICE as /dev/mapper/NAME with the key referenced from the kernel keyring."""
    from .. import crypttab as tab
    from ..activation import open_volume
    from ..bootpass import open_all

    if all_volumes:
        if device or name:
            raise click.UsageError("--all takes no DEVICE or NAME")
        return open_all(options().tcti, tab.read(crypttab), pin_source(pin_file))
    if device is None or name is None:
        raise click.UsageError("give DEVICE and NAME, or --all")
    activation = Activation(readonly, allow_discards)
    return open_volume(options().tcti, device, name, activation, token_id, pin_source(pin_file))


@command()
@click.argument("devices", nargs=-1, type=click.Path(path_type=Path))
def status(devices: tuple[Path, ...]) -> Report:
    """Show each volume's luks-tpm tokens and whether they would unlock now, and why not.

    Without DEVICES, the crypttab entries marked x-luks-tpm. Exits 0 when every
    volume would unlock now, 5 when some would not."""
    from .. import crypttab as tab
    from ..status import status as run

    targets = list(devices) or tab.devices(tab.read(DEFAULT_CRYPTTAB, option="crypttab"))
    return run(options().tcti, targets)


@command()
def fence() -> Report:
    """Raise the PCR-15 fence: extend PCR 15 so that no fenced token can be recovered until reboot.

    The boot integration does this before the real root runs. Idempotent in effect."""
    from ..fence import raise_fence

    return raise_fence(options().tcti)


COMMANDS = (load_key, open_command, status, fence)
