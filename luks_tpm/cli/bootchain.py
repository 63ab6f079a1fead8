"""Commands about the boot chain (docs/boot-chain.md): predict the next boot, rebind to it."""

from __future__ import annotations

from pathlib import Path

import click

from ..output import Report
from ..settings import DEFAULT_CRYPTTAB
from . import command, options
from .params import approver_option, bank, pcr_value_option, pcr_values


@command()
def predict() -> Report:
    """Predict the PCR values of the next boot from this boot's TCG event log and the boot files now.

    \b
    The log (/sys/kernel/security/tpm0/binary_bios_measurements) must reproduce the
    TPM's current PCRs; it is then replayed with shim, GRUB, grub.cfg, grubenv, the
    kernel and the initrd as they are on the ESP and /boot now. Exit 10 when the next
    boot cannot be predicted (an unknown event, a GRUB other than Debian's 2.06-13
    builds, a shim whose SbatLevel changes, a grub.cfg construct the replay does
    not model, no event log)
    or will not happen (a kernel, GRUB or shim that shim or the firmware will refuse:
    bad signature, another authority, dbx, SBAT), with the reason; firmware and
    Secure Boot database updates cannot be seen."""
    from ..rebind import predict as run

    return run(options().tcti)


@command()
@click.argument("devices", nargs=-1, type=click.Path(path_type=Path), metavar="[DEVICE...]")
@pcr_value_option
@click.option(
    "--approve-current",
    is_flag=True,
    help="Also approve the state this boot is in when it was not approved (it came up with the passphrase): "
    "look at `luks-tpm predict` and the event log first.",
)
@approver_option
def rebind(devices: tuple[Path, ...], pcr_value: tuple[str, ...], approve_current: bool, approver_file: Path) -> Report:
    """Approve this boot's and the next boot's state for every token bound to the boot chain.

    \b
    Each token's approved states become exactly {now, the predicted next boot}
    (with --pcr-value: {now, the given state}); stale ones are dropped. This boot's
    state stays approved only when it was (--approve-current approves it anyway).
    No key and no passphrase are needed; the fence and PIN stay part of every state.
    Without DEVICEs, the crypttab entries marked x-luks-tpm. The package runs it
    after kernel, initramfs, GRUB and shim updates and at every boot. Exit 10 when
    the next boot cannot be predicted: its state is then not approved, and
    `luks-tpm status` says the next boot will not unlock unattended."""
    from .. import crypttab as tab
    from ..rebind import rebind as run

    targets = list(devices) or tab.devices(tab.read(DEFAULT_CRYPTTAB, option="crypttab"))
    given = pcr_values(pcr_value, bank(None)) if pcr_value else None
    return run(options().tcti, targets, approver_file, given, approve_current=approve_current)


COMMANDS = (predict, rebind)
