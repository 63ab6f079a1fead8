"""One connection to the TPM: handle lifetime, sessions, and the C memory that holds key material.

A `Tpm` remembers every transient object and session it creates and flushes them on every exit path:
without a resource manager (swtpm on a socket, or /dev/tpm0) leaked handles exhaust the TPM after
three. A flush that fails keeps the handle remembered, and close() tries again; it never hides the
error that is being raised (cleanup after a lost connection fails too, and would otherwise be all the
user sees). Sessions that carry key material are salted with the SRK and encrypt response parameters
(AES-128-CFB). The TPM is reached through ESYS directly (see esys.py for why not tpm2-pytss's classes),
the TCTI checked first (tcti.py) and every command bounded in time (watchdog.py).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from ..clib import CLibrary, Convention
from ..errors import Cause, ExitCode, LuksTpmError
from ..model import Parent
from ..secret import Secret, zero
from . import tcti as tcti_string
from .esys import NONE, Esys, TssError, address, ffi, lib
from .responses import NoAnswer, TpmError, tpm_errors, translate
from .watchdog import WATCHDOG, open_sockets, timeout_seconds

log = logging.getLogger(__name__)

# ---- key material in C memory ----------------------------------------------------------------------


# Tss2_Sys_GetRpBuffer: public libtss2-sys API that tpm2-pytss does not bind.
_sys = CLibrary(
    "libtss2-sys.so.1",
    {
        "Tss2_Sys_GetRpBuffer": (
            ctypes.c_uint32,
            [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p)],
        ),
    },
    convention=Convention.ZERO_IS_SUCCESS,
)


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
    # Not _sys.call: after a command that got no response (a cut connection) there is no buffer to zero,
    # and that must not hide the command's own error.
    rc = _sys.function("Tss2_Sys_GetRpBuffer")(address(sys_context[0]), ctypes.byref(used), ctypes.byref(buffer))
    if rc == 0 and used.value and buffer.value:
        zero((ctypes.c_char * used.value).from_address(buffer.value))


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

# Esys methods that only read or change ESYS's own records: no TPM command, nothing to wait for.
LOCAL_METHODS = frozenset(
    {"close", "tr_get_name", "tr_close", "tr_set_auth", "trsess_set_attributes", "trsess_get_attributes"}
)


class BoundedEsys(Esys):
    """Esys whose every TPM command (each public method but LOCAL_METHODS) runs under the watchdog's
    deadline; `baseline`: the sockets open before the connection began, which the watchdog leaves alone."""

    def __init__(self, tcti: str) -> None:
        self.baseline = open_sockets()
        try:
            with WATCHDOG.bound(f"connecting through TCTI '{tcti}'", self.baseline):
                super().__init__(tcti)
        except TssError as error:
            raise NoAnswer(error, timeout_seconds()) if WATCHDOG.expired() else error from None


def _bounded(name: str, method: Any) -> Any:
    def command(self: BoundedEsys, *args: Any) -> Any:
        try:
            with WATCHDOG.bound(f"TPM command {name}", self.baseline):
                return method(self, *args)
        except TssError as error:
            raise NoAnswer(error, timeout_seconds()) if WATCHDOG.expired() else error from None

    command.__name__ = command.__qualname__ = name
    command.__doc__ = method.__doc__
    return command


for _name, _method in vars(Esys).items():
    if callable(_method) and not _name.startswith("_") and _name not in LOCAL_METHODS:
        setattr(BoundedEsys, _name, _bounded(_name, _method))


class Tpm:
    """One connection to the TPM; use as a context manager so everything it created is flushed.

    `srks` is the one cache of SRKs resolved on this connection (persistent handle or None -> handle
    and Parent), kept by luks_tpm.tpm.srk."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._flush: list[Any] = []
        self.srks: dict[int | None, tuple[Any, Parent]] = {}
        self.proven_srks: set[bytes] = set()  # names of keys proven to be the standard SRK (see srk.py)
        self.warnings: list[str] = []  # said once per command by the caller (e.g. a missing persistent SRK)
        self.endorsement: bytes | None = None  # the EK name, once computed (see srk.endorsement_name)
        self.endorsement_checked = False
        tcti_string.check(tcti)  # before the TSS: the device TCTI writes into whatever its path is
        try:
            self.esys: Esys = BoundedEsys(tcti)
        except NoAnswer as error:
            raise translate(error, f"connecting through TCTI '{tcti}'") from None
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
        # Each handle gets a second try: a flush that failed once (already during the command, or now)
        # leaves its object in a TPM without resource manager, one of three slots. After a lost connection
        # every flush fails at once, without a command: the TPM (or its resource manager) cleans up then.
        for _ in range(2):
            failed = []
            while self._flush:
                handle = self._flush.pop()
                try:
                    self.esys.flush_context(handle)
                except TssError as error:
                    log.debug("flushing %#x failed: %s", int(handle), error)
                    failed.append(handle)
            self._flush = failed
        self.srks.clear()
        self.esys.close()

    def track(self, handle: Any) -> Any:
        """Remember a transient handle so that close() flushes it."""
        self._flush.append(handle)
        return handle

    def flush(self, handle: Any) -> None:
        """Flush a handle now. A failure is not the command's: its work is done, and a TPM that cannot
        flush fails the next command too, which then says why. The handle stays remembered, so that
        close() tries again (without a resource manager a forgotten object holds one of three slots)."""
        try:
            self.esys.flush_context(handle)
        except TssError as error:
            log.debug("flushing %#x failed, tried again at close: %s", int(handle), error)
            return
        self._flush.remove(handle)

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
