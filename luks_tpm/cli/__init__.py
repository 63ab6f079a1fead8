"""The command line: click's definitions are the only place that knows the options. Each command parses,
builds frozen settings, calls one function and returns its Report; the boundary (luks_tpm.boundary)
writes it. The commands live in modules by group, each command's help beside it.

The global options (--tcti, --json, -v/--verbose, --debug) are accepted before and after the command
name, in one parse: each command carries them, and their callbacks fill the one `Globals` object the
boundary also reads.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from ..errors import Cause, ExitCode, LuksTpmError
from ..output import Report, configure_logging
from ..settings import tcti_from_environment


@dataclasses.dataclass
class Globals:
    tcti_option: str | None = None
    json: bool = False
    verbose: int = 0

    @property
    def tcti(self) -> str:
        return tcti_from_environment(self.tcti_option, dict(os.environ))


class CommandLineError(LuksTpmError):
    """A command line click refused (exit 2); `shown` is what click would print for it, for the text form."""

    def __init__(self, message: str, hint: str | None, shown: str) -> None:
        super().__init__(message, hint=hint, code=ExitCode.USAGE, cause=Cause.USAGE)
        self.shown = shown


def options() -> Globals:
    """The Globals of the command line being run."""
    found = click.get_current_context().find_object(Globals)
    assert found is not None, "the CLI runs with a Globals object (see run)"
    return found


def _set_tcti(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_object(Globals).tcti_option = value  # type: ignore[union-attr]


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Globals).json = True  # type: ignore[union-attr]


def _add_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    ctx.find_object(Globals).verbose += value  # type: ignore[union-attr]


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    found = ctx.find_object(Globals)
    if value and found is not None:
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
        return "--json" in rest[: rest.index("--")] if "--" in rest else "--json" in rest  # an unknown command
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
        configure_logging(options().verbose)
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # raised by the command's own checks: say which command's usage
            if error.ctx is None:
                error.ctx = ctx
            raise


class _Group(_JsonOnParseErrors, click.Group):
    command_class = _Command

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:  # no such command: --json anywhere on the line counts
            found = ctx.find_object(Globals)
            if found is not None and json_requested(self, ctx, [*ctx.protected_args, *args]):
                found.json = True
            raise


def command(name: str | None = None, **settings: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """click.command for luks-tpm's commands: logging set up, --json honoured on parse errors, and the
    global options carried (they may stand after the command name)."""

    def decorate(function: Callable[..., Any]) -> click.Command:
        # The global options go after the command's own in --help, as if applied first.
        own = getattr(function, "__click_params__", [])
        function.__click_params__ = []  # type: ignore[attr-defined]
        global_options(function)
        function.__click_params__ += own  # type: ignore[attr-defined]
        return click.command(name, cls=_Command, **settings)(function)

    return decorate


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
    erase done but its check found something left, 10 the next boot cannot be
    predicted (predict, rebind).

    \b
    Servers: `enroll --mode sealed --boot-chain --fence` binds to shim, GRUB,
    the kernel and its command line through approved states that `rebind`
    keeps current across updates (docs/boot-chain.md).
    """


def run(args: list[str], globals_: Globals) -> Report | None:
    """Parse `args` and run the command: its Report, or None when click printed all there was to say
    (--help, --version). click's own errors become LuksTpmErrors for the boundary."""
    try:
        report = main.main(args, prog_name="luks-tpm", standalone_mode=False, obj=globals_)
    except click.exceptions.Abort:  # Ctrl-C or end of input at a prompt
        raise LuksTpmError("aborted", code=ExitCode.REFUSED, cause=Cause.REFUSED) from None
    except click.ClickException as error:
        context = getattr(error, "ctx", None)
        hint = f"see `{context.command_path} --help`" if context is not None else None
        shown = io.StringIO()
        error.show(file=shown)
        raise CommandLineError(error.format_message(), hint, shown.getvalue()) from None
    return report if isinstance(report, Report) else None


def _register() -> None:
    from . import bind, bootchain, decommission, system, unlock

    for module in (unlock, bind, bootchain, decommission, system):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
