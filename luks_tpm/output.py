"""What commands tell: a `Report` of a typed result, written as JSON or as text lines; errors; progress.

A command's result is a frozen dataclass. The JSON writer reads its fields (docs/json.md and
json-schema.json are the contract), the text writer its `lines()`: one value, two renderings, and
neither the command nor the result writes anything itself. Warnings and progress go to stderr.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import sys
from pathlib import PurePath
from typing import Any, Protocol

from .errors import ExitCode, LuksTpmError, UnlockFailed
from .secret import Secret

JSON_VERSION = 1  # docs/json.md: bumped when a field changes meaning or goes away
# Field metadata: leave the field out of the JSON object when its value is None; or always (a field only
# the text rendering reads).
OMIT_IF_NONE = {"omit_if_none": True}
TEXT_ONLY = {"text_only": True}


class Absent(enum.Enum):
    """A field's value when the field is left out of the JSON object, where null means something else."""

    ABSENT = "absent"


ABSENT = Absent.ABSENT
_MARKER = "@@LUKS-TPM-RECOVERY-KEY@@"


class Result(Protocol):
    """A command's result: a frozen dataclass whose fields are its JSON object."""

    def lines(self) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class Report:
    """A command's outcome, for the boundary to write."""

    result: Result
    warnings: tuple[str, ...] = ()  # on stderr, and in JSON as "warnings"
    exit_code: ExitCode = ExitCode.OK  # e.g. status: 5 when some volume would not unlock now
    # A recovery key to show once: written from its Secret as bytes (spliced into the JSON as
    # "recovery_key"), never as a str. Its owner (the boundary) closes it after writing.
    recovery_key: Secret | None = None


@dataclasses.dataclass(frozen=True)
class ErrorInfo:
    """An error as data (docs/json.md, "Errors"): the same words as on stderr, plus the cause to branch on."""

    message: str
    hint: str | None
    code: int
    cause: str | None
    failures: tuple[TokenFailureInfo, ...] | None = dataclasses.field(default=None, metadata=OMIT_IF_NONE)

    @classmethod
    def of(cls, error: LuksTpmError) -> ErrorInfo:
        failures = None
        if isinstance(error, UnlockFailed):
            failures = tuple(TokenFailureInfo.of(failure.token_id, failure.error) for failure in error.failures)
        return cls(error.message, error.hint, int(error.code), str(error.cause), failures)


@dataclasses.dataclass(frozen=True)
class TokenFailureInfo:
    token: int
    message: str
    hint: str | None
    code: int
    cause: str | None

    @classmethod
    def of(cls, token_id: int, error: LuksTpmError) -> TokenFailureInfo:
        return cls(token_id, error.message, error.hint, int(error.code), str(error.cause))


def printable(text: str) -> str:
    """`text` for a terminal: what would move the cursor, change colours or start a new line (a crafted
    header's `created`, a crypttab's bytes) shown as escapes instead. Bytes that are not UTF-8 (kept as
    surrogates when read) show as \\xNN. The JSON form needs none of this: JSON escapes them itself."""
    if text.isprintable():
        return text
    shown = []
    for char in text:
        code = ord(char)
        if char.isprintable():
            shown.append(char)
        elif 0xDC80 <= code <= 0xDCFF:
            shown.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            shown.append(f"\\x{code:02x}")
        else:
            shown.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(shown)


def json_value(value: Any) -> Any:
    """A result (or any part of one) as JSON data: dataclasses field by field, enums by value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: json_value(getattr(value, field.name))
            for field in dataclasses.fields(value)
            if not field.metadata.get("text_only")
            and getattr(value, field.name) is not ABSENT
            and not (field.metadata.get("omit_if_none") and getattr(value, field.name) is None)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, PurePath):
        return str(value)
    return value


def write(report: Report, as_json: bool) -> None:
    """The report on stdout (its warnings on stderr)."""
    for warning in report.warnings:
        progress(f"warning: {warning}")
    if as_json:
        data = {"version": JSON_VERSION, **json_value(report.result)}
        if report.warnings:
            data["warnings"] = list(report.warnings)
        if report.recovery_key is not None:
            data["recovery_key"] = _MARKER
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        before, _, after = text.partition(_MARKER)
        _write(before.encode(), report.recovery_key, after.encode())
        return
    for line in report.result.lines():
        print(printable(line))
    if report.recovery_key is not None:
        progress("recovery key (shown once; write it down and keep it away from this machine):")
        _write(b"", report.recovery_key, b"\n")
        progress("it opens the volume with plain cryptsetup if the TPM is cleared, replaced or broken")


def write_error(error: ErrorInfo, as_json: bool) -> None:
    """An error as --json asked: the error object on stdout, or one line plus a hint on stderr."""
    if as_json:
        print(json.dumps({"version": JSON_VERSION, "error": json_value(error)}, indent=2, sort_keys=True))
        return
    print(f"luks-tpm: {printable(error.message)}", file=sys.stderr)
    if error.hint:
        print(f"luks-tpm: hint: {printable(error.hint)}", file=sys.stderr)


def _write(before: bytes, secret: Secret | None, after: bytes) -> None:
    sys.stdout.flush()
    out = sys.stdout.fileno()
    os.write(out, before)
    if secret is not None:
        os.write(out, secret.view())
    os.write(out, after)


def progress(message: str) -> None:
    print(f"luks-tpm: {printable(message)}", file=sys.stderr, flush=True)


def configure_logging(verbose: int) -> None:
    """Logging for -v/-vv, once the command line is parsed; -vv also turns on libcryptsetup's debug log."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="luks-tpm: %(name)s: %(message)s",
        force=True,
    )
    if verbose > 1:
        from . import cryptsetup

        cryptsetup.set_debug(True)
