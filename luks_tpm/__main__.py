"""The boundary: user errors become one line plus a hint and their exit code; bugs show a traceback
only with -v. Logging goes to stderr; key material never reaches it."""

from __future__ import annotations

import logging
import sys

from .errors import ExitCode, LuksTpmError


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
    verbose = cli.verbosity(args)
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                        format="luks-tpm: %(name)s: %(message)s")
    try:
        cli.main.main(args, prog_name="luks-tpm", standalone_mode=False)
    except LuksTpmError as error:
        report = getattr(error, "report", None)
        if report is not None:
            report.emit(cli_json(args))
        print(f"luks-tpm: {error.message}", file=sys.stderr)
        if error.hint:
            print(f"luks-tpm: hint: {error.hint}", file=sys.stderr)
        sys.exit(error.code)
    except click.exceptions.Abort:
        print("luks-tpm: aborted", file=sys.stderr)
        sys.exit(ExitCode.REFUSED)
    except click.ClickException as error:
        error.show()
        sys.exit(ExitCode.USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # a bug: say so, and show where only when asked
        if verbose:
            raise
        print(f"luks-tpm: internal error ({type(error).__name__}); rerun with -v and report it", file=sys.stderr)
        sys.exit(ExitCode.BUG)


def _is_request_key(args: list[str]) -> bool:
    """`[--tcti SPEC | --tcti=SPEC] request-key KEY TYPE DESCRIPTION CALLOUT SESSION`, as request-key.conf runs it."""
    rest = args[2:] if args[:1] == ["--tcti"] else args[1:] if args[:1] and args[0].startswith("--tcti=") else args
    return len(rest) == 6 and rest[0] == "request-key"


def cli_json(args: list[str]) -> bool:
    return "--json" in args


if __name__ == "__main__":
    main()
