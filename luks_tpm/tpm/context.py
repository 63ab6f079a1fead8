"""One connection to the TPM: handle lifetime, sessions, and TPM return codes turned into words.

A `Tpm` remembers every transient object and session it creates and flushes them on every exit path:
without a resource manager (swtpm on a socket, or /dev/tpm0) leaked handles exhaust the TPM after
three. Sessions that carry key material are salted with the SRK and encrypt response parameters
(AES-128-CFB). The TPM is reached through ESYS directly (see esys.py for why not tpm2-pytss's classes).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

# The TSS's own logging prints command and response buffers at debug/trace level, and ESYS's crypto
# trace prints decrypted parameters: the volume key. Force it off whatever the environment says; it
# is read when the TSS first logs, so this must happen before the TSS is loaded.
USER_TSS2_LOG = os.environ.get("TSS2_LOG")
os.environ["TSS2_LOG"] = "all+NONE"

from ..errors import Cause, ExitCode, LuksTpmError  # noqa: E402
from ..model import Parent  # noqa: E402
from ..secret import Secret, wipe  # noqa: E402
from .esys import NONE, Esys, TssError, ffi, lib  # noqa: E402

log = logging.getLogger(__name__)
if USER_TSS2_LOG not in (None, "", "all+NONE"):
    log.info("ignoring TSS2_LOG=%s: the TSS's own debug and trace output can print key material", USER_TSS2_LOG)

_LAYER_MASK = 0xFF0000
_TPM_LAYER, _MU_LAYER, _TCTI_LAYER = 0x000000, 0x090000, 0x0A0000
_ESYS_RC_BAD_VALUE = 0x07000B  # ESYS could not unmarshal or check something it was given


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
    known = known_error(rc, doing, subject) if rc & _LAYER_MASK == _TPM_LAYER else None
    if known is not None:
        return known
    layer = rc & _LAYER_MASK
    if layer == _TCTI_LAYER:
        return TpmError(
            f"lost the connection to the TPM ({doing}): {error}",
            code=ExitCode.TPM_UNAVAILABLE,
            cause=Cause.NO_TPM,
            rc=rc,
        )
    if layer == _MU_LAYER or rc == _ESYS_RC_BAD_VALUE:  # our input did not marshal: a damaged token
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


@contextmanager
def tpm_errors(doing: str, subject: str | None = None) -> Iterator[None]:
    try:
        yield
    except TssError as error:
        raise translate(error, doing, subject) from None


# ---- key material in C memory ----------------------------------------------------------------------


@functools.cache
def _rp_buffer_function() -> Any:
    """Tss2_Sys_GetRpBuffer: public libtss2-sys API that tpm2-pytss does not bind."""
    sys_library = ctypes.CDLL("libtss2-sys.so.1")
    function = sys_library.Tss2_Sys_GetRpBuffer
    function.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p)]
    function.restype = ctypes.c_uint32
    return function


def wipe_response_buffer(esys: Esys) -> None:
    """Zero the SAPI response buffer of an ESYS context.

    ESYS decrypts a response parameter (the HMAC result, the unsealed data) in place in the SAPI
    context's response buffer and leaves it there until the next response overwrites it, which a
    short one (FlushContext: 10 bytes) does not, and until Esys_Finalize frees it without zeroing.
    """
    sys_context = ffi.new("TSS2_SYS_CONTEXT **")
    if lib.Esys_GetSysContext(esys.context, sys_context) != 0:
        raise RuntimeError("Esys_GetSysContext failed: cannot zero the TPM response buffer")
    used, buffer = ctypes.c_size_t(), ctypes.c_void_p()
    address = int(ffi.cast("uintptr_t", sys_context[0]))
    if _rp_buffer_function()(address, ctypes.byref(used), ctypes.byref(buffer)) != 0 or not buffer.value:
        return
    if used.value:
        wipe((ctypes.c_char * used.value).from_address(buffer.value))


def secret_from_tpm2b(value: Any) -> Secret:
    """Copy a TPM2B that ESYS allocated into a Secret, then zero and free the allocation."""
    try:
        return Secret.copy_of(ffi.buffer(value.buffer, value.size))
    finally:
        ffi.memmove(value.buffer, bytes(len(value.buffer)), len(value.buffer))
        lib.Esys_Free(value)


def fill_tpm2b(target: Any, secret: Secret, what: str) -> None:
    """Copy a secret into a TPM2B's C buffer (zeroed by the caller when done)."""
    cdata = target
    if len(secret) > len(cdata.buffer):
        raise LuksTpmError(
            f"the {what} is too long: at most {len(cdata.buffer)} bytes", code=ExitCode.USAGE, cause=Cause.USAGE
        )
    ffi.memmove(cdata.buffer, secret.as_ctypes(), len(secret))
    cdata.size = len(secret)


def zero_c(cdata: Any) -> None:
    """Zero a cffi struct, given as the struct or a pointer to it."""
    pointer = cdata if ffi.typeof(cdata).kind == "pointer" else ffi.addressof(cdata)
    size = ffi.sizeof(pointer[0])
    ffi.memmove(pointer, bytes(size), size)


# ---- the connection -------------------------------------------------------------------------------


class Tpm:
    """One connection to the TPM; use as a context manager so everything it created is flushed.

    `srks` is the one cache of SRKs resolved on this connection (persistent handle or None -> handle
    and Parent), kept by luks_tpm.tpm.srk."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._flush: list[Any] = []
        self.srks: dict[int | None, tuple[Any, Parent]] = {}
        self.warnings: list[str] = []  # said once per command by the caller (e.g. a missing persistent SRK)
        self.endorsement: bytes | None = None  # the EK name, once computed (see srk.endorsement_name)
        self.endorsement_checked = False
        try:
            self.esys = Esys(tcti)
        except TssError as error:
            raise TpmError(
                f"no TPM reachable through TCTI '{tcti}' ({error})",
                hint="point luks-tpm at a TPM with --tcti or LUKS_TPM_TCTI (e.g. device:/dev/tpmrm0, "
                "swtpm:path=/run/swtpm.sock), and check that its TCTI library (libtss2-tcti-device0, "
                "libtss2-tcti-swtpm0) is installed; `luks-tpm doctor` checks",
                code=ExitCode.TPM_UNAVAILABLE,
                cause=Cause.NO_TPM,
                rc=error.error,
            ) from None

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        while self._flush:
            handle = self._flush.pop()
            try:
                self.esys.flush_context(handle)
            except TssError as error:
                log.debug("flushing %#x failed: %s", int(handle), error)
        self.srks.clear()
        self.esys.close()

    def track(self, handle: Any) -> Any:
        """Remember a transient handle so that close() flushes it."""
        self._flush.append(handle)
        return handle

    def flush(self, handle: Any) -> None:
        self._flush.remove(handle)
        with tpm_errors("flushing a transient object"):
            self.esys.flush_context(handle)

    def release(self, handle: Any) -> None:
        """Flush a handle now if it is still loaded (a session the TPM did not end because its command
        failed): without a resource manager three of them exhaust the TPM for the next token."""
        if handle in self._flush:
            self.flush(handle)

    @contextmanager
    def transient(self, handle: Any) -> Iterator[Any]:
        """A tracked handle flushed when the block ends."""
        self.track(handle)
        try:
            yield handle
        finally:
            self.flush(handle)

    @contextmanager
    def session(self, kind: Any, *, salt_key: Any = None) -> Iterator[Any]:
        """A session; with `salt_key` (an SRK handle) salted, encrypting commands and responses."""
        salted = salt_key is not None
        symmetric = ffi.new("TPMT_SYM_DEF *")
        symmetric.algorithm = lib.TPM2_ALG_AES if salted else lib.TPM2_ALG_NULL
        if salted:
            symmetric.keyBits.aes = 128
            symmetric.mode.aes = lib.TPM2_ALG_CFB
        with tpm_errors("starting a session"):
            session = self.esys.start_auth_session(salt_key if salted else NONE, kind, symmetric)
        self.track(session)
        if salted:
            self.esys.trsess_set_attributes(
                session,
                lib.TPMA_SESSION_CONTINUESESSION | lib.TPMA_SESSION_ENCRYPT | lib.TPMA_SESSION_DECRYPT,
            )
        try:
            yield session
        finally:
            if session in self._flush:  # not already ended by the TPM (see last_use)
                self.flush(session)

    @contextmanager
    def trial_session(self) -> Iterator[Any]:
        with self.session(lib.TPM2_SE_TRIAL) as session:
            yield session

    def last_use(self, session: Any) -> None:
        """Clear continueSession for the session's next command: on success the TPM ends the session
        itself, which saves a FlushContext (on failure the session stays and is flushed as usual)."""
        self.esys.trsess_set_attributes(session, 0, lib.TPMA_SESSION_CONTINUESESSION)

    def ended_by_tpm(self, session: Any) -> None:
        """Forget a session the TPM ended (continueSession was clear): free ESYS's record, no command."""
        self._flush.remove(session)
        self.esys.tr_close(session)

    def properties(self, first: int, count: int) -> dict[int, int]:
        with tpm_errors("reading TPM properties"):
            data = self.esys.get_capability(lib.TPM2_CAP_TPM_PROPERTIES, first, count)
        found = data.data.tpmProperties
        return {int(p.property): int(p.value) for p in found.tpmProperty[0 : found.count]}

    def handles(self, first: int, count: int = 64) -> list[int]:
        with tpm_errors("listing TPM handles"):
            data = self.esys.get_capability(lib.TPM2_CAP_HANDLES, first, count)
        return [int(h) for h in data.data.handles.handle[0 : data.data.handles.count]]
