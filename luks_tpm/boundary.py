"""The one boundary: every way into luks-tpm (the command line, the boot scripts' lines, the kernel's
request-key upcall) runs its work here, and only here do failures become output and exit codes.

A `LuksTpmError` is the user's or the environment's: its message, hint and exit code. An interruption is
130. Anything else is a bug in luks-tpm: exit 1, a traceback only when asked for. Where the outcome goes
is the caller's `Sink`: the terminal (text or --json), or syslog and the keyring for the upcall.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import NoReturn, Protocol

from .errors import ExitCode, LuksTpmError
from .output import ErrorInfo, Report, printable, write, write_error

INTERRUPTED = 130


class Sink(Protocol):
    @property
    def verbose(self) -> int: ...  # -v: a bug shows its traceback

    def succeeded(self, report: Report | None) -> int: ...

    def failed(self, error: ErrorInfo, cause: BaseException) -> int: ...


class Presentation(Protocol):
    """How the person asked to be told: --json, -v (read when the outcome is written: parsing sets them)."""

    @property
    def json(self) -> bool: ...

    @property
    def verbose(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Plain:
    """The presentation of a line without --json or -v (the boot scripts' lines)."""

    json: bool = False
    verbose: int = 0


class Console:
    """The terminal: the report on stdout (text or JSON), errors as one line plus a hint on stderr (or
    the JSON error object on stdout)."""

    def __init__(self, presentation: Presentation) -> None:
        self._presentation = presentation

    @property
    def verbose(self) -> int:
        return self._presentation.verbose

    def succeeded(self, report: Report | None) -> int:
        if report is None:  # click printed all there was (--help, --version)
            return ExitCode.OK
        write(report, self._presentation.json)
        return report.exit_code

    def failed(self, error: ErrorInfo, cause: BaseException) -> int:
        shown = getattr(cause, "shown", None)  # a command line click refused: its own words, with usage
        if shown is not None and not self._presentation.json:
            for line in shown.splitlines():
                print(printable(line), file=sys.stderr)
        elif error.code == INTERRUPTED and not self._presentation.json:
            pass  # the terminal already shows ^C
        else:
            if error.code == ExitCode.BUG and self._presentation.verbose:
                import traceback  # here: only bugs show one

                traceback.print_exception(cause)
            write_error(error, self._presentation.json)
        return error.code


def run(work: Callable[[], Report | None], sink: Sink) -> int:
    """Do the work; its report or its failure goes to `sink`, which says the exit code."""
    try:
        report = work()
    except LuksTpmError as error:
        return sink.failed(ErrorInfo.of(error), error)
    except KeyboardInterrupt as interrupt:
        return sink.failed(ErrorInfo("interrupted", None, INTERRUPTED, None), interrupt)
    except Exception as bug:
        hint = "please report it, with the traceback above" if sink.verbose else "rerun with -v and report it"
        return sink.failed(ErrorInfo(f"internal error ({type(bug).__name__})", hint, ExitCode.BUG, None), bug)
    try:
        return sink.succeeded(report)
    finally:
        if report is not None and report.recovery_key is not None:
            report.recovery_key.close()


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown (a tenth of an unlock's time). By now the `with` blocks have
    closed every key, TPM handle and device; what is left is memory that the kernel takes back, of a
    process nobody can dump (tests/test_bus_and_memory.py looks for key copies at exit_group)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 120  # what the interpreter's own exit does when the last flush fails
    os._exit(code)
