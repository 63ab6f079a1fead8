"""TPM and TSS response codes in words: one table for every command, and `TpmError`, the error it gives.

A code means something different depending on what was asked and who authorized it (a wrong lockout
authorization is not a wrong PIN): callers say what they were doing and, where it matters, the subject.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import Cause, ExitCode, LuksTpmError
from .esys import TssError, lib

_LAYER_MASK = 0xFF0000
_TPM_LAYER, _ESYS_LAYER, _SYS_LAYER, _MU_LAYER, _TCTI_LAYER = 0x000000, 0x070000, 0x080000, 0x090000, 0x0A0000
_RESMGR_TPM_LAYER = 0x0C0000  # a resource manager passing on the TPM's own code
_ESYS_RC_BAD_VALUE = 0x07000B  # ESYS could not check something it was given
_BAD_SEQUENCE = 0x000007  # ESYS or SYS "called in the wrong order": an earlier command broke the connection


class NoAnswer(TssError):
    """A TPM command that ran past the watchdog's deadline (watchdog.py), with the TSS's own error."""

    def __init__(self, error: TssError, seconds: float) -> None:
        super().__init__(error.rc)
        self.seconds = seconds


_LOCKOUT_HINT = (
    "wait for the lockout to lift (`luks-tpm doctor` shows when) or reset it with the lockout "
    "authorization (`tpm2_dictionarylockout --clear-lockout`)"
)
# TPM return code -> (cause, message before "(doing)", hint, exit code). One table for every command.
# A key (code, subject) is the meaning of that code when the command is authorized by `subject` (e.g.
# LOCKOUT: a wrong lockout authorization, not a wrong PIN); it wins over the plain code's entry.
_RC_TABLE: dict[int | tuple[int, str], tuple[Cause, str, str | None, ExitCode]] = {
    lib.TPM2_RC_LOCKOUT: (
        Cause.LOCKED_OUT,
        "the TPM is in dictionary-attack lockout",
        _LOCKOUT_HINT,
        ExitCode.LOCKED_OUT,
    ),
    lib.TPM2_RC_AUTH_FAIL: (Cause.WRONG_PIN, "wrong PIN", None, ExitCode.UNLOCK_FAILED),
    lib.TPM2_RC_BAD_AUTH: (Cause.WRONG_PIN, "wrong PIN", None, ExitCode.UNLOCK_FAILED),
    lib.TPM2_RC_POLICY_FAIL: (
        Cause.POLICY,
        "the TPM policy is not satisfied",
        "PCR values differ from those the key was bound to; `luks-tpm status` names them",
        ExitCode.UNLOCK_FAILED,
    ),
    lib.TPM2_RC_PCR_CHANGED: (
        Cause.POLICY,
        "PCR values changed while the policy was checked",
        "try again",
        ExitCode.UNLOCK_FAILED,
    ),
    lib.TPM2_RC_HIERARCHY: (
        Cause.HIERARCHY_DISABLED,
        "the TPM owner hierarchy is disabled",
        "enable it in the firmware's TPM settings",
        ExitCode.TPM_UNAVAILABLE,
    ),
    lib.TPM2_RC_INTEGRITY: (
        Cause.SRK_CHANGED,
        "the TPM rejected the sealed object: it was made by another TPM or before the owner hierarchy was cleared",
        "unlock with the recovery key and re-enroll",
        ExitCode.UNLOCK_FAILED,
    ),
}
for _same in (lib.TPM2_RC_KEY, lib.TPM2_RC_BINDING):
    _RC_TABLE[_same] = _RC_TABLE[lib.TPM2_RC_INTEGRITY]

# TPM2_Clear authorized with the lockout hierarchy (luks-tpm wipe). Only the platform hierarchy can
# CLEAR disableClear again (the lockout hierarchy may only set it; TPM 2.0 Part 3, TPM2_ClearControl).
LOCKOUT = "lockout"
_CLEAR_DISABLED_HINT = (
    'only the platform can re-enable it: use the firmware\'s "clear TPM" option (TCG '
    "physical presence), or `tpm2_clearcontrol -C p c` where the platform hierarchy is "
    "still open (in the firmware, or on a software TPM)"
)
_RC_TABLE.update(
    {
        lib.TPM2_RC_DISABLED: (
            Cause.CLEAR_DISABLED,
            "TPM2_Clear is disabled on this TPM (disableClear is set)",
            _CLEAR_DISABLED_HINT,
            ExitCode.TPM_UNAVAILABLE,
        ),
        (lib.TPM2_RC_AUTH_FAIL, LOCKOUT): (
            Cause.WRONG_AUTH,
            "the TPM refused the lockout authorization",
            "give the right one with --lockout-auth-file (exact bytes); after a wrong try the TPM accepts none "
            "until its lockout recovery time has passed",
            ExitCode.REFUSED,
        ),
        (lib.TPM2_RC_LOCKOUT, LOCKOUT): (
            Cause.LOCKED_OUT,
            "the TPM accepts no lockout authorization now, after an earlier wrong one",
            "wait until the TPM's lockout recovery time has passed (a time of 0 means until the next reboot), "
            "or clear the TPM from the firmware's TPM settings",
            ExitCode.LOCKED_OUT,
        ),
    }
)
_RC_TABLE[(lib.TPM2_RC_BAD_AUTH, LOCKOUT)] = _RC_TABLE[(lib.TPM2_RC_AUTH_FAIL, LOCKOUT)]

# Commands authorized by the owner hierarchy (creating the SRK and derived primaries, persisting the SRK)
# with the empty authorization: a refusal means the owner hierarchy has an authorization of its own
# (tpm2_changeauth -c o), not a wrong PIN. Hierarchy authorizations are exempt from dictionary-attack
# protection (TPM 2.0 Part 1, "Dictionary Attack Protection"), so trying costs nothing.
OWNER = "owner"
OWNER_AUTH_HINT = (
    "creating the SRK needs it: give it with --owner-auth-file (persist-srk, enroll --mode sealed, reseal); "
    "sealed bindings under the persistent SRK then unlock without it. Derived bindings re-create their key "
    "in the owner hierarchy at every unlock: they need the owner authorization empty (`tpm2_changeauth -c o -p OLD`)"
)
_RC_TABLE[(lib.TPM2_RC_BAD_AUTH, OWNER)] = (
    Cause.OWNER_AUTH,
    "the TPM's owner hierarchy has an authorization set, which luks-tpm was not given",
    OWNER_AUTH_HINT,
    ExitCode.TPM_UNAVAILABLE,
)
_RC_TABLE[(lib.TPM2_RC_AUTH_FAIL, OWNER)] = _RC_TABLE[(lib.TPM2_RC_BAD_AUTH, OWNER)]


class TpmError(LuksTpmError):
    """A failure the TPM (or the TSS talking to it) reported, in words; `rc` keeps the code."""


def known_error(rc: int, doing: str, subject: str | None = None) -> TpmError | None:
    """The table's words for a TPM response code (`subject`: who authorized the command), or None."""
    # Format-one codes carry a handle, parameter or session number beside the error number: drop it.
    base = 0x80 | (rc & 0x3F) if rc & 0x80 else rc & 0xFFF
    known = _RC_TABLE.get((base, subject)) if subject is not None else None
    known = known or _RC_TABLE.get(base)
    if known is None:
        return None
    cause, message, hint, code = known
    return TpmError(f"{message} ({doing})", hint=hint, code=code, cause=cause, rc=rc)


def translate(error: TssError, doing: str, subject: str | None = None) -> TpmError:
    rc, base = error.rc, error.error  # error: without the handle/parameter/session number
    layer = rc & _LAYER_MASK
    if isinstance(error, NoAnswer):
        return TpmError(
            f"the TPM did not answer within {error.seconds:g} s ({doing})",
            hint=f"check the TPM and what is at the TCTI (`luks-tpm doctor`); {TIMEOUT_HINT}",
            code=ExitCode.TPM_UNAVAILABLE,
            cause=Cause.NO_TPM,
            rc=rc,
        )
    known = known_error(rc & 0xFFFF, doing, subject) if layer in (_TPM_LAYER, _RESMGR_TPM_LAYER) else None
    if known is not None:
        return known
    if layer in (_ESYS_LAYER, _SYS_LAYER) and rc & 0xFFFF == _BAD_SEQUENCE:
        return TpmError(
            f"lost the connection to the TPM ({doing}): it broke on an earlier command",
            code=ExitCode.TPM_UNAVAILABLE,
            cause=Cause.NO_TPM,
            rc=rc,
        )
    if layer == _TCTI_LAYER:
        return TpmError(
            f"lost the connection to the TPM ({doing}): {error}",
            code=ExitCode.TPM_UNAVAILABLE,
            cause=Cause.NO_TPM,
            rc=rc,
        )
    if layer in (_SYS_LAYER, _MU_LAYER):  # the TPM's answer did not parse (token data: see token_data)
        return TpmError(
            f"the TPM's answer did not parse ({doing}): {error}",
            code=ExitCode.TPM_UNAVAILABLE,
            cause=Cause.TPM_FAILED,
            rc=rc,
        )
    if rc == _ESYS_RC_BAD_VALUE:  # ESYS refused what it was given: a value from a damaged token
        return TpmError(
            f"malformed TPM data ({doing}): {error}", code=ExitCode.DEVICE, cause=Cause.CORRUPT_TOKEN, rc=rc
        )
    if layer == _TPM_LAYER and base in _MALFORMED:  # the TPM refused the structure itself
        return TpmError(
            f"the TPM rejected malformed data ({doing}): {error}",
            code=ExitCode.DEVICE,
            cause=Cause.CORRUPT_TOKEN,
            rc=rc,
        )
    return TpmError(f"the TPM failed {doing}: {error}", code=ExitCode.TPM_UNAVAILABLE, cause=Cause.TPM_FAILED, rc=rc)


_MALFORMED = {
    lib.TPM2_RC_SIZE,
    lib.TPM2_RC_VALUE,
    lib.TPM2_RC_TYPE,
    lib.TPM2_RC_ATTRIBUTES,
    lib.TPM2_RC_SCHEME,
    lib.TPM2_RC_KDF,
    lib.TPM2_RC_SYMMETRIC,
    lib.TPM2_RC_HASH,
    lib.TPM2_RC_INSUFFICIENT,
}


TIMEOUT_HINT = "LUKS_TPM_TPM_TIMEOUT=SECONDS sets the bound"


@contextmanager
def tpm_errors(doing: str, subject: str | None = None) -> Iterator[None]:
    try:
        yield
    except TssError as error:
        raise translate(error, doing, subject) from None


@contextmanager
def token_data(doing: str) -> Iterator[None]:
    """For TPM structures read from a token (a sealed blob): one that does not unmarshal is the token's
    damage (exit 3), not the TPM's."""
    try:
        yield
    except TssError as error:
        raise TpmError(
            f"malformed TPM data ({doing}): {error}",
            code=ExitCode.DEVICE,
            cause=Cause.CORRUPT_TOKEN,
            rc=error.rc,
        ) from None
