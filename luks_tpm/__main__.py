"""The boundary: user errors become one line plus a hint (or, with --json, a JSON error on stdout) and
their exit code; bugs show a traceback only with -v. Logging goes to stderr; key material never reaches it."""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING

from .errors import ExitCode, LuksTpmError

if TYPE_CHECKING:
    from .cli import Globals


def apply_verbosity(options: Globals) -> None:
    """Logging for -v/-vv, once the command line is parsed; -vv also turns on libcryptsetup's debug log."""
    logging.basicConfig(level=logging.DEBUG if options.verbose > 1 else logging.INFO if options.verbose
                        else logging.WARNING, format="luks-tpm: %(name)s: %(message)s", force=True)
    if options.verbose > 1:
        from . import cryptsetup

        cryptsetup.set_debug(True)
    if options.verbose and "luks_tpm.tpm.context" in sys.modules:
        _say_tss_log_overridden()


def _say_tss_log_overridden() -> None:
    from .tpm import USER_TSS2_LOG

    if USER_TSS2_LOG not in (None, "", "all+NONE"):
        logging.getLogger("luks_tpm").info("ignoring TSS2_LOG=%s: the TSS's own trace can print key material",
                                           USER_TSS2_LOG)


def _error(options: Globals, message: str, hint: str | None, code: int) -> None:
    if options.json:
        print(json.dumps({"version": 1, "error": {"message": message, "hint": hint, "code": code}}, indent=2))
    else:
        print(f"luks-tpm: {message}", file=sys.stderr)
        if hint:
            print(f"luks-tpm: hint: {hint}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    if _is_request_key(sys.argv[1:] if argv is None else argv):  # a kernel upcall: no click, nothing slow
        from .requestkey import main as request_key

        sys.exit(request_key(sys.argv[1:] if argv is None else argv))
    import click

    from . import cli
    from .secret import make_undumpable

    # Every command may hold key material: no core dumps, no ptrace by unprivileged processes.
    make_undumpable()
    args = sys.argv[1:] if argv is None else argv
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
    """`[--tcti SPEC | --tcti=SPEC] request-key KEY TYPE DESCRIPTION CALLOUT SESSION`, as request-key.conf runs it."""
    rest = args[2:] if args[:1] == ["--tcti"] else args[1:] if args[:1] and args[0].startswith("--tcti=") else args
    return len(rest) == 6 and rest[0] == "request-key"


if __name__ == "__main__":
    main()
