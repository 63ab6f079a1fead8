"""What commands tell the user: a `Report` (data for --json, lines for people) and progress on stderr."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

from .errors import ExitCode, LuksTpmError, UnlockFailed
from .secret import Secret


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


JSON_VERSION = 1  # docs/json.md: bumped when a field changes meaning or goes away
_MARKER = "@@LUKS-TPM-RECOVERY-KEY@@"


@dataclasses.dataclass(frozen=True)
class Report:
    data: dict[str, Any]
    lines: list[str]
    # A recovery key to show once. It is written from its Secret as bytes (spliced into the JSON as
    # "recovery_key"), so it never becomes a str; emit() closes it.
    recovery_key: Secret | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)  # on stderr, and in JSON as "warnings"
    exit_code: ExitCode = ExitCode.OK  # e.g. status: 5 when some volume would not unlock now

    def emit(self, as_json: bool) -> None:
        for warning in self.warnings:
            progress(f"warning: {warning}")
        if as_json:
            data = {"version": JSON_VERSION, **self.data}
            if self.warnings:
                data["warnings"] = self.warnings
            if self.recovery_key is not None:
                data["recovery_key"] = _MARKER
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"
            before, _, after = text.partition(_MARKER)
            _write(before.encode(), self.recovery_key, after.encode())
        else:
            for line in self.lines:
                print(line)
            if self.recovery_key is not None:
                progress("recovery key (shown once; write it down and keep it away from this machine):")
                _write(b"", self.recovery_key, b"\n")
                progress("it opens the volume with plain cryptsetup if the TPM is cleared, replaced or broken")
        if self.recovery_key is not None:
            self.recovery_key.close()


def error_data(error: LuksTpmError) -> dict[str, Any]:
    """An error as JSON data (docs/json.md, "Errors"): the same words as on stderr, plus the cause to branch on."""
    data: dict[str, Any] = {
        "message": error.message,
        "hint": error.hint,
        "code": int(error.code),
        "cause": str(error.cause),
    }
    if isinstance(error, UnlockFailed):
        data["failures"] = [{"token": failure.token_id, **error_data(failure.error)} for failure in error.failures]
    return data


def error_json(error: dict[str, Any]) -> str:
    return json.dumps({"version": JSON_VERSION, "error": error}, indent=2, sort_keys=True)


def _write(before: bytes, secret: Secret | None, after: bytes) -> None:
    sys.stdout.flush()
    out = sys.stdout.fileno()
    os.write(out, before)
    if secret is not None:
        os.write(out, secret.view())
    os.write(out, after)


def progress(message: str) -> None:
    print(f"luks-tpm: {message}", file=sys.stderr, flush=True)
