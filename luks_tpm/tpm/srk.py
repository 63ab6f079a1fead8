"""The storage root key (SRK) and the endorsement key (EK): which TPM and which owner seed this is.

The SRK is the standard ECC P-256 SRK (TCG provisioning template): the one persisted at 0x81000001
when it has that shape, otherwise created transiently (same template, same owner seed, same key).
A binding records the SRK's name; a different name means the owner hierarchy was cleared or this is
another TPM, and the EK's name (which survives TPM2_Clear) tells which.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import Cause, ExitCode, die
from ..model import Parent
from . import templates
from .context import Tpm
from .esys import TssError, lib
from .responses import TpmError, tpm_errors, translate

log = logging.getLogger(__name__)

SRK_PERSISTENT_HANDLE = 0x81000001


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
    """Whether a key (a TPM2B_PUBLIC) has the standard SRK's shape (whoever made it, luks-tpm or another tool)."""
    return _same_key_shape(public, templates.srk())


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


def _persistent_srk(tpm: Tpm, handle: int) -> tuple[Any, Parent] | None:
    """The standard SRK persisted at `handle`, or None (nothing there, or another kind of key)."""
    found = _at_handle(tpm, handle)
    if found is None:
        return None
    esys, name = found
    public = tpm.esys.read_public(esys)
    if not is_standard_srk(public):
        log.debug("persistent handle %#x does not hold the standard SRK; ignoring it", handle)
        tpm.esys.tr_close(esys)
        return None
    return esys, Parent(handle, name)


def _transient_srk(tpm: Tpm) -> tuple[Any, Parent]:
    if None not in tpm.srks:
        with tpm_errors("creating the storage root key"):
            esys = tpm.track(tpm.esys.create_primary(lib.ESYS_TR_RH_OWNER, templates.srk()))
            tpm.srks[None] = (esys, Parent(None, tpm.esys.tr_get_name(esys)))
    return tpm.srks[None]


def current_srk(tpm: Tpm) -> tuple[Any, Parent]:
    """The SRK new bindings use: the persistent standard SRK if there is one, else a transient one."""
    if SRK_PERSISTENT_HANDLE not in tpm.srks:
        found = _persistent_srk(tpm, SRK_PERSISTENT_HANDLE)
        if found is None:
            return _transient_srk(tpm)
        tpm.srks[SRK_PERSISTENT_HANDLE] = found
    return tpm.srks[SRK_PERSISTENT_HANDLE]


def persistent_handle_free(tpm: Tpm) -> bool:
    """Whether nothing is stored at 0x81000001 (cheap: ESYS reads the handle's public area)."""
    if SRK_PERSISTENT_HANDLE in tpm.srks:
        return False
    found = _at_handle(tpm, SRK_PERSISTENT_HANDLE)
    if found is not None:
        tpm.esys.tr_close(found[0])
    return found is None


def persist_srk(tpm: Tpm) -> Parent:
    """Make the standard SRK persistent at 0x81000001 (creating it costs up to a second on hardware)."""
    found = _persistent_srk(tpm, SRK_PERSISTENT_HANDLE)
    if found is not None:
        tpm.srks[SRK_PERSISTENT_HANDLE] = found
        return found[1]
    if _at_handle(tpm, SRK_PERSISTENT_HANDLE) is not None:
        die(
            f"{SRK_PERSISTENT_HANDLE:#x} already holds a key that is not the standard SRK",
            hint="leave it, or evict it with `tpm2_evictcontrol` if nothing uses it",
            code=ExitCode.REFUSED,
            cause=Cause.REFUSED,
        )
    esys, _ = _transient_srk(tpm)
    with tpm_errors("persisting the storage root key"):
        persisted = tpm.esys.evict_control(lib.ESYS_TR_RH_OWNER, esys, SRK_PERSISTENT_HANDLE)
    tpm.esys.tr_close(persisted)  # looked up again below, with its shape checked
    del tpm.srks[None]  # the persistent copy serves from now on: free the TPM's object slot
    tpm.flush(esys)
    found = _persistent_srk(tpm, SRK_PERSISTENT_HANDLE)
    if found is None:  # pragma: no cover - the TPM just said it stored it
        die("the TPM did not keep the SRK it was asked to persist", code=ExitCode.TPM_UNAVAILABLE)
    tpm.srks[SRK_PERSISTENT_HANDLE] = found
    return found[1]


def _find(tpm: Tpm, expected: Parent, *, create: bool) -> tuple[Any, bool] | None:
    """The SRK a binding names, if this TPM has it now: (handle, re-created from the template?).

    By name alone, and nothing of the binding is loaded. First the key persisted at the binding's handle;
    an equal name is the very key whose shape was checked at enrolment (the name hashes the whole public
    area), so that costs one ReadPublic. Then, when `create` (or when it was already made on this
    connection), the standard SRK re-created from its template: the same key on the same owner seed."""
    if expected.handle is not None:
        cached = tpm.srks.get(expected.handle)
        if cached is None:
            found = _at_handle(tpm, expected.handle)
            if found is not None and found[1] == expected.name:
                cached = tpm.srks[expected.handle] = (found[0], expected)
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
    the persistent copy is gone or replaced, the re-created SRK serves, with a warning."""
    found = _find(tpm, expected, create=True)
    if found is None:
        raise mismatch(tpm, endorsement)
    handle, recreated = found
    if recreated and expected.handle is not None:
        warning = (
            f"the persistent SRK at {expected.handle:#x} is missing; the binding still works with a "
            "re-created SRK (slower); `luks-tpm persist-srk` restores it"
        )
        if warning not in tpm.warnings:
            tpm.warnings.append(warning)
    return handle


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
