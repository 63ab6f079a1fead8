"""The boundary: user errors become one line plus a hint (or, with --json, a JSON error on stdout) and
their exit code; bugs show a traceback only with -v. Logging goes to stderr; key material never reaches it."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from .errors import ExitCode, LuksTpmError

if TYPE_CHECKING:
    from .cli import Globals


def _error(options: Globals, message: str, hint: str | None, code: int) -> None:
    if options.json:
        print(json.dumps({"version": 1, "error": {"message": message, "hint": hint, "code": code}}, indent=2))
    else:
        print(f"luks-tpm: {message}", file=sys.stderr)
        if hint:
            print(f"luks-tpm: hint: {hint}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if _is_request_key(args):  # a kernel upcall: no click, nothing slow (see requestkey.py)
        from .requestkey import main as request_key

        sys.exit(request_key(args))
    import click

    from . import cli
    from .secret import make_undumpable

    # Every command may hold key material: no core dumps, no ptrace by unprivileged processes.
    make_undumpable()
    options = cli.Globals()
    try:
        cli.main.main(args, prog_name="luks-tpm", standalone_mode=False, obj=options)
    except LuksTpmError as error:
        _error(options, error.message, error.hint, error.code)
    except click.exceptions.Abort:
        _error(options, "aborted", None, ExitCode.REFUSED)
    except click.ClickException as error:
        if options.json:
            _error(options, error.format_message(), None, ExitCode.USAGE)
        error.show()
        sys.exit(ExitCode.USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # a bug: say so, and show where only when asked
        if options.verbose:
            raise
        _error(options, f"internal error ({type(error).__name__}); rerun with -v and report it", None, ExitCode.BUG)


def _is_request_key(args: list[str]) -> bool:
    """`[--tcti SPEC | --tcti=SPEC] request-key KEY TYPE DESCRIPTION CALLOUT SESSION`, as request-key.conf runs
    it: the one fixed, machine-made argv shape dispatched before the command line is parsed."""
    rest = args[2:] if args[:1] == ["--tcti"] else args[1:] if args[:1] and args[0].startswith("--tcti=") else args
    return len(rest) == 6 and rest[0] == "request-key"


if __name__ == "__main__":
    main()
