"""Everything that talks to the TPM. The only module that imports tpm2-pytss.

A `Tpm` is one ESAPI connection that remembers every transient object and session it creates and
flushes them on every exit path: without a resource manager (swtpm on a socket, or /dev/tpm0) leaked
handles exhaust the TPM after three. Key material leaving the TPM (HMAC, Unseal) always travels in a
session salted with the SRK and with response parameter encryption, and is copied straight out of
the TSS's C buffer into a `Secret`, which then zeroes that buffer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

# The TSS prints its own warnings to stderr (e.g. for an absent persistent SRK, which is normal);
# errors reach the user through our messages instead. TSS2_LOG set by the user still wins.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI
from tpm2_pytss._libtpm2_pytss import ffi, lib
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_PT,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_PERMANENT,
    TPMA_SESSION,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from .errors import ExitCode, LuksTpmError, die
from .secret import Secret, wipe

log = logging.getLogger(__name__)

DEFAULT_TCTI = "device:/dev/tpmrm0"
SRK_PERSISTENT_HANDLE = 0x81000001
DERIVED_PRIMARY_UNIQUE = hashlib.sha256(b"luks-tpm derived primary v1").digest()
_TSS_LAYER_MASK = 0xFF0000
_TCTI_LAYER = 0x0A0000

_SRK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)


class Bank(enum.StrEnum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA384 = "sha384"

    @property
    def algorithm(self) -> int:
        return int(getattr(TPM2_ALG, self.name))

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.value, data).digest()


@dataclasses.dataclass(frozen=True)
class Parent:
    """The SRK that salts sessions and parents sealed objects; its name pins the TPM and owner seed."""

    handle: int | None  # persistent handle, or None when created transiently from the template
    name: bytes


@dataclasses.dataclass(frozen=True)
class PcrPolicy:
    bank: Bank
    pcrs: tuple[int, ...]
    pcr_digest: bytes  # hash of the concatenated expected PCR values, in selection order
    pin: bool

    def selection(self) -> TPML_PCR_SELECTION:
        return TPML_PCR_SELECTION.parse(f"{self.bank}:{','.join(map(str, self.pcrs))}")


@dataclasses.dataclass(frozen=True)
class LockoutState:
    in_lockout: bool
    failures: int
    max_failures: int
    recovery_seconds: int  # seconds for one failure to be forgotten
    lockout_seconds: int  # lockoutRecovery: how long the lockout authorization stays blocked


@dataclasses.dataclass(frozen=True)
class SealedBlob:
    public: bytes
    private: bytes


def tcti_from_environment(option: str | None, environ: dict[str, str]) -> str:
    """The TCTI in the documented order: --tcti, LUKS_TPM_TCTI, TPM2TOOLS_TCTI, then the kernel's RM."""
    return option or environ.get("LUKS_TPM_TCTI") or environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI


def _rc(error: TSS2_Exception) -> int:
    return int(error.error)


def _is(error: TSS2_Exception, *codes: int) -> bool:
    return _rc(error) in {int(code) for code in codes}


class TpmError(LuksTpmError):
    """A TPM failure translated into words; `rc` keeps the TPM's own code for callers that branch on it."""

    def __init__(self, message: str, *, hint: str | None, code: ExitCode, rc: int) -> None:
        super().__init__(message, hint=hint, code=code)
        self.rc = rc

    @property
    def wrong_auth(self) -> bool:
        """The authorization value (the PIN) was wrong: a dictionary-attack failure was counted."""
        return self.rc in (int(TPM2_RC.AUTH_FAIL), int(TPM2_RC.BAD_AUTH))


def _translate(error: TSS2_Exception, doing: str) -> TpmError:
    rc = _rc(error)
    if _is(error, TPM2_RC.LOCKOUT):
        return TpmError(
            f"the TPM is in dictionary-attack lockout ({doing})",
            hint="wait for the lockout to lift (`luks-tpm doctor` shows when) or reset it with the lockout "
            "authorization (`tpm2_dictionarylockout --clear-lockout`)",
            code=ExitCode.LOCKED_OUT,
            rc=rc,
        )
    if _is(error, TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
        return TpmError(f"wrong PIN ({doing})", hint=None, code=ExitCode.UNLOCK_FAILED, rc=rc)
    if _is(error, TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED):
        return TpmError(
            f"the TPM policy is not satisfied ({doing})",
            hint="PCR values differ from those the key was sealed to; `luks-tpm status` names them",
            code=ExitCode.UNLOCK_FAILED,
            rc=rc,
        )
    if _is(error, TPM2_RC.HIERARCHY):
        return TpmError(
            f"the TPM owner hierarchy is disabled ({doing})",
            hint="enable it in the firmware's TPM settings",
            code=ExitCode.TPM_UNAVAILABLE,
            rc=rc,
        )
    if _is(error, TPM2_RC.INTEGRITY, TPM2_RC.KEY, TPM2_RC.BINDING):
        return TpmError(
            f"the TPM rejected the sealed object ({doing}): it was made by another TPM or before the owner "
            "hierarchy was cleared",
            hint="unlock with the recovery key and re-enroll",
            code=ExitCode.UNLOCK_FAILED,
            rc=rc,
        )
    if rc & _TSS_LAYER_MASK == _TCTI_LAYER:
        return TpmError(
            f"lost the connection to the TPM ({doing}): {error}",
            hint=None,
            code=ExitCode.TPM_UNAVAILABLE,
            rc=rc,
        )
    return TpmError(f"the TPM failed {doing}: {error}", hint=None, code=ExitCode.TPM_UNAVAILABLE, rc=rc)


@contextmanager
def _tpm_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except TSS2_Exception as error:
        raise _translate(error, doing) from None


def _secret_from_tpm2b(value: Any) -> Secret:
    """Copy a TPM2B returned by ESYS into a Secret and zero the ESYS allocation before it is freed."""
    cdata = value._cdata
    try:
        return Secret.copy_of(ffi.buffer(cdata.buffer, cdata.size))
    finally:
        ffi.memmove(cdata.buffer, bytes(len(cdata.buffer)), len(cdata.buffer))


_libtss2_sys: ctypes.CDLL | None = None


def _wipe_response_buffer(esapi: ESAPI) -> None:
    """Zero the SAPI response buffer of an ESYS context.

    ESYS decrypts a response parameter (the HMAC result, the unsealed data) in place in the SAPI
    context's response buffer and leaves it there until the next response overwrites it, which a
    short one (FlushContext: 10 bytes) does not, and until Esys_Finalize frees it without zeroing.
    Tss2_Sys_GetRpBuffer is public API of libtss2-sys, but tpm2-pytss does not bind it: ctypes.
    """
    global _libtss2_sys  # noqa: PLW0603 (loaded once, on first use)
    if _libtss2_sys is None:
        _libtss2_sys = ctypes.CDLL("libtss2-sys.so.1")
        _libtss2_sys.Tss2_Sys_GetRpBuffer.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                      ctypes.POINTER(ctypes.c_void_p)]
        _libtss2_sys.Tss2_Sys_GetRpBuffer.restype = ctypes.c_uint32
    sys_context = ffi.new("TSS2_SYS_CONTEXT **")
    if lib.Esys_GetSysContext(esapi._ctx, sys_context) != 0:
        return
    used, buffer = ctypes.c_size_t(), ctypes.c_void_p()
    address = int(ffi.cast("uintptr_t", sys_context[0]))
    if _libtss2_sys.Tss2_Sys_GetRpBuffer(address, ctypes.byref(used), ctypes.byref(buffer)) != 0 or not buffer.value:
        return
    if used.value:
        wipe((ctypes.c_char * used.value).from_address(buffer.value))


def srk_template() -> TPM2B_PUBLIC:
    """The standard ECC P-256 storage root key (TCG provisioning template)."""
    return TPM2B_PUBLIC.parse("ecc256:aes128cfb", nameAlg=TPM2_ALG.SHA256, objectAttributes=_SRK_ATTRIBUTES)


def derived_primary_template(policy: bytes) -> TPM2B_PUBLIC:
    """docs/derivation.md (contract): the keyed-hash primary whose HMAC key is re-created from the owner seed."""
    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.NODA
    )
    if not policy:
        attributes |= TPMA_OBJECT.USERWITHAUTH
    template = TPM2B_PUBLIC.parse("hmac:sha256", nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    template.publicArea.authPolicy = policy
    template.publicArea.unique.keyedHash = DERIVED_PRIMARY_UNIQUE
    return template


def sealed_object_template(policy: bytes, *, pin: bool) -> TPM2B_PUBLIC:
    """docs/sealing.md: sealed data under the SRK, usable only through its policy; noDA unless a PIN guards it."""
    attributes = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    if not pin:
        attributes |= TPMA_OBJECT.NODA
    template = TPM2B_PUBLIC.parse("keyedhash", nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    template.publicArea.authPolicy = policy
    return template


def _same_key_shape(public: TPM2B_PUBLIC, template: TPM2B_PUBLIC) -> bool:
    """True when `public` was made from `template` (all but the unique field, which the TPM fills in)."""
    a, b = public.publicArea, template.publicArea
    return bool(
        a.type == b.type
        and a.nameAlg == b.nameAlg
        and a.objectAttributes == b.objectAttributes
        and a.parameters.eccDetail.curveID == b.parameters.eccDetail.curveID
        and a.parameters.eccDetail.symmetric.algorithm == b.parameters.eccDetail.symmetric.algorithm
        and a.parameters.eccDetail.symmetric.keyBits.aes == b.parameters.eccDetail.symmetric.keyBits.aes
    )


class Tpm:
    """One connection to the TPM; use as a context manager so everything it created is flushed."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._flush: list[Any] = []
        self._srk: dict[int | None, tuple[Any, Parent]] = {}
        try:
            self._esapi = ESAPI(tcti)
        except TSS2_Exception as error:
            raise TpmError(
                f"no TPM reachable through TCTI '{tcti}' ({error})",
                hint="point luks-tpm at a TPM with --tcti or LUKS_TPM_TCTI (e.g. device:/dev/tpmrm0, "
                "swtpm:path=/run/swtpm.sock); `luks-tpm doctor` checks",
                code=ExitCode.TPM_UNAVAILABLE,
                rc=_rc(error),
            ) from None
        except (RuntimeError, OSError) as error:  # TCTI module missing or unloadable
            raise TpmError(
                f"cannot load TCTI '{tcti}': {error}",
                hint="install the TSS TCTI library (libtss2-tcti-device0, libtss2-tcti-swtpm0) or fix --tcti",
                code=ExitCode.TPM_UNAVAILABLE,
                rc=0,
            ) from None

    def __enter__(self) -> Tpm:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        while self._flush:
            handle = self._flush.pop()
            try:
                self._esapi.flush_context(handle)
            except TSS2_Exception as error:
                log.debug("flushing %#x failed: %s", int(handle), error)
        self._srk.clear()
        self._esapi.close()

    def _track(self, handle: Any) -> Any:
        self._flush.append(handle)
        return handle

    def flush(self, handle: Any) -> None:
        self._flush.remove(handle)
        with _tpm_errors("flushing a transient object"):
            self._esapi.flush_context(handle)

    # ---- identity and state -------------------------------------------------------------------------

    def parent(self, handle: int | None = None, *, prefer_persistent: bool = True) -> Parent:
        """The SRK: the persistent one at `handle`, or created transiently from the template."""
        return self._srk_object(handle, prefer_persistent=prefer_persistent)[1]

    def _srk_object(self, handle: int | None, *, prefer_persistent: bool = True) -> tuple[Any, Parent]:
        wanted = handle if handle is not None else (SRK_PERSISTENT_HANDLE if prefer_persistent else None)
        if wanted in self._srk:
            return self._srk[wanted]
        if wanted is not None:
            found = self._persistent_srk(wanted)
            if found is not None:
                self._srk[wanted] = found
                return found
            if handle is not None:  # rc 0: KeyRecovery tells "cleared" from "another TPM" by the EK
                raise TpmError(
                    f"the TPM has no storage key at {handle:#x}, which this binding was made with",
                    hint="the TPM was cleared or this is another machine's disk; unlock with the recovery key",
                    code=ExitCode.UNLOCK_FAILED,
                    rc=0,
                )
        with _tpm_errors("creating the storage root key"):
            esys, public, *_ = self._esapi.create_primary(None, srk_template(), ESYS_TR.OWNER)
        self._track(esys)
        found = (esys, Parent(None, bytes(public.get_name())))
        self._srk[None] = found
        if wanted is not None:
            self._srk[wanted] = found
        return found

    def _persistent_srk(self, handle: int) -> tuple[Any, Parent] | None:
        try:
            esys = self._esapi.tr_from_tpmpublic(handle)
        except TSS2_Exception as error:
            if _is(error, TPM2_RC.HANDLE) or _rc(error) & 0xFFF == int(TPM2_RC.HANDLE):
                return None
            raise _translate(error, f"reading the key at {handle:#x}") from None
        public, name, _ = self._esapi.read_public(esys)
        if not _same_key_shape(public, srk_template()):
            log.debug("persistent handle %#x does not hold the standard SRK; ignoring it", handle)
            self._esapi.tr_close(esys)
            return None
        return esys, Parent(handle, bytes(name))

    def persist_srk(self) -> Parent:
        """Make the standard SRK persistent at 0x81000001 (creating it costs up to a second on hardware)."""
        found = self._persistent_srk(SRK_PERSISTENT_HANDLE)
        if found is not None:
            return found[1]
        try:
            self._esapi.tr_from_tpmpublic(SRK_PERSISTENT_HANDLE)
        except TSS2_Exception:
            pass
        else:
            die(f"{SRK_PERSISTENT_HANDLE:#x} already holds a key that is not the standard SRK",
                hint="leave it, or evict it with `tpm2_evictcontrol` if nothing uses it", code=ExitCode.REFUSED)
        esys, _ = self._srk_object(None, prefer_persistent=False)
        with _tpm_errors("persisting the storage root key"):
            self._esapi.evict_control(ESYS_TR.OWNER, esys, SRK_PERSISTENT_HANDLE)
        self._srk.pop(SRK_PERSISTENT_HANDLE, None)
        return self.parent(SRK_PERSISTENT_HANDLE)

    def check_parent(self, expected: Parent) -> Any:
        """The SRK the binding was made with, refusing a TPM whose SRK name differs (other TPM or cleared)."""
        if expected.handle is not None and expected.handle not in self._srk:
            found = self._persistent_srk_named(expected)
            if found is not None:
                return found
        esys, actual = self._srk_object(expected.handle, prefer_persistent=False)
        if actual.name != expected.name:
            raise TpmError(
                "the TPM's storage root key differs from the one this binding was made with: "
                "the owner hierarchy was cleared, or this is a different TPM",
                hint="the TPM cannot recover this key any more; unlock with the recovery key and re-enroll",
                code=ExitCode.UNLOCK_FAILED,
                rc=0,
            )
        return esys

    def _persistent_srk_named(self, expected: Parent) -> Any:
        """The persistent SRK when its name is the recorded one, at the cost of one ReadPublic.

        The name hashes the whole public area (type, attributes, parameters, public key), so an equal
        name is the very key whose shape was checked at enrolment: no second ReadPublic for the shape.
        Anything else (no key there, another name) is left to the full path, which says what is wrong.
        """
        assert expected.handle is not None
        try:
            esys = self._esapi.tr_from_tpmpublic(expected.handle)
        except TSS2_Exception:
            return None
        if bytes(self._esapi.tr_get_name(esys)) != expected.name:
            self._esapi.tr_close(esys)
            return None
        self._srk[expected.handle] = (esys, expected)
        return esys

    def endorsement_name(self) -> bytes | None:
        """Name of the standard ECC EK: survives TPM2_Clear, so it tells "cleared" from "another TPM"."""

        def nv_read(index: int) -> bytes:
            raise NoSuchIndex(index)

        try:
            _, template = create_ek_template("EK-ECC256", nv_read)
            with self.transient_primary(template, ESYS_TR.ENDORSEMENT) as (_, public):
                return bytes(public.get_name())
        except (TSS2_Exception, TpmError) as error:
            log.debug("cannot create the EK: %s", error)
            return None

    @contextmanager
    def transient_primary(self, template: TPM2B_PUBLIC, hierarchy: Any = ESYS_TR.OWNER) -> Iterator[Any]:
        with _tpm_errors("creating a primary key"):
            esys, public, *_ = self._esapi.create_primary(None, template, hierarchy)
        self._track(esys)
        try:
            yield esys, public
        finally:
            self.flush(esys)

    def lockout_state(self) -> LockoutState:
        props = self._properties(TPM2_PT.PERMANENT, 0x12)
        return LockoutState(
            in_lockout=bool(props.get(int(TPM2_PT.PERMANENT), 0) & TPMA_PERMANENT.INLOCKOUT),
            failures=props.get(int(TPM2_PT.LOCKOUT_COUNTER), 0),
            max_failures=props.get(int(TPM2_PT.MAX_AUTH_FAIL), 0),
            recovery_seconds=props.get(int(TPM2_PT.LOCKOUT_INTERVAL), 0),
            lockout_seconds=props.get(int(TPM2_PT.LOCKOUT_RECOVERY), 0),
        )

    def _properties(self, first: int, count: int) -> dict[int, int]:
        with _tpm_errors("reading TPM properties"):
            _, data = self._esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, int(first), count)
        return {int(p.property): int(p.value) for p in data.data.tpmProperties}

    def identity(self) -> dict[str, str]:
        # TPM2_PT_MANUFACTURER, VENDOR_STRING_1..4, FIRMWARE_VERSION_1..2 (Part 2, table 23);
        # tpm2-pytss names only some of them.
        props = self._properties(TPM2_PT.MANUFACTURER, 8)

        def text(*keys: int) -> str:
            raw = b"".join(props.get(k, 0).to_bytes(4, "big") for k in keys)
            return raw.replace(b"\0", b"").decode("ascii", "replace").strip()

        fw1, fw2 = props.get(0x10B, 0), props.get(0x10C, 0)
        return {
            "manufacturer": text(0x105),
            "vendor": text(0x106, 0x107, 0x108, 0x109),
            "firmware": f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}",
        }

    def pcr_banks(self) -> list[Bank]:
        """Banks with at least one PCR allocated."""
        with _tpm_errors("reading the PCR banks"):
            _, data = self._esapi.get_capability(TPM2_CAP.PCRS, 0, 16)
        by_algorithm = {bank.algorithm: bank for bank in Bank}
        return [
            by_algorithm[int(selection.hash)]
            for selection in data.data.assignedPCR.pcrSelections[0 : data.data.assignedPCR.count]
            if int(selection.hash) in by_algorithm and any(selection.pcrSelect[0 : selection.sizeofSelect])
        ]

    def loaded_handles(self) -> list[int]:
        """Transient objects and sessions currently in the TPM (tests check none are left behind)."""
        handles: list[int] = []
        for first in (TPM2_HT.TRANSIENT << 24, TPM2_HT.LOADED_SESSION << 24, TPM2_HT.SAVED_SESSION << 24):
            _, data = self._esapi.get_capability(TPM2_CAP.HANDLES, int(first), 64)
            handles += [int(h) for h in data.data.handles.handle[0 : data.data.handles.count]]
        return handles

    # ---- PCRs and policies ------------------------------------------------------------------------

    def pcr_values(self, bank: Bank, pcrs: Sequence[int]) -> dict[int, bytes]:
        values: dict[int, bytes] = {}
        remaining = sorted(set(pcrs))
        while remaining:  # PCR_Read returns at most 8 values per call
            selection = TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, remaining))}")
            with _tpm_errors("reading PCRs"):
                _, returned, digests = self._esapi.pcr_read(selection)
            got = [
                index
                for sel in returned.pcrSelections[0 : returned.count]
                for index in range(sel.sizeofSelect * 8)
                if sel.pcrSelect[index // 8] & (1 << (index % 8))
            ]
            if not got:
                die(f"the TPM has no {bank} PCR bank", hint="choose another with --pcr-bank",
                    code=ExitCode.UNSUPPORTED)
            for index, digest in zip(got, digests.digests[0 : digests.count], strict=True):
                values[index] = bytes(digest)
            remaining = [index for index in remaining if index not in values]
        return values

    def pcr_policy(self, bank: Bank, values: dict[int, bytes], *, pin: bool) -> tuple[PcrPolicy, bytes]:
        """The policy for `values` and its digest, computed by the TPM in a trial session."""
        pcrs = tuple(sorted(values))
        policy = PcrPolicy(bank, pcrs, bank.hash(b"".join(values[i] for i in pcrs)), pin)
        with self._session(TPM2_SE.TRIAL, salted=False) as session:
            self._apply_policy(session, policy, trial=True)
            with _tpm_errors("computing the policy digest"):
                digest = bytes(self._esapi.policy_get_digest(session))
        return policy, digest

    def _apply_policy(self, session: Any, policy: PcrPolicy, *, trial: bool) -> None:
        with _tpm_errors("applying the PCR policy"):
            if policy.pcrs:
                # In a real session an empty digest makes the TPM use the PCRs' current values.
                self._esapi.policy_pcr(session, policy.pcr_digest if trial else b"", policy.selection())
            if policy.pin:
                self._esapi.policy_auth_value(session)

    @contextmanager
    def _session(self, kind: Any, *, salted: bool = True, parent: Any = None) -> Iterator[Any]:
        """A session; salted ones use the SRK as tpmKey and encrypt response parameters (AES-128-CFB)."""
        tpm_key = ESYS_TR.NONE
        if salted:
            tpm_key = parent if parent is not None else self._srk_object(None)[0]
        symmetric = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
        symmetric.keyBits.aes = 128
        symmetric.mode.aes = TPM2_ALG.CFB
        with _tpm_errors("starting a session"):
            session = self._esapi.start_auth_session(
                tpm_key, ESYS_TR.NONE, kind, symmetric if salted else "null", TPM2_ALG.SHA256
            )
        self._track(session)
        if salted:
            self._esapi.trsess_set_attributes(
                session,
                TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT | TPMA_SESSION.DECRYPT,
            )
        try:
            yield session
        finally:
            if session in self._flush:  # not already ended by the TPM (see _last_use)
                self.flush(session)

    def _last_use(self, session: Any) -> None:
        """Clear continueSession for the session's next command: on success the TPM ends the session
        itself, which saves a FlushContext (on failure the session stays and is flushed as usual)."""
        self._esapi.trsess_set_attributes(session, 0, TPMA_SESSION.CONTINUESESSION)

    def _ended_by_tpm(self, session: Any) -> None:
        """Forget a session the TPM ended (continueSession was clear): free ESYS's record, no command."""
        self._flush.remove(session)
        self._esapi.tr_close(session)

    @contextmanager
    def encrypted_session(self, parent: Any = None) -> Iterator[Any]:
        """An SRK-salted HMAC session with command and response encryption, for reuse across volumes."""
        with self._session(TPM2_SE.HMAC, parent=parent) as session:
            yield session

    def session_attributes(self, session: Any) -> int:
        return int(self._esapi.trsess_get_attributes(session))

    # ---- derived keys ------------------------------------------------------------------------------

    @contextmanager
    def derived_primary(self, policy: bytes = b"") -> Iterator[Any]:
        with self.transient_primary(derived_primary_template(policy)) as (esys, _):
            yield esys

    def hmac(self, primary: Any, message: bytes, session: Any, *, last_use: bool = False) -> Secret:
        """TPM2_HMAC with the derived primary, its result (the PRK) encrypted on the bus.

        `last_use`: the session serves no further command, so the TPM ends it (one FlushContext fewer)."""
        if last_use:
            self._last_use(session)
        with _tpm_errors("computing the derived key"):
            try:
                result = self._esapi.hmac(primary, message, TPM2_ALG.SHA256, session1=session)
            finally:
                _wipe_response_buffer(self._esapi)
        if last_use:
            self._ended_by_tpm(session)
        return _secret_from_tpm2b(result)

    # ---- sealed keys -------------------------------------------------------------------------------

    def seal(self, key: Secret, parent: Any, policy: PcrPolicy, policy_digest: bytes,
             pin: Secret | None) -> SealedBlob:
        sensitive = TPM2B_SENSITIVE_CREATE()
        data = sensitive._cdata.sensitive.data
        if len(key) > len(data.buffer):
            raise ValueError("volume key too large to seal")
        ffi.memmove(data.buffer, key.as_ctypes(), len(key))
        data.size = len(key)
        if pin is not None:
            auth = sensitive._cdata.sensitive.userAuth
            if len(pin) > len(auth.buffer):
                die("the PIN is too long", hint="use at most 32 bytes", code=ExitCode.USAGE)
            ffi.memmove(auth.buffer, pin.as_ctypes(), len(pin))
            auth.size = len(pin)
        try:
            with self.encrypted_session(parent) as session, _tpm_errors("sealing the volume key"):
                private, public, *_ = self._esapi.create(
                    parent, sensitive, sealed_object_template(policy_digest, pin=pin is not None),
                    session1=session,
                )
        finally:
            size = ffi.sizeof(sensitive._cdata.sensitive)
            ffi.memmove(ffi.addressof(sensitive._cdata.sensitive), bytes(size), size)
        return SealedBlob(public.marshal(), private.marshal())

    def _set_auth(self, handle: Any, pin: Secret) -> None:
        auth = TPM2B_AUTH()
        if len(pin) > len(auth._cdata.buffer):
            die("the PIN is too long", hint="use at most 32 bytes", code=ExitCode.USAGE)
        ffi.memmove(auth._cdata.buffer, pin.as_ctypes(), len(pin))
        auth._cdata.size = len(pin)
        try:
            self._esapi.tr_set_auth(handle, auth)
        finally:
            ffi.memmove(auth._cdata.buffer, bytes(len(auth._cdata.buffer)), len(auth._cdata.buffer))

    def unseal(self, blob: SealedBlob, parent: Any, policy: PcrPolicy, pin: Secret | None) -> Secret:
        public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
        private, _ = TPM2B_PRIVATE.unmarshal(blob.private)
        with _tpm_errors("loading the sealed key"):
            sealed = self._track(self._esapi.load(parent, private, public))
        try:
            if pin is not None:
                self._set_auth(sealed, pin)
            with self._session(TPM2_SE.POLICY, parent=parent) as session:
                self._apply_policy(session, policy, trial=False)
                self._last_use(session)  # a policy session serves one Unseal
                with _tpm_errors("unsealing the volume key"):
                    try:
                        result = self._esapi.unseal(sealed, session1=session)
                    finally:
                        _wipe_response_buffer(self._esapi)
                self._ended_by_tpm(session)
            return _secret_from_tpm2b(result)
        finally:
            self.flush(sealed)


def wait_for_lockout_text(state: LockoutState) -> str:
    if state.in_lockout:
        return f"in lockout; one failure is forgotten every {state.recovery_seconds} s"
    left = max(state.max_failures - state.failures, 0)
    return f"{left} of {state.max_failures} tries left before lockout"

