"""User-facing errors: what went wrong (a `Cause`), one line saying so, one hint saying what to do, an exit code.

Errors are raised with their final words and never rewritten afterwards; `__main__` formats them once
(a line plus a hint, or JSON). Anything raised that is not a `LuksTpmError` is a bug in luks-tpm.
Messages never carry key material: callers pass descriptions, never buffers.
"""

from __future__ import annotations

import dataclasses
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
    INCOMPLETE = 9  # wipe/erase ran, but the check afterwards found a way in left or could not check
    UNPREDICTABLE = 10  # the next boot's PCR values cannot be predicted (or no event log to predict from)


class Cause(enum.StrEnum):
    """Why something failed, as data: callers branch on this, never on message text."""

    GENERIC = "generic"
    USAGE = "usage"
    DEVICE = "device"
    HEADER_CHANGED = "header-changed"  # another process wrote the header meanwhile
    HEADER_FULL = "header-full"
    CORRUPT_TOKEN = "corrupt-token"
    NO_TOKEN = "no-token"
    NO_TPM = "no-tpm"
    TPM_FAILED = "tpm-failed"
    LOCKED_OUT = "locked-out"
    WRONG_PIN = "wrong-pin"
    NEEDS_PIN = "needs-pin"
    PCR_CHANGED = "pcr-changed"
    FENCE_UP = "fence-up"
    POLICY = "policy"
    HIERARCHY_DISABLED = "hierarchy-disabled"
    CLEARED = "cleared"  # the owner hierarchy was cleared since the binding was made
    OTHER_TPM = "other-tpm"  # the binding belongs to another TPM
    SRK_CHANGED = "srk-changed"  # cleared or another TPM, and the EK cannot tell which
    WRONG_KEY = "wrong-key"  # the recovered key does not verify (re-encrypted volume, altered token)
    UNSUPPORTED = "unsupported"
    REFUSED = "refused"
    CLEAR_DISABLED = "clear-disabled"  # TPM2_Clear refused: disableClear is set
    WRONG_AUTH = "wrong-auth"  # a hierarchy's authorization (e.g. the lockout's) was wrong
    OWNER_AUTH = "owner-auth"  # the owner hierarchy has an authorization luks-tpm was not given
    UNPREDICTABLE = "unpredictable"  # the next boot's PCRs cannot be computed from the event log and files
    NO_EVENT_LOG = "no-event-log"  # no TCG event log to predict from (not a UEFI measured boot)
    NO_APPROVER = "no-approver"  # this system has no approver key for the tokens' approved states
    GUARD = "cross-volume-guard"  # recovered, but not used: another volume of the pass did not open from the TPM


# Failures that prove a binding can never recover its key again (on this TPM): such a token is not a
# way into the volume. Anything else (PCRs changed, a PIN needed, no TPM reachable now) may pass.
DEAD_CAUSES = frozenset({Cause.CORRUPT_TOKEN, Cause.CLEARED, Cause.OTHER_TPM, Cause.SRK_CHANGED, Cause.WRONG_KEY})


# The cause of an error raised without one, when its exit code has only one meaning (with --json,
# scripts read the cause: "generic" would tell them less than the code does).
_CAUSE_OF_CODE = {
    ExitCode.USAGE: Cause.USAGE,
    ExitCode.REFUSED: Cause.REFUSED,
    ExitCode.LOCKED_OUT: Cause.LOCKED_OUT,
    ExitCode.UNSUPPORTED: Cause.UNSUPPORTED,
}


class LuksTpmError(Exception):
    """An error caused by input or environment, not by a bug: shown as one line plus a hint."""

    def __init__(
        self,
        message: str,
        *,
        code: ExitCode,
        hint: str | None = None,
        cause: Cause | None = None,
        rc: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.cause = cause if cause is not None else _CAUSE_OF_CODE.get(code, Cause.GENERIC)
        self.rc = rc  # the TPM's response code, when the TPM said no

    def __str__(self) -> str:
        return self.message


def die(
    message: str,
    *,
    code: ExitCode,
    hint: str | None = None,
    cause: Cause | None = None,
    rc: int | None = None,
) -> NoReturn:
    """Raise a user-facing error. `code` is required: every failure says which kind it is (there is no
    default meaning, such as "device problem", to fall into)."""
    raise LuksTpmError(message, hint=hint, code=code, cause=cause, rc=rc)


@dataclasses.dataclass(frozen=True)
class TokenFailure:
    token_id: int
    error: LuksTpmError


class UnlockFailed(LuksTpmError):
    """No token of a volume recovered its key; `failures` says why for each, as data."""

    def __init__(self, device: str, failures: list[TokenFailure]) -> None:
        reasons = "; ".join(f"token {failure.token_id}: {failure.error.message}" for failure in failures)
        hints = list(dict.fromkeys(failure.error.hint for failure in failures if failure.error.hint))
        codes = {failure.error.code for failure in failures}
        # One kind of failure keeps its own exit code (lockout, corrupt token, ...); a mix is "unlock failed".
        code = codes.pop() if len(codes) == 1 else ExitCode.UNLOCK_FAILED
        super().__init__(
            f"cannot unlock {device} with the TPM: {reasons}",
            hint="; ".join([*hints, "the recovery key or passphrase still opens it (`cryptsetup open`)"]),
            code=code,
            cause=failures[0].error.cause if len(failures) == 1 else Cause.GENERIC,
        )
        self.device = device
        self.failures = failures
