"""The storage root key (SRK) and the endorsement key (EK): which TPM and which owner seed this is.

The SRK is the standard ECC P-256 SRK (TCG provisioning template), created from the owner seed: the
same template on the same seed gives the same key. A binding records the SRK's name; a different name
means the owner hierarchy was cleared or this is another TPM, and the EK's name (which survives
TPM2_Clear) tells which.

The key persisted at 0x81000001 serves as the SRK only once proven to be the standard one: a key of the
same shape made otherwise (another `unique`, or a child key persisted there) would work as a parent, but
could never be re-created once evicted, and a binding made under it would then look like one of a
cleared TPM. New bindings are therefore made under a persistent key only when its name equals that of
the SRK re-created from the template (one CreatePrimary, at enrolment). Unlocking needs no such proof:
the binding's recorded name is compared, and it was proven when the binding was made.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..errors import Cause, ExitCode, die
from ..model import Parent
from . import templates
from .context import Tpm
from .esys import TssError, lib
from .responses import OWNER, TpmError, tpm_errors, translate

log = logging.getLogger(__name__)

SRK_PERSISTENT_HANDLE = 0x81000001
EVICT_ADVICE = f"`tpm2_evictcontrol -C o -c {SRK_PERSISTENT_HANDLE:#x}`"

_KINDS = {lib.TPM2_ALG_RSA: "an RSA key", lib.TPM2_ALG_ECC: "an ECC key", lib.TPM2_ALG_KEYEDHASH: "a keyed-hash object"}


def _same_key_shape(public: Any, template: Any) -> bool:
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


def is_standard_srk(public: Any) -> bool:
    """Whether a key (a TPM2B_PUBLIC) has the standard SRK's shape (whoever made it, luks-tpm or another
    tool). The shape includes fixedTPM: such a key was made inside this TPM and its private part never
    leaves it, so it may salt sessions; only its name proves it is the standard SRK itself."""
    return _same_key_shape(public, templates.srk())


@dataclasses.dataclass(frozen=True)
class Occupant:
    """What is persisted at a handle."""

    esys: Any
    name: bytes
    kind: str  # "an RSA key", ...
    srk_shape: bool

    def describe(self) -> str:
        if self.srk_shape:
            return "a key of the SRK's shape that was not made from the standard SRK template"
        return self.kind + ", not the standard SRK"


def _at_handle(tpm: Tpm, handle: int) -> tuple[Any, bytes] | None:
    """The ESYS handle and name of whatever is persisted at `handle`, or None when nothing is. Not for a
    handle already in `tpm.srks`: ESYS hands out the same object again, and closing it would close that."""
    assert handle not in tpm.srks
    try:
        esys = tpm.esys.tr_from_tpmpublic(handle)
    except TssError as error:
        if error.error == lib.TPM2_RC_HANDLE:
            return None
        raise translate(error, f"reading the key at {handle:#x}") from None
    return esys, tpm.esys.tr_get_name(esys)


def _occupant(tpm: Tpm, handle: int) -> Occupant | None:
    found = _at_handle(tpm, handle)
    if found is None:
        return None
    esys, name = found
    try:
        with tpm_errors(f"reading the key at {handle:#x}"):
            public = tpm.esys.read_public(esys)
    except TpmError:
        tpm.esys.tr_close(esys)
        raise
    kind = _KINDS.get(int(public.publicArea.type), "an object")
    return Occupant(esys, name, kind, is_standard_srk(public))


def _transient_srk(tpm: Tpm) -> tuple[Any, Parent]:
    if None not in tpm.srks:
        with tpm_errors("creating the storage root key", OWNER):
            esys = tpm.track(tpm.esys.create_primary(lib.ESYS_TR_RH_OWNER, templates.srk()))
            tpm.srks[None] = (esys, Parent(None, tpm.esys.tr_get_name(esys)))
    return tpm.srks[None]


def _forget_transient(tpm: Tpm) -> None:
    """Flush the transient SRK (the persistent one serves): without a resource manager it holds a slot."""
    esys, _ = tpm.srks.pop(None)
    tpm.flush(esys)


def _proven(tpm: Tpm, occupant: Occupant) -> bool:
    """Whether the key at 0x81000001 is the standard SRK: its name is that of the SRK re-created now."""
    if occupant.name in tpm.proven_srks:
        return True
    if not occupant.srk_shape:
        return False
    had_transient = None in tpm.srks
    _, transient = _transient_srk(tpm)
    if transient.name != occupant.name:
        return False
    if not had_transient:
        _forget_transient(tpm)
    tpm.proven_srks.add(occupant.name)
    return True


def current_srk(tpm: Tpm) -> tuple[Any, Parent]:
    """The SRK new bindings are made with: the persistent key at 0x81000001 when it is proven to be the
    standard SRK, else the standard SRK created transiently (with a warning when another key holds the
    handle, saying what it is)."""
    cached = tpm.srks.get(SRK_PERSISTENT_HANDLE)  # found by a binding's name, or for a session: SRK-shaped
    if cached is not None:
        occupant: Occupant | None = Occupant(cached[0], cached[1].name, "an ECC key", srk_shape=True)
    else:
        occupant = _occupant(tpm, SRK_PERSISTENT_HANDLE)
    if occupant is None:
        return _transient_srk(tpm)
    if _proven(tpm, occupant):
        tpm.srks[SRK_PERSISTENT_HANDLE] = (occupant.esys, Parent(SRK_PERSISTENT_HANDLE, occupant.name))
        return tpm.srks[SRK_PERSISTENT_HANDLE]
    if cached is None:
        tpm.esys.tr_close(occupant.esys)
    _warn(
        tpm,
        f"{SRK_PERSISTENT_HANDLE:#x} holds {occupant.describe()}; luks-tpm uses the standard SRK, re-created "
        f"on each use (slower): if no other program uses that key, evict it ({EVICT_ADVICE}) and run "
        "`luks-tpm persist-srk`",
    )
    return _transient_srk(tpm)


def session_key(tpm: Tpm) -> Any:
    """A key to salt a session that carries no binding (an application key): the persistent key at
    0x81000001 when it has the SRK's shape (made in this TPM, so only this TPM reads the salt), else the
    standard SRK created transiently. No proof needed, and none paid for: nothing records its name."""
    if SRK_PERSISTENT_HANDLE in tpm.srks:
        return tpm.srks[SRK_PERSISTENT_HANDLE][0]
    occupant = _occupant(tpm, SRK_PERSISTENT_HANDLE)
    if occupant is not None and occupant.srk_shape:
        tpm.srks[SRK_PERSISTENT_HANDLE] = (occupant.esys, Parent(SRK_PERSISTENT_HANDLE, occupant.name))
        return occupant.esys
    if occupant is not None:
        tpm.esys.tr_close(occupant.esys)
    return _transient_srk(tpm)[0]


def persistent_handle_free(tpm: Tpm) -> bool:
    """Whether nothing is stored at 0x81000001 (cheap: ESYS reads the handle's public area)."""
    if SRK_PERSISTENT_HANDLE in tpm.srks:
        return False
    found = _at_handle(tpm, SRK_PERSISTENT_HANDLE)
    if found is not None:
        tpm.esys.tr_close(found[0])
    return found is None


def persist_srk(tpm: Tpm) -> Parent:
    """Make the standard SRK persistent at 0x81000001 (creating it costs up to a second on hardware);
    refuses (exit 7) when another key is there. Both steps are authorized by the owner hierarchy: give
    its authorization first (owner.owner_authorization) when it has one."""
    occupant = _occupant(tpm, SRK_PERSISTENT_HANDLE)
    if occupant is not None:
        if _proven(tpm, occupant):
            tpm.srks[SRK_PERSISTENT_HANDLE] = (occupant.esys, Parent(SRK_PERSISTENT_HANDLE, occupant.name))
            return Parent(SRK_PERSISTENT_HANDLE, occupant.name)
        tpm.esys.tr_close(occupant.esys)
        die(
            f"{SRK_PERSISTENT_HANDLE:#x} already holds {occupant.describe()}",
            hint=f"if no other program uses it, evict it ({EVICT_ADVICE}) and run persist-srk again; luks-tpm "
            "works without it, re-creating the SRK on each use",
            code=ExitCode.REFUSED,
            cause=Cause.REFUSED,
        )
    esys, transient = _transient_srk(tpm)
    with tpm_errors("persisting the storage root key", OWNER):
        persisted = tpm.esys.evict_control(lib.ESYS_TR_RH_OWNER, esys, SRK_PERSISTENT_HANDLE)
    _forget_transient(tpm)  # the persistent copy serves from now on
    tpm.proven_srks.add(transient.name)  # the very key just created from the template
    parent = Parent(SRK_PERSISTENT_HANDLE, transient.name)
    tpm.srks[SRK_PERSISTENT_HANDLE] = (persisted, parent)
    return parent


def _warn(tpm: Tpm, warning: str) -> None:
    if warning not in tpm.warnings:
        tpm.warnings.append(warning)


def _find(tpm: Tpm, expected: Parent, *, create: bool) -> tuple[Any, bool] | None:
    """The SRK a binding names, if this TPM has it now: (handle, re-created from the template?).

    By name alone, and nothing of the binding is loaded. First the key persisted at the binding's handle
    (0x81000001 for a binding made with a transient SRK: persisted since, the same key serves); an equal
    name is the very key, the name hashing the whole public area, so that costs one ReadPublic and no
    owner authorization. Then, when `create` (or when it was already made on this connection), the
    standard SRK re-created from its template: the same key on the same owner seed."""
    handle = SRK_PERSISTENT_HANDLE if expected.handle is None else expected.handle
    cached = tpm.srks.get(handle)
    if cached is None:
        found = _at_handle(tpm, handle)
        if found is not None and found[1] == expected.name:
            cached = tpm.srks[handle] = (found[0], Parent(handle, expected.name))
        elif found is not None:
            tpm.esys.tr_close(found[0])
    if cached is not None and cached[1].name == expected.name:
        return cached[0], False
    if None not in tpm.srks and not create:
        return None
    handle, transient = _transient_srk(tpm)
    return (handle, True) if transient.name == expected.name else None


def srk_for(tpm: Tpm, expected: Parent, endorsement: bytes | None) -> Any:
    """The SRK a binding was made with; refuses another TPM or a cleared one (the EK tells which). When
    the persistent copy is gone or replaced, the re-created SRK serves, with a warning saying how to put
    it back."""
    found = _find(tpm, expected, create=True)
    if found is None:
        raise mismatch(tpm, endorsement)
    handle, recreated = found
    if recreated and expected.handle is not None:
        _warn(tpm, _missing_persistent(tpm, expected.handle))
    return handle


def _missing_persistent(tpm: Tpm, handle: int) -> str:
    works = "the binding still works with a re-created SRK (slower)"
    occupant = _occupant(tpm, handle) if handle not in tpm.srks else None
    if occupant is None:
        return f"the persistent SRK at {handle:#x} is missing; {works}; `luks-tpm persist-srk` restores it"
    tpm.esys.tr_close(occupant.esys)
    return (
        f"{handle:#x} no longer holds the SRK but {occupant.describe()}; {works}; if no other program uses "
        f"that key, evict it ({EVICT_ADVICE}) and run `luks-tpm persist-srk`"
    )


def is_this_tpm(tpm: Tpm, expected: Parent, *, create: bool) -> bool:
    """Whether a binding's SRK is one this TPM has now (see _find); a mismatch costs no EK."""
    return _find(tpm, expected, create=create) is not None


def mismatch(tpm: Tpm, endorsement: bytes | None) -> TpmError:
    """Why a binding's parent is not this TPM's: cleared, another TPM, or one of the two."""
    current = endorsement_name(tpm) if endorsement is not None else None
    if current is not None and current == endorsement:
        return TpmError(
            "the TPM owner hierarchy was cleared since this binding was made, which destroyed its key",
            hint="unlock with the recovery key and re-enroll",
            code=ExitCode.UNLOCK_FAILED,
            cause=Cause.CLEARED,
        )
    if current is not None:
        return TpmError(
            "this is a different TPM from the one this binding was made with",
            hint="use it on that machine, or unlock with the recovery key and enroll this TPM too",
            code=ExitCode.UNLOCK_FAILED,
            cause=Cause.OTHER_TPM,
        )
    return TpmError(
        "the TPM's storage root key differs from the one this binding was made with: the owner "
        "hierarchy was cleared, or this is a different TPM",
        hint="the TPM cannot recover this key any more; unlock with the recovery key and re-enroll",
        code=ExitCode.UNLOCK_FAILED,
        cause=Cause.SRK_CHANGED,
    )


def endorsement_name(tpm: Tpm) -> bytes | None:
    """Name of the standard ECC EK: survives TPM2_Clear, so it tells "cleared" from "another TPM"."""
    if not tpm.endorsement_checked:
        tpm.endorsement_checked = True

        try:
            with tpm_errors("creating the endorsement key"):
                esys = tpm.esys.create_primary(lib.ESYS_TR_RH_ENDORSEMENT, templates.endorsement_key())
            with tpm.transient(esys):
                tpm.endorsement = tpm.esys.tr_get_name(esys)
        except TpmError as error:
            log.debug("cannot create the EK: %s", error)
            tpm.endorsement = None
    return tpm.endorsement
