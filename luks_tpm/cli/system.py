"""Commands about the machine rather than a volume: doctor, and request-key's help."""

from __future__ import annotations

import click

from ..errors import Cause, ExitCode, die
from ..output import Report
from . import command, options


@command()
def doctor() -> Report:
    """Check the TPM, SRK, lockout state, keyring, libcryptsetup and dm-crypt."""
    from ..doctor import doctor as run

    return run(options().tcti)


@command("request-key", context_settings={"ignore_unknown_options": True})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def request_key(arguments: tuple[str, ...]) -> Report:
    """Handler for /sbin/request-key: KEY TYPE DESCRIPTION CALLOUT SESSION_KEYRING.

    \b
    Run by the kernel, from /etc/request-key.d/luks-tpm.conf, as
      luks-tpm --tcti SPEC request-key %k %t %d %c %S
    when a program asks for a key that is not there (request_key(2)):
      logon cryptsetup:<uuid>-d<digest>  callout: the LUKS2 device, or -
      user  luks-tpm:app:<name>          callout: the length in bytes, 16-64
    It answers through the keyring, logs to syslog, and is of no use from a shell.
    """
    if len(arguments) == 5:
        message = "request-key acts for a key under construction, so only /sbin/request-key can run it"
    else:
        message = (
            f"request-key takes exactly KEY TYPE DESCRIPTION CALLOUT SESSION_KEYRING ({len(arguments)} given), "
            "and only /sbin/request-key can run it"
        )
    die(message, hint="see `luks-tpm request-key --help`", code=ExitCode.USAGE, cause=Cause.USAGE)


COMMANDS = (doctor, request_key)
