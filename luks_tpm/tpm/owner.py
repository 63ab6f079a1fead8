"""The owner hierarchy as a whole: what TPM2_Clear destroys, and TPM2_Clear itself (`luks-tpm wipe`).

TPM2_Clear (TPM 2.0 Part 3, TPM2_Clear) gives the owner hierarchy a new storage primary seed, so every
key that came from the old one is gone for good: derived primaries, the SRK and every object sealed
under it. It also evicts the persistent objects of the storage and endorsement hierarchies, deletes the
NV indices the owner defined (those with TPMA_NV_PLATFORMCREATE stay), and resets the owner,
endorsement and lockout authorizations. The endorsement primary seed stays, so the EK comes back the
same: that is how a binding tells "cleared" from "another TPM" afterwards.

Clear is authorized here with the lockout hierarchy in a password session, as `tpm2_clear` does: the
lockout hierarchy's authorization changes in this very command, so an HMAC session's response could not
be checked. A wrong lockout authorization blocks it for the TPM's lockout recovery time, so callers check
`ClearState` first and try only when a try can succeed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import Cause, ExitCode, LuksTpmError
from ..secret import Secret
from .context import Tpm, fill_tpm2b, zero_c
from .esys import TssError, ffi, lib
from .responses import LOCKOUT, TpmError, known_error, tpm_errors, translate
from .srk import is_standard_srk

PERSISTENT_FIRST = 0x81000000
PLATFORM_PERSISTENT_FIRST = 0x81800000  # 0x81800000-0x81ffffff: persisted by the platform; they stay
_ENDORSEMENT_RANGE = range(0x81010000, 0x81020000)  # TCG handle registry: endorsement keys
NV_FIRST = 0x01000000
_CLEARING = "clearing the TPM owner hierarchy"

_KINDS = {
    lib.TPM2_ALG_RSA: "RSA key",
    lib.TPM2_ALG_ECC: "ECC key",
    lib.TPM2_ALG_KEYEDHASH: "keyed-hash object",
    lib.TPM2_ALG_SYMCIPHER: "symmetric key",
}
_NV_TYPES = {0: "ordinary", 1: "counter", 2: "bits", 4: "extend", 8: "pin-fail", 9: "pin-pass"}
# Attributes worth naming to an operator deciding whether someone else's data lives there.
_NV_FLAGS = {
    "written": lib.TPMA_NV_WRITTEN,
    "owner-write": lib.TPMA_NV_OWNERWRITE,
    "auth-write": lib.TPMA_NV_AUTHWRITE,
    "policy-write": lib.TPMA_NV_POLICYWRITE,
    "owner-read": lib.TPMA_NV_OWNERREAD,
    "auth-read": lib.TPMA_NV_AUTHREAD,
    "policy-read": lib.TPMA_NV_POLICYREAD,
    "no-da": lib.TPMA_NV_NO_DA,
    "policy-delete": lib.TPMA_NV_POLICY_DELETE,
    "platform-create": lib.TPMA_NV_PLATFORMCREATE,
}


@dataclasses.dataclass(frozen=True)
class ClearState:
    """What decides whether TPM2_Clear with the lockout authorization can work now."""

    disable_clear: bool  # TPMA_PERMANENT.disableClear: the TPM refuses TPM2_Clear
    lockout_auth_set: bool  # the lockout authorization was changed from empty since the last clear
    lockout_recovery: int  # seconds the lockout authorization stays blocked after a wrong try (0: until reboot)


@dataclasses.dataclass(frozen=True)
class PersistentObject:
    handle: int
    name: bytes
    kind: str  # "ECC key", "RSA key", ...
    role: str | None  # what it conventionally is, e.g. "the standard SRK"


@dataclasses.dataclass(frozen=True)
class NvIndex:
    index: int
    name: bytes
    size: int
    type: str  # ordinary, counter, bits, extend, pin-fail, pin-pass
    attributes: tuple[str, ...]

    @property
    def platform_created(self) -> bool:
        return "platform-create" in self.attributes


def clear_state(tpm: Tpm) -> ClearState:
    props = tpm.properties(lib.TPM2_PT_PERMANENT, 0x13)
    permanent = props.get(lib.TPM2_PT_PERMANENT, 0)
    return ClearState(
        disable_clear=bool(permanent & lib.TPMA_PERMANENT_DISABLECLEAR),
        lockout_auth_set=bool(permanent & lib.TPMA_PERMANENT_LOCKOUTAUTHSET),
        lockout_recovery=props.get(lib.TPM2_PT_LOCKOUT_RECOVERY, 0),
    )


def clear_refusal(state: ClearState, *, auth_given: bool) -> LuksTpmError | None:
    """Why TPM2_Clear cannot work now, known without trying (a wrong try blocks the lockout authorization)."""
    if state.disable_clear:
        known = known_error(lib.TPM2_RC_DISABLED, _CLEARING, LOCKOUT)
        assert known is not None
        return known
    if state.lockout_auth_set and not auth_given:
        return LuksTpmError(
            "the TPM has a lockout authorization, and none was given (clearing needs it)",
            hint="give it with --lockout-auth-file FILE (exact bytes); a wrong one blocks it for "
            f"{_recovery_words(state.lockout_recovery)}",
            code=ExitCode.USAGE,
            cause=Cause.USAGE,
        )
    return None


def _recovery_words(seconds: int) -> str:
    return f"{seconds} s" if seconds else "the rest of this boot"


def _handles(tpm: Tpm, first: int, last: int) -> list[int]:
    """Every handle from `first` to `last` (GetCapability answers at most a page at a time)."""
    found: list[int] = []
    start = first
    while True:
        page = [handle for handle in tpm.handles(start) if handle <= last]
        found += page
        if len(page) < 64:
            return found
        start = page[-1] + 1


def _read_public(tpm: Tpm, handle: int) -> PersistentObject:
    cached = tpm.srks.get(handle)  # ESYS hands out that same object again: it must not be closed here
    try:
        with tpm_errors(f"reading the persistent object at {handle:#x}"):
            esys = cached[0] if cached is not None else tpm.esys.tr_from_tpmpublic(handle)
            try:
                public, name = tpm.esys.read_public(esys), tpm.esys.tr_get_name(esys)
            finally:
                if cached is None:
                    tpm.esys.tr_close(esys)
    except TpmError as error:
        # Listed, yet not readable: its hierarchy is disabled (the TPM answers TPM_RC_HANDLE then). The
        # clear evicts it all the same, and enables the hierarchies again.
        rc = error.rc or 0
        if not (rc & lib.TPM2_RC_FMT1 and lib.TPM2_RC_FMT1 + (rc & 0x3F) == lib.TPM2_RC_HANDLE):
            raise
        return PersistentObject(handle, b"", "object (unreadable now: its hierarchy is disabled)", None)
    role = None
    if is_standard_srk(public):
        role = "the standard SRK (luks-tpm, systemd-cryptenroll and tpm2-tools use it)"
    elif handle in _ENDORSEMENT_RANGE:
        role = "an endorsement key (re-created the same after a clear)"
    return PersistentObject(handle, name, _KINDS.get(int(public.publicArea.type), "object"), role)


def persistent_objects(tpm: Tpm) -> tuple[list[PersistentObject], list[int]]:
    """(the persistent objects TPM2_Clear evicts, the handles of those the platform persisted, which stay)."""
    handles = _handles(tpm, PERSISTENT_FIRST, 0x81FFFFFF)
    evicted = [_read_public(tpm, handle) for handle in handles if handle < PLATFORM_PERSISTENT_FIRST]
    return evicted, [handle for handle in handles if handle >= PLATFORM_PERSISTENT_FIRST]


def _nv_public(tpm: Tpm, index: int) -> NvIndex:
    with tpm_errors(f"reading NV index {index:#x}"):
        esys = tpm.esys.tr_from_tpmpublic(index)
        try:
            public, name = tpm.esys.nv_read_public(esys), tpm.esys.tr_get_name(esys)
        finally:
            tpm.esys.tr_close(esys)
    area = public.nvPublic
    attributes = int(area.attributes)
    kind = (attributes & lib.TPMA_NV_TPM2_NT_MASK) >> lib.TPMA_NV_TPM2_NT_SHIFT
    flags = tuple(word for word, bit in _NV_FLAGS.items() if attributes & int(bit))
    return NvIndex(index, name, int(area.dataSize), _NV_TYPES.get(kind, f"type {kind}"), flags)


def nv_indices(tpm: Tpm) -> tuple[list[NvIndex], list[NvIndex]]:
    """(the NV indices TPM2_Clear deletes, the platform-created ones it keeps: EK certificates and the like)."""
    every = [_nv_public(tpm, index) for index in _handles(tpm, NV_FIRST, 0x01FFFFFF)]
    return [nv for nv in every if not nv.platform_created], [nv for nv in every if nv.platform_created]


@contextmanager
def owner_authorization(tpm: Tpm, auth: Secret | None) -> Iterator[None]:
    """Commands authorized by the owner hierarchy (creating and persisting the SRK) use `auth` within the
    block; ESYS's copy is overwritten afterwards. None: the empty authorization, as TPMs ship. Trying a
    wrong one costs nothing: hierarchy authorizations are exempt from dictionary-attack protection."""
    if auth is None:
        yield
        return
    if not owner_auth_set(tpm):
        tpm.warnings.append("the TPM's owner authorization is not set (it is empty): --owner-auth-file is not used")
        yield
        return
    value = ffi.new("TPM2B_AUTH *")
    try:
        fill_tpm2b(value, auth, "owner authorization")
        tpm.esys.tr_set_auth(lib.ESYS_TR_RH_OWNER, value)
        yield
    except TpmError as error:
        if error.cause is not Cause.OWNER_AUTH:
            raise
        raise TpmError(
            "the TPM refused the owner authorization given with --owner-auth-file",
            hint="give its exact bytes (a trailing newline counts), as `tpm2_changeauth -c o` set it",
            code=ExitCode.REFUSED,
            cause=Cause.WRONG_AUTH,
            rc=error.rc,
        ) from None
    finally:
        zero_c(value)
        tpm.esys.tr_set_auth(lib.ESYS_TR_RH_OWNER, ffi.new("TPM2B_AUTH *"))


def owner_auth_set(tpm: Tpm) -> bool:
    """TPMA_PERMANENT.ownerAuthSet: the owner hierarchy's authorization was changed from empty."""
    permanent = tpm.properties(lib.TPM2_PT_PERMANENT, 1).get(lib.TPM2_PT_PERMANENT, 0)
    return bool(permanent & lib.TPMA_PERMANENT_OWNERAUTHSET)


def clear(tpm: Tpm, lockout_auth: Secret | None, state: ClearState) -> None:
    """TPM2_Clear, authorized by the lockout hierarchy. The authorization is zeroed in ESYS afterwards."""
    value = ffi.new("TPM2B_AUTH *")
    try:
        if lockout_auth is not None:
            fill_tpm2b(value, lockout_auth, "lockout authorization")
        tpm.esys.tr_set_auth(lib.ESYS_TR_RH_LOCKOUT, value)
        try:
            tpm.esys.clear(lib.ESYS_TR_RH_LOCKOUT)
        except TssError as error:
            raise _with_recovery(translate(error, _CLEARING, LOCKOUT), state) from None
    finally:
        zero_c(value)
        tpm.esys.tr_set_auth(lib.ESYS_TR_RH_LOCKOUT, ffi.new("TPM2B_AUTH *"))  # ESYS keeps its own copy: overwrite it


def _with_recovery(error: TpmError, state: ClearState) -> TpmError:
    if error.cause not in (Cause.WRONG_AUTH, Cause.LOCKED_OUT):
        return error
    recovery = _recovery_words(state.lockout_recovery)
    detail = (
        f"; the TPM now refuses any lockout authorization for {recovery}"
        if error.cause is Cause.WRONG_AUTH
        else f"; it does so for {recovery} after each wrong try"
    )
    return TpmError(error.message + detail, hint=error.hint, code=error.code, cause=error.cause, rc=error.rc)
