"""The boundary: user errors become one line plus a hint (or, with --json, a JSON error on stdout) and
their exit code; bugs show a traceback only with -v. Logging goes to stderr; key material never reaches it."""

from __future__ import annotations

import gc
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import Cause, ExitCode, LuksTpmError

if TYPE_CHECKING:
    from .fastpath import FastCommand


def _error(as_json: bool, error: dict[str, Any]) -> NoReturn:
    """Report an error (output.error_data's shape) as --json asked, or as one line plus a hint, and exit."""
    from .output import error_json

    if as_json:
        print(error_json(error))
    else:
        print(f"luks-tpm: {error['message']}", file=sys.stderr)
        if error["hint"]:
            print(f"luks-tpm: hint: {error['hint']}", file=sys.stderr)
    sys.exit(error["code"])


def _plain_error(message: str, hint: str | None, code: int, cause: str | None) -> dict[str, Any]:
    return {"message": message, "hint": hint, "code": code, "cause": cause}


def _bug(as_json: bool, verbose: bool, error: Exception) -> NoReturn:
    """A bug: say so, and show where only when asked."""
    if verbose:
        import traceback

        traceback.print_exc()
    hint = "please report it, with the traceback above" if verbose else "rerun with -v and report it"
    _error(as_json, _plain_error(f"internal error ({type(error).__name__})", hint, ExitCode.BUG, None))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # Start-up makes thousands of objects that live as long as the process, and an unlock frees few: the
    # cyclic collector would only walk them, several times per start-up.
    gc.disable()
    if _is_request_key(args):  # a kernel upcall: no click, nothing slow (see requestkey.py)
        from .requestkey import main as request_key

        _exit_now(request_key(args))
    from .fastpath import fast_command

    fast = fast_command(args)
    if fast is not None:  # a plain unlock command line: no click (see fastpath.py)
        _run_fast(fast)
    gc.enable()  # other commands may run long
    import click

    from . import cli
    from .output import error_data
    from .secret import make_undumpable

    # Every command may hold key material: no core dumps, no ptrace by unprivileged processes.
    make_undumpable()
    options = cli.Globals()
    try:
        cli.main.main(args, prog_name="luks-tpm", standalone_mode=False, obj=options)
    except LuksTpmError as error:
        _error(options.json, error_data(error))
    except click.exceptions.Abort:
        _error(options.json, _plain_error("aborted", None, ExitCode.REFUSED, str(Cause.REFUSED)))
    except click.ClickException as error:
        if options.json:
            context = getattr(error, "ctx", None)
            hint = f"see `{context.command_path} --help`" if context is not None else None
            _error(True, _plain_error(error.format_message(), hint, ExitCode.USAGE, str(Cause.USAGE)))
        error.show()
        sys.exit(ExitCode.USAGE)
    except KeyboardInterrupt:
        if options.json:
            _error(True, _plain_error("interrupted", None, 130, None))
        sys.exit(130)
    except Exception as error:
        _bug(options.json, options.verbose > 0, error)


def _run_fast(command: FastCommand) -> NoReturn:
    """A fast-path command under the same boundary as the CLI's (no -v on those lines)."""
    from .output import configure_logging, error_data
    from .secret import make_undumpable

    make_undumpable()
    configure_logging(0)
    try:
        report = command.run()
    except LuksTpmError as error:
        _error(command.json, error_data(error))
    except KeyboardInterrupt:
        if command.json:
            _error(True, _plain_error("interrupted", None, 130, None))
        sys.exit(130)
    except Exception as error:
        _bug(command.json, False, error)
    report.emit(command.json)
    _exit_now(report.exit_code)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown (a tenth of an unlock's time). By now the `with` blocks have
    closed every key, TPM handle and device; what is left is memory that the kernel takes back, of a
    process nobody can dump (tests/test_bus_and_memory.py looks for key copies at exit_group)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 120  # what the interpreter's own exit does when the last flush fails
    os._exit(code)


def _is_request_key(args: list[str]) -> bool:
    """`[--tcti SPEC | --tcti=SPEC] request-key KEY TYPE DESCRIPTION CALLOUT SESSION`, as request-key.conf runs
    it: the one fixed, machine-made argv shape dispatched before the command line is parsed."""
    rest = args[2:] if args[:1] == ["--tcti"] else args[1:] if args[:1] and args[0].startswith("--tcti=") else args
    return len(rest) == 6 and rest[0] == "request-key"


if __name__ == "__main__":
    main()
