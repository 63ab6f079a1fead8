"""User-facing errors: one line saying what is wrong, one hint saying what to do, and an exit code.

Anything raised that is not a `LuksTpmError` is a bug in luks-tpm and is shown as such by `__main__`.
Messages never carry key material: callers pass descriptions, never buffers.
"""

from __future__ import annotations

import enum
from typing import NoReturn


class ExitCode(enum.IntEnum):
    OK = 0
    BUG = 1  # an unexpected exception: please report it
    USAGE = 2  # bad command line (also click's own code)
    DEVICE = 3  # device missing, unreadable, read-only, not LUKS2, corrupt header or token
    TPM_UNAVAILABLE = 4  # no TPM reachable through the TCTI, or it lacks what is needed
    UNLOCK_FAILED = 5  # no binding could recover the volume key (PCRs changed, other TPM, cleared, wrong PIN)
    LOCKED_OUT = 6  # the TPM is in dictionary-attack lockout
    REFUSED = 7  # the operation would lose a way into the volume, or the user declined
    UNSUPPORTED = 8  # LUKS1, a future token version, no device-mapper here, missing kernel feature


class LuksTpmError(Exception):
    """An error caused by input or environment, not by a bug: shown as one line plus a hint."""

    def __init__(self, message: str, *, hint: str | None = None, code: ExitCode = ExitCode.DEVICE) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return self.message


def die(message: str, *, hint: str | None = None, code: ExitCode = ExitCode.DEVICE) -> NoReturn:
    raise LuksTpmError(message, hint=hint, code=code)
